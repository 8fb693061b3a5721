"""The compression benchmark's per-domain pruning specs (bench/compress_bench.py)."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("compress_bench")


def test_a_bare_ratio_sets_every_domain_and_a_domain_spec_overrides_it(bench):
    ratios = bench.domain_ratios(["0.25", "education=0.5"], "--prune-ffn")
    assert ratios == {"finance": 0.25, "medical": 0.25, "education": 0.5}
    # Later specs win, in the order given.
    assert bench.domain_ratios(["medical=0.5", "0.1"], "--prune-heads")["medical"] == 0.1


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("dental=0.5", "unknown domain 'dental'"),
        ("medical=half", "'medical=half'"),
        ("1.0", "outside [0, 1)"),
    ],
)
def test_a_bad_spec_names_the_option_and_what_was_expected(bench, spec, named):
    with pytest.raises(ValueError, match="--prune-heads") as error:
        bench.domain_ratios([spec], "--prune-heads")
    assert named in str(error.value)


def test_the_report_names_each_domains_pruning(bench):
    meta = {"pruning": {"education": {"ffn": 0.5, "heads": 0.5}}, "args": {"prune_ffn": "unused"}}
    assert "education: 0.5 of the FFN units and 0.5 of the attention heads removed" in bench._pruning_text(
        meta
    )
    assert bench._pruning_text({"args": {"prune_ffn": "0.25"}}) == "0.25 of the FFN units removed"

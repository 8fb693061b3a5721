"""The compression benchmark's per-domain pruning specs (bench/compress_bench.py)."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("compress_bench")


def test_a_bare_ratio_sets_every_domain_and_a_domain_spec_overrides_it(bench):
    ratios = bench.domain_values(["0.25", "education=0.5"], "--prune-ffn", bench._ratio)
    assert ratios == {"finance": 0.25, "medical": 0.25, "education": 0.5}
    # Later specs win, in the order given.
    assert bench.domain_values(["medical=0.5", "0.1"], "--prune-heads", bench._ratio)["medical"] == 0.1


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
        bench.domain_values([spec], "--prune-heads", bench._ratio)
    assert named in str(error.value)


def test_the_report_names_each_domains_pruning(bench):
    meta = {"pruning": {"education": {"ffn": 0.5, "heads": 0.5}}, "args": {"prune_ffn": "unused"}}
    assert "education: 0.5 of the FFN units and 0.5 of the attention heads removed" in bench._pruning_text(
        meta
    )
    assert bench._pruning_text({"args": {"prune_ffn": "0.25"}}) == "0.25 of the FFN units removed"
    layers = {"pruning": {"medical": {"ffn": 0.25, "heads": 0.0, "layers": 1, "ffn_blocks": 0}}}
    assert bench._pruning_text(layers).endswith("attention heads removed, 1 layer(s) dropped")
    blocks = {"pruning": {"education": {"ffn": 0.0, "heads": 0.0, "layers": 0, "ffn_blocks": 2}}}
    assert bench._pruning_text(blocks).endswith("attention heads removed, 2 feed-forward block(s) dropped")


def test_layer_counts_are_whole_numbers_per_domain(bench):
    assert bench.domain_values(["0", "medical=1"], "--prune-layers", bench._layer_count) == {
        "finance": 0,
        "medical": 1,
        "education": 0,
    }
    for spec, named in (("medical=0.5", "whole number of blocks"), ("-1", "0 or more")):
        with pytest.raises(ValueError, match="--prune-layers") as error:
            bench.domain_values([spec], "--prune-layers", bench._layer_count)
        assert named in str(error.value)


def test_the_report_lists_the_block_influence_of_what_block_pruning_dropped(bench):
    step = {
        "step": "prune_blocks",
        "layers_kept": [0],
        "ffn_dropped": [0],
        "block_influence": {"layers": [0.6, 0.3], "ffn": [0.09, 0.14]},
    }
    results = {
        "medical": {"variants": {"pruned_int8": {"steps": [step]}}},
        "finance": {"variants": {"pruned_int8": {"steps": [{"step": "onnx_int8"}]}}},
    }
    lines = bench.block_pruning_lines(results)
    assert lines[-1] == (
        "- medical: layers 0 0.600, 1 0.300; feed-forward blocks 0 0.090, 1 0.140; "
        "dropped: layers [1], feed-forward blocks [0]"
    )
    assert not [line for line in lines if "finance" in line]
    assert bench.block_pruning_lines({"finance": results["finance"]}) == []


def _row(b1: float, b64: float, delta: float, parent_ms: float = 90.0) -> dict:
    return {
        "size_ratio_vs_suite": 0.1,
        "delta_points": delta,
        "speedup_b1": b1,
        "speedup_b64": b64,
        "latency": {
            "batch_1": {"parent_fp32_ms": 5.0, "artifact_ms": 5.0 / b1},
            "batch_64": {"parent_fp32_ms": parent_ms, "artifact_ms": parent_ms / b64},
        },
    }


def test_figures_judge_int8_only_and_pruned_int8_separately_with_the_int8_ceiling(bench):
    rows = {
        "int8": _row(3.1, 1.8, -0.1),
        "pruned_int8": _row(6.0, 4.0, -0.6),
        "pruned_qat_int8": _row(6.1, 4.1, -0.2),
    }
    # int8 kernels are 30% of the int8 graph: at zero cost it would take 0.7 of 50 ms.
    profile = {"ops": {"MatMulIntegerToFloat": {"share": 0.2}, "DynamicQuantizeLinear": {"share": 0.1}}}
    assert bench.int8_ceiling(rows["int8"], profile) == pytest.approx(90.0 / (50.0 * 0.7))
    (line,) = bench.figures({"medical": {"variants": rows, "profile_b64": {"int8": profile}}})
    assert "b1 int8 3.10x, pruned_int8 6.00x, pruned_qat_int8 6.10x (int8-only met, pruned+int8 met)" in line
    assert "(int8-only not met, pruned+int8 met); int8-only ceiling at b64" in line
    assert "2.57x" in line and "worst PTQ delta -0.60 points (met), QAT -0.20 (met)" in line
    rows["pruned_qat_int8"] = _row(6.1, 2.9, -0.2)
    (line,) = bench.figures({"medical": {"variants": rows, "profile_b64": {"int8": profile}}})
    assert "(int8-only not met, pruned+int8 not met)" in line

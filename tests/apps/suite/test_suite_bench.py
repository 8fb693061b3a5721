"""The suite benchmark's screening helpers (bench/suite_bench.py): data reuse, code fingerprint, settings."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("suite_bench")


def _args(bench, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--device", default="cpu")
    bench.add_suite_arguments(parser)
    return parser.parse_args(list(extra))


def test_reuse_takes_the_recorded_data_only_for_the_same_data_arguments(bench, tmp_path, monkeypatch):
    made = []

    def fake_make_data(work, args):  # stands in for the generators: records each call
        made.append(args.cases)
        return {"train": {"medical": work / "med"}, "test": {"medical": work / "t"}, "sizes": {}}

    monkeypatch.setattr(bench, "make_data", fake_make_data)
    first = bench.load_or_make_data(tmp_path, _args(bench, "--reuse"))
    assert made == [60] and json.loads((tmp_path / "data.json").read_text())["key"]["cases"] == 60
    again = bench.load_or_make_data(tmp_path, _args(bench, "--reuse"))
    assert made == [60] and again["train"]["medical"] == first["train"]["medical"] == tmp_path / "med"
    bench.load_or_make_data(tmp_path, _args(bench, "--reuse", "--cases", "80"))  # other data: generated
    bench.load_or_make_data(tmp_path, _args(bench, "--cases", "80"))  # no --reuse: generated
    assert made == [60, 80, 80]


def test_source_fingerprint_changes_with_the_code(bench, tmp_path, monkeypatch):
    for folder in ("core", "apps"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.py").write_text("a = 1\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    before = bench.source_fingerprint()
    assert bench.source_fingerprint() == before
    (tmp_path / "apps" / "x.py").write_text("a = 2\n")
    assert bench.source_fingerprint() != before


def test_suite_settings_carry_the_settling_options(bench):
    settings = bench.suite_settings(_args(bench, "--settle-steps", "50", "--settle-floor", "0.05"))
    assert (settings.settle_steps, settings.settle_floor, settings.balance_load) == (50, 0.05, "train")
    assert bench.suite_settings(_args(bench, "--settle-floor", "0")).settle_floor is None
    own = bench.own_settings(_args(bench, "--finish-steps", "8"))
    assert own.finish_steps == 0 and own.max_steps == 240 and own.settle_steps == 300


def test_suite_settings_default_to_the_resampled_settle_and_take_per_app_finishing(bench):
    settings = bench.suite_settings(_args(bench))
    assert (settings.settle_floor, settings.settle_resamples, settings.finish_steps) == (0.08, 200, 0)
    medical = bench.suite_settings(_args(bench, "--finish-steps", "medical=32"))
    # The budget stays --steps per app; train_suite takes the finishing steps out of medical's joint ones.
    assert medical.max_steps == 240 and medical.finish_steps == {"medical": 32}
    own = bench.own_settings(_args(bench, "--finish-steps", "medical=32"))
    assert own.finish_steps == 0 and own.max_steps == 240 and own.settle_resamples == 200
    with pytest.raises(ValueError, match="--finish-steps"):
        bench.suite_settings(_args(bench, "--finish-steps", "medical=240"))
    with pytest.raises(SystemExit):  # argparse: not a count or APP=COUNT
        _args(bench, "--finish-steps", "medical:32")


def test_width_study_changes_the_trunk_of_the_suite_and_the_own_models_alike(bench):
    assert bench.suite_settings(_args(bench)).trunk == {}
    wide = _args(bench, "--hidden-size", "128")
    assert bench.suite_settings(wide).trunk == {"hidden_size": 128, "ffn_size": 128}
    assert bench.own_settings(wide).trunk == {"hidden_size": 128, "ffn_size": 128}
    narrow_ffn = _args(bench, "--hidden-size", "96", "--ffn-size", "48")
    assert bench.own_settings(narrow_ffn).trunk == {"hidden_size": 96, "ffn_size": 48}
    assert bench.width_study_note({}, "(here)") == ""
    note = bench.width_study_note({"hidden_size": 128, "ffn_size": 128}, "(here)")
    assert note == " Width study: shared trunk changed to hidden_size 128, ffn_size 128 (here)."


def _seed_set(path, seeds, deltas, on_group, low_use=None, **settings):
    """A `--seeds` result file as run_seeds writes it, with the fields `pool` reads."""
    low_use = low_use or [0] * len(seeds)
    result = {
        "settings": {"steps": 240, "learning_rate": 0.002, "trunk_changes": {}, "seed": seeds[0], **settings},
        "seeds": {
            "seeds": seeds,
            "apps": {"medical": {"deltas": deltas}},
            "routing": [
                {"on_group_min": share, "low_use_count": low}
                for share, low in zip(on_group, low_use, strict=True)
            ],
        },
    }
    path.write_text(json.dumps(result))
    return path


def test_pool_combines_the_seeds_of_runs_with_the_same_settings(bench, tmp_path):
    from scipy import stats

    a = _seed_set(tmp_path / "a.json", [0, 1, 2], [-0.03, 0.01, -0.01], [0.95, 0.93, 0.97])
    b = _seed_set(tmp_path / "b.json", [100, 101], [0.02, -0.02], [0.79, 0.96], low_use=[0, 2], device="cuda")
    pooled = bench.pool([a, b])
    medical = pooled["apps"]["medical"]
    deltas = [-0.03, 0.01, -0.01, 0.02, -0.02]
    half = stats.t.ppf(0.975, 4) * np.std(deltas, ddof=1) / np.sqrt(5)
    assert medical["delta_mean"] == pytest.approx(-0.006)
    assert medical["delta_ci95"] == pytest.approx([-0.006 - half, -0.006 + half])
    assert medical["file_means"] == pytest.approx([-0.01, 0.0]) and medical["within_tolerance"]
    assert pooled["seeds"] == [0, 1, 2, 100, 101]
    assert pooled["routing"]["seeds_below_on_group_target"] == [100]
    assert pooled["routing"]["seeds_with_low_use"] == [101] and pooled["routing"]["low_use_experts"] == 2
    assert pooled["figures"] == {
        "on_group_target_met": False,
        "no_low_use_met": False,
        "metrics_within_1_point_met": True,
    }
    assert "| medical | auroc_macro | -0.0100, +0.0000 | -0.0060 [" in bench.pooled_markdown(pooled)


def test_pool_refuses_other_settings_repeated_seeds_and_single_runs(bench, tmp_path):
    a = _seed_set(tmp_path / "a.json", [0, 1], [0.0, 0.01], [0.9, 0.9])
    longer = _seed_set(tmp_path / "s.json", [5, 6], [0.0, 0.01], [0.9, 0.9], steps=160)
    with pytest.raises(bench.InputValidationError, match=r"s\.json: settings differ .* steps \(160 vs 240\)"):
        bench.pool([a, longer])
    # The trunk compares as the widths it resolves to: a width study of the preset's own width pools.
    preset = bench.trunk_widths({})
    same = _seed_set(tmp_path / "w.json", [7, 8], [0.0, 0.01], [0.9, 0.9], trunk_changes=dict(preset))
    assert bench.pool([a, same])["seeds"] == [0, 1, 7, 8]
    wider = {"hidden_size": preset["hidden_size"] * 2, "ffn_size": preset["ffn_size"] * 2}
    other = _seed_set(tmp_path / "x.json", [9], [0.0], [0.9], trunk_changes=wider)
    with pytest.raises(bench.InputValidationError, match="trunk"):
        bench.pool([a, other])
    again = _seed_set(tmp_path / "r.json", [1, 3], [0.0, 0.01], [0.9, 0.9])
    with pytest.raises(bench.InputValidationError, match=r"seed 1 is already in .*a\.json"):
        bench.pool([a, again])
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"settings": {}, "runs": {}}))
    with pytest.raises(bench.InputValidationError, match="not a multi-seed"):
        bench.pool([a, single])

"""The routing report: consistent shares, the checks it derives, its CLI, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apps.suite.routing import LOW_USE, heatmap_rows, routing_report
from core.errors import InputValidationError
from tests.apps.suite.conftest import invoke


def test_shares_sum_to_one_per_domain_and_layer(suite_run):
    report = routing_report(suite_run.model_dir)
    assert report["domains"] == suite_run.summary["domains"]
    for layer in [*report["layers"], report["all_layers"]]:
        for shares in layer["mass_share"].values():
            assert len(shares) == report["n_experts"]
            assert sum(shares) == pytest.approx(1.0, abs=1e-6)
            assert min(shares) >= 0.0
        for share in layer["on_group_share"].values():
            assert 0.0 <= share <= 1.0 + 1e-9


def test_derived_checks_follow_from_the_statistics(suite_run):
    report = routing_report(suite_run.model_dir)
    layer = report["layers"][0]
    load = np.asarray(layer["load"], dtype=float)
    assert layer["max_violation"] == pytest.approx(load.max() / load.mean() - 1.0)
    groups = report["expert_groups"]
    for name, shares in layer["mass_share"].items():
        allowed = sorted(set(groups[name]) | set(groups["general"]))
        assert layer["on_group_share"][name] == pytest.approx(sum(shares[e] for e in allowed))
    low = {(x["expert"], x["group"]) for x in layer["low_use_experts"]}
    for group, experts in groups.items():
        total = load[experts].sum()
        for e in experts:
            assert ((e, group) in low) == (total == 0 or load[e] / total < LOW_USE)
    assert report["checks"]["max_violation"] == max(x["max_violation"] for x in report["layers"])
    rows = heatmap_rows(report)
    assert len(rows) == len(report["domains"]) * report["n_experts"]


def test_routing_cli_prints_a_table_and_json(suite_run):
    result = invoke("suite", "routing", "--model", suite_run.model_dir)
    assert result.exit_code == 0, result.output
    assert "own+general" in result.output
    result = invoke("suite", "routing", "--model", suite_run.model_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checks"]["on_group_target"] == 0.8


def test_routing_of_a_folder_without_suite_json_is_a_clear_error(suite_run, tmp_path):
    with pytest.raises(InputValidationError, match=r"suite\.json missing"):
        routing_report(suite_run.model_dir / "finance")
    result = invoke("suite", "routing", "--model", tmp_path)
    assert result.exit_code == 1
    assert "not a suite model directory" in result.output


def test_low_use_skips_the_groups_of_apps_the_run_did_not_train(tmp_path):
    groups = {"finance": [0, 1], "medical": [2, 3], "general": [4, 5]}
    counts = {"medical": [0, 0, 30, 1, 20, 9]}  # expert 3: 1 of 31 medical-group assignments (3.2%)
    suite = {
        "domains": ["medical"],
        "expert_groups": groups,
        "trunk": {"n_routed_experts": 6},
        "routing": {"layers": [{"counts": counts, "mass": counts}]},
    }
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    low = routing_report(tmp_path)["layers"][0]["low_use_experts"]
    assert low == []  # finance's experts 0 and 1 idle: finance was not trained, so no group of it to judge
    counts["medical"][3] = 0
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    low = routing_report(tmp_path)["layers"][0]["low_use_experts"]
    assert [(x["expert"], x["group"]) for x in low] == [(3, "medical")]

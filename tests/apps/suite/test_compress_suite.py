"""`verticals compress --model SUITE --domain D` on the suite fixture: a per-domain int8 model from the suite.

The education part is compressed (expert pruning from its routing statistics, FFN pruning, int8) through
the CLI, then loaded by the education CLI. Tolerance: per-answer P(correct) within 0.05 of the fp32 suite
part (the fixture trains 2 steps, so outputs sit near the prior; observed differences are a few thousandths).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from apps.compress_cli import suite_safetensors_bytes

from .conftest import invoke

pytestmark = pytest.mark.slow  # ONNX export and int8 quantisation of one suite part (~30 s on one thread)


@pytest.fixture(scope="module")
def compressed(suite_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite-compress") / "education-int8"
    result = invoke(
        "compress", "--model", suite_run.model_dir, "--domain", "education", "--data", suite_run.education,
        "--out", out, "--prune-experts", "--expert-threshold", "0.02", "--prune-ffn", "0.25", "--int8",
        "--calibration-size", "16", "--latency-repeats", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_suite_size_counts_the_shared_trunk_once(suite_run):
    parts = [suite_run.model_dir / d / "model.safetensors" for d in suite_run.summary["domains"]]
    sizes = [p.stat().st_size for p in parts]
    total = suite_safetensors_bytes(suite_run.model_dir)
    # More than any one part (each app's embedders and heads are added), less than their sum (trunk once).
    assert max(sizes) < total < sum(sizes)


def test_per_domain_artifact_reports_its_size_against_the_suite(compressed, suite_run):
    out, report = compressed
    assert json.loads((out / "compression.json").read_text()) == report
    suite = report["suite"]
    assert suite["domain"] == "education"
    assert suite["suite_safetensors_bytes"] == suite_safetensors_bytes(suite_run.model_dir)
    assert suite["size_ratio_vs_suite"] == pytest.approx(
        report["sizes"]["artifact_bytes"] / suite["suite_safetensors_bytes"], abs=1e-4
    )
    part = suite_run.model_dir / "education" / "model.safetensors"
    assert report["sizes"]["parent_safetensors_bytes"] == part.stat().st_size
    assert report["sizes"]["artifact_bytes"] < part.stat().st_size
    # Only the education part's inputs are in the graph: no other app's embedders travel with it.
    inputs = json.loads((out / "onnx.json").read_text())["inputs"]
    assert "volume" not in inputs and "numeric" not in inputs
    kept = [layer.get("experts_kept") for layer in report["pruned"]["layers"]]
    assert all(k is None or len(k) < 16 for k in kept) and any(k is not None for k in kept)


def test_the_education_cli_predicts_with_the_per_domain_artifact(compressed, suite_run, tmp_path):
    out, _ = compressed
    predictions = {}
    for name, args in (
        ("parent", ["--model", suite_run.model_dir, "--domain", "education"]),
        ("int8", ["--model", out]),
    ):
        target = tmp_path / f"{name}.csv"
        result = invoke("education", "predict", *args, "--data", suite_run.education, "--output", target)
        assert result.exit_code == 0, result.output
        predictions[name] = pd.read_csv(target)
    assert len(predictions["int8"]) == len(predictions["parent"]) > 10
    difference = (predictions["int8"]["p_correct"] - predictions["parent"]["p_correct"]).abs()
    assert difference.max() < 0.05

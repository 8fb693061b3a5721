"""End-to-end test of `verticals finance ...` on a small generated file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from apps.cli import app

runner = CliRunner()


def _run(home: Path, *args: str):
    return runner.invoke(app, ["--home", str(home), "finance", *args])


def test_generate_train_evaluate_score_explain_end_to_end(tmp_path) -> None:
    data, model, scores = tmp_path / "tx.csv", tmp_path / "model", tmp_path / "scores.csv"

    result = _run(tmp_path, "generate", "--out", str(data), "--accounts", "60", "--days", "20", "--seed", "1")
    assert result.exit_code == 0, result.output
    result = _run(
        tmp_path,
        "train",
        "--data",
        str(data),
        "--out",
        str(model),
        "--epochs",
        "1",
        "--pretrain-epochs",
        "0.2",
    )
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "app.json", "metrics.json"} <= {
        p.name for p in model.iterdir()
    }

    result = _run(tmp_path, "evaluate", "--model", str(model), "--data", str(data), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {
        "average_precision",
        "roc_auc",
        "recall_at_threshold",
        "precision_at_100_per_day",
        "alerts_for_90_recall",
    } <= set(metrics)

    result = _run(
        tmp_path,
        "score",
        "--model",
        str(model),
        "--input",
        str(data),
        "--output",
        str(scores),
        "--chunk-size",
        "400",
        "--json",
    )
    assert result.exit_code == 0, result.output
    written = pd.read_csv(scores)
    assert len(written) == len(pd.read_csv(data)) and not written["transaction_id"].duplicated().any()

    target = written["transaction_id"].iloc[-1]
    result = _run(
        tmp_path, "explain", "--model", str(model), "--data", str(data), "--transaction-id", target, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["transaction_id"] == target


def test_bad_input_exits_1_with_an_error_line(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("transaction_id,account_id,timestamp,amount\nt1,a1,2024-01-01T00:00:00Z,5\n")

    result = _run(tmp_path, "train", "--data", str(bad), "--out", str(tmp_path / "m"))

    assert result.exit_code == 1
    assert "error:" in result.output and "merchant_id" in result.output


def test_missing_model_directory_exits_1(tmp_path) -> None:
    result = _run(tmp_path, "evaluate", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "x.csv"))

    assert result.exit_code == 1 and "error:" in result.output

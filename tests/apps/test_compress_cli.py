"""`verticals compress` end to end on a tiny knowledge-tracing model, then the app's own CLI on the result.

Tolerance: per-answer P(correct) from the pruned int8 ONNX model within 0.05 of the fp32 parent (observed
differences are a few thousandths); the evaluation AUC within 0.02.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from apps.cli import app

# Training, ONNX export and int8 quantisation once per module: ~40 s of CPU on one thread.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"VERTICALS_HOME": None, "VERTICALS_DB_URL": None, "VERTICALS_DEBUG": None})


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory, runner: CliRunner) -> dict[str, Path]:
    """A tiny tracer trained for a few steps, compressed once with expert + FFN pruning and int8."""
    from apps.education.predictor import KnowledgeTracer
    from apps.education.service import write_atomic_csv
    from apps.education.synthetic import generate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("compress")
    frame, edges, _ = generate(students=60, skills=6, items_per_skill=3, interactions_per_student=24, seed=2)
    users = frame["user_id"].unique()
    written = frame.drop(columns="source_row")
    write_atomic_csv(written[written["user_id"].isin(users[:45])], work / "train.csv")
    write_atomic_csv(written[~written["user_id"].isin(users[:45])], work / "val.csv")
    write_atomic_csv(edges, work / "graph.csv")
    KnowledgeTracer(
        task_epochs=2,
        pretrain_epochs=0,
        batch_size=8,
        config_overrides=dict(hidden_size=32, n_routed_experts=4, moe_top_k=2),
    ).fit(frame[frame["user_id"].isin(users[:45])]).save(work / "parent")
    result = runner.invoke(
        app,
        [
            "compress",
            "--model", str(work / "parent"),
            "--data", str(work / "val.csv"),
            "--out", str(work / "int8"),
            "--prune-experts",
            "--expert-threshold", "0.05",
            "--prune-ffn", "0.25",
            "--int8",
            "--calibration-size", "16",
            "--latency-repeats", "1",
            "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {
        "work": work,
        "parent": work / "parent",
        "int8": work / "int8",
        "report": json.loads(result.stdout),
    }


def test_compress_writes_an_onnx_model_and_a_consistent_report(compressed):
    report = compressed["report"]
    out = compressed["int8"]
    assert (out / "model.onnx").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "compression.json").read_text()) == report
    assert (
        report["sizes"]["parent_safetensors_bytes"]
        == (compressed["parent"] / "model.safetensors").stat().st_size
    )
    assert report["sizes"]["artifact_bytes"] < report["sizes"]["parent_safetensors_bytes"]
    metrics = report["metrics"]
    assert metrics["headline"] == "auc"
    assert metrics["delta"]["auc"] == pytest.approx(metrics["artifact"]["auc"] - metrics["parent"]["auc"])
    assert abs(metrics["delta"]["auc"]) < 0.02
    assert {"batch_1", "batch_64"} == set(report["latency"])
    kept = [layer.get("experts_kept") for layer in report["pruned"]["layers"]]
    usage = report["steps"][0]["usage_share"]
    for layer_kept, layer_usage in zip(kept, usage, strict=True):
        used = {e for row in layer_usage for e, share in enumerate(row) if share > 0.05}
        assert layer_kept is None or used <= set(layer_kept)


def test_the_app_cli_predicts_with_the_compressed_model(compressed, runner):
    work = compressed["work"]
    outputs = {}
    for name in ("parent", "int8"):
        target = work / f"pred_{name}.csv"
        result = runner.invoke(
            app,
            [
                "education",
                "predict",
                "--model",
                str(work / name),
                "--data",
                str(work / "val.csv"),
                "--output",
                str(target),
            ],
        )
        assert result.exit_code == 0, result.output
        outputs[name] = pd.read_csv(target)
    assert len(outputs["int8"]) == len(outputs["parent"])
    difference = (outputs["int8"]["p_correct"] - outputs["parent"]["p_correct"]).abs()
    assert difference.max() < 0.05


def test_recommendations_run_on_the_explanation_graph(compressed, runner):
    work = compressed["work"]
    student = pd.read_csv(work / "val.csv")["user_id"].iloc[0]
    result = runner.invoke(
        app,
        [
            "education", "recommend", "--model", str(work / "int8"), "--data", str(work / "val.csv"),
            "--student", str(student), "--graph", str(work / "graph.csv"), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)


def test_compress_rejects_bad_options(compressed, runner, tmp_path):
    parent = str(compressed["parent"])
    data = str(compressed["work"] / "val.csv")
    nothing = runner.invoke(
        app, ["compress", "--model", parent, "--data", data, "--out", str(tmp_path / "x")]
    )
    assert nothing.exit_code == 1 and "nothing to do" in nothing.output
    ratio = runner.invoke(
        app,
        ["compress", "--model", parent, "--data", data, "--out", str(tmp_path / "x"), "--prune-ffn", "1.5"],
    )
    assert ratio.exit_code == 2
    objective = runner.invoke(
        app,
        ["compress", "--model", parent, "--data", data, "--out", str(tmp_path / "x"), "--qat-steps", "2",
         "--qat-objective", "mimic"],
    )  # fmt: skip
    assert objective.exit_code == 2 and "--qat-objective" in objective.output
    missing = runner.invoke(
        app, ["compress", "--model", str(tmp_path), "--data", data, "--out", str(tmp_path / "x"), "--int8"]
    )
    assert missing.exit_code == 1 and "not a verticals model directory" in missing.output
    negative = runner.invoke(
        app,
        ["compress", "--model", parent, "--data", data, "--out", str(tmp_path / "x"), "--prune-layers", "-1"],
    )
    assert negative.exit_code == 2 and "--prune-layers" in negative.output
    every = runner.invoke(
        app,
        ["compress", "--model", parent, "--data", data, "--out", str(tmp_path / "x"), "--prune-layers", "2"],
    )
    assert every.exit_code == 1 and "expected 0 to 1 layers to drop" in every.output


@pytest.mark.parametrize(("option", "int8"), [("--prune-layers", False), ("--prune-ffn-blocks", True)])
def test_a_model_with_a_block_dropped_predicts_through_the_cli(compressed, runner, tmp_path, option, int8):
    work = compressed["work"]
    out = tmp_path / "pruned"
    result = runner.invoke(
        app,
        ["compress", "--model", str(compressed["parent"]), "--data", str(work / "val.csv"), "--out", str(out),
         option, "1", *(["--int8"] if int8 else []), "--calibration-size", "16", "--latency-repeats", "1",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    config = json.loads((out / "config.json").read_text())
    step = next(s for s in report["steps"] if s["step"] == "prune_blocks")
    assert len(step["block_influence"]["layers"]) == len(step["block_influence"]["ffn"]) == 2
    if option == "--prune-layers":
        assert config["num_layers"] == 1 and len(step["layers_kept"]) == 1
    else:
        assert config["layer_has_ffn"].count(False) == 1 and len(step["ffn_dropped"]) == 1
        assert (out / "model.onnx").is_file()
    predicted = runner.invoke(
        app,
        ["education", "predict", "--model", str(out), "--data", str(work / "val.csv"),
         "--output", str(tmp_path / "pred.csv")],
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    assert pd.read_csv(tmp_path / "pred.csv")["p_correct"].between(0, 1).all()


def test_onnx_next_step_head_rejects_next_item_features(compressed):
    """The exported head has no practice-feature embeddings: features given to it are an error, not ignored."""
    import torch

    from core.errors import InputValidationError
    from core.onnx_model import OnnxCoreModel

    model = OnnxCoreModel(compressed["work"] / "int8")
    hidden = torch.zeros(1, 2, model.config.hidden_size)
    items = torch.ones(1, 2, dtype=torch.long)
    assert model.next_step(hidden, items).shape == (1, 2)
    with pytest.raises(InputValidationError, match="no next-item features"):
        model.next_step(hidden, items, next_features=torch.ones(1, 2, 4, dtype=torch.long))

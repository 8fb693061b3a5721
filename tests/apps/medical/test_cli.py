"""`verticals medical ...` end to end: inspect, diagnose (stored, JSON), add-class, evaluate, bad input exit 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apps.cli import app


@pytest.fixture
def runner(tmp_path: Path) -> CliRunner:
    return CliRunner(
        env={
            "VERTICALS_HOME": str(tmp_path / "home"),
            "VERTICALS_DB_URL": None,
            "VERTICALS_DEBUG": None,
            "VERTICALS_SECRET": None,
        }
    )


def test_inspect_prints_the_series_geometry_as_json(runner, trained):
    case = trained.test[0]
    result = runner.invoke(app, ["medical", "inspect", str(case.series_dir), "--json"])
    assert result.exit_code == 0, result.output
    series = json.loads(result.stdout)["series"]
    assert (
        len(series) == 1
        and series[0]["slices"] == 8
        and series[0]["spacing_mm"]["slice"] == pytest.approx(5.0)
    )


def test_inspect_of_a_non_dicom_file_exits_1_with_an_error(runner, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_text("not dicom")
    result = runner.invoke(app, ["medical", "inspect", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and "bad.dcm" in result.stderr


def test_diagnose_stores_the_case_and_prints_json(runner, trained, tmp_path):
    case = trained.test[3]
    args = [
        "medical",
        "diagnose",
        "--model",
        str(trained.model_dir),
        "--series",
        str(case.series_dir),
        "--record",
        str(case.record_file),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prediction"] in out["probabilities"] and out["case_id"] == 1 and out["status"] == "pending"
    assert case.record.patient_id not in result.stdout  # only the pseudonym leaves the service
    assert out["evidence"]["top_slices"] and out["evidence"]["record_fields"]
    assert (tmp_path / "home" / "medical_secret").is_file()


def test_diagnose_without_series_uses_the_record(runner, trained):
    case = trained.test[4]
    args = [
        "medical",
        "diagnose",
        "--model",
        str(trained.model_dir),
        "--record",
        str(case.record_file),
        "--no-store",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "no CT: diagnosed from the record alone" in result.stdout


def test_diagnose_with_a_broken_series_exits_1(runner, trained, tmp_path):
    series = shutil.copytree(trained.test[0].series_dir, tmp_path / "ct")
    first = sorted(series.iterdir())[0]
    first.write_bytes(first.read_bytes()[:300])  # truncated
    args = [
        "medical",
        "diagnose",
        "--model",
        str(trained.model_dir),
        "--series",
        str(series),
        "--record",
        str(trained.test[0].record_file),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "IM0001.dcm" in result.stderr


def test_add_class_then_evaluate(runner, trained, tmp_path):
    model = shutil.copytree(trained.model_dir, tmp_path / "model")
    support = tmp_path / "support"
    for case in trained.rare[:2]:
        shutil.copytree(case.record_file.parent, support / case.case_id)
    args = ["medical", "add-class", "--model", str(model), "--name", "miliary"]
    for case_dir in sorted(support.iterdir()):
        args += ["--cases", str(case_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        "from 2 case(s)" in result.stdout
        and "miliary" in json.loads((model / "prototypes.json").read_text())["added"][0]["name"]
    )
    result = runner.invoke(
        app, ["medical", "evaluate", "--model", str(model), "--data", str(trained.data_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == len(trained.train) + len(trained.test) + len(trained.rare)
    assert "auroc_miliary" in metrics and 0 <= metrics["ece"] <= 1


def test_train_rejects_an_unknown_or_unavailable_device_before_reading_data(runner, tmp_path):
    import torch

    # "cuda:0" is unavailable on a machine without a GPU; elsewhere only the unknown name is checked.
    for device in ["gpu"] + ([] if torch.cuda.is_available() else ["cuda:0"]):
        args = ["medical", "train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "m")]
        result = runner.invoke(app, [*args, "--device", device])
        assert result.exit_code == 2, device
        assert "--device" in result.output and not (tmp_path / "m").exists()

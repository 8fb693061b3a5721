"""Suite fixtures: tiny generated data of the three apps and one suite model trained on it (a few steps)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from apps.cli import app as cli


@dataclass(frozen=True)
class SuiteRun:
    home: Path
    finance: Path
    medical: Path
    education: Path
    model_dir: Path
    summary: dict


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="session")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    """Three apps' generated data and a suite trained on it through the CLI (both stages, 2 steps each)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("suite")
    home = root / "home"
    finance, medical, education = root / "tx.csv", root / "med", root / "edu"
    for args in (
        ("finance", "generate", "--out", finance, "--accounts", "60", "--days", "14", "--seed", "1"),
        ("medical", "generate", "--out", medical, "--cases", "12", "--shape", "16x32x32"),
        (
            "education",
            "generate",
            "--out",
            education,
            "--students",
            "30",
            "--answers",
            "20",
            "--skills",
            "4",
            "--items-per-skill",
            "3",
        ),
    ):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    out = root / "suite"
    result = invoke(
        "--home",
        home,
        "suite",
        "train",
        "--finance",
        finance,
        "--medical",
        medical,
        "--education",
        education / "interactions.csv",
        "--out",
        out,
        "--medical-preset",
        "tiny",
        "--epochs",
        "1",
        "--pretrain-epochs",
        "1",
        "--max-steps",
        "2",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "suite.json").read_text())
    return SuiteRun(home, finance, medical, education / "interactions.csv", out, summary)

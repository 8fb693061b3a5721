"""The `verticals education` commands end to end, and the tutor dashboard page (AppTest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

import apps.education.orm  # noqa: F401 - registers the education tables
from apps.cli import app
from apps.education.service import demo_paths
from core.db import make_engine, make_session_factory, upgrade_database

UI_SCRIPT = Path(__file__).resolve().parents[3] / "apps" / "education" / "ui.py"


@pytest.fixture
def runner(tmp_path, monkeypatch) -> CliRunner:
    torch.set_num_threads(1)
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VERTICALS_DB_URL", raising=False)
    return CliRunner()


def test_generate_train_evaluate_predict_recommend(runner, tmp_path):
    data = tmp_path / "data"
    result = runner.invoke(
        app, ["education", "generate", "--out", str(data), "--students", "30", "--answers", "30"]
    )
    assert result.exit_code == 0, result.output
    model = tmp_path / "model"
    csv = str(data / "interactions.csv")
    graph = str(data / "prerequisites.csv")
    result = runner.invoke(
        app,
        [
            "education",
            "train",
            "--data",
            csv,
            "--out",
            str(model),
            "--max-steps",
            "3",
            "--no-register",
            "--graph",
            graph,
        ],
    )
    assert result.exit_code == 0, result.output
    assert (model / "app.json").is_file() and (model / "model.safetensors").is_file()
    clusters = json.loads((model / "app.json").read_text())["skill_clusters"]
    assert clusters and max(clusters.values()) < 8  # skill clusters from the graph, the MoE domains

    result = runner.invoke(app, ["education", "evaluate", "--model", str(model), "--data", csv, "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["n_predictions"] == 30 * 29

    output = tmp_path / "predictions.csv"
    result = runner.invoke(
        app, ["education", "predict", "--model", str(model), "--data", csv, "--output", str(output)]
    )
    assert result.exit_code == 0, result.output
    assert output.read_text().splitlines()[0] == "user_id,position,item_id,skill_id,correct,p_correct"
    assert len(output.read_text().splitlines()) == 30 * 30 + 1

    result = runner.invoke(
        app,
        [
            "education",
            "recommend",
            "--model",
            str(model),
            "--data",
            csv,
            "--student",
            "learner_00001",
            "--graph",
            str(data / "prerequisites.csv"),
            "--k",
            "3",
            "--band",
            "0.3",
            "0.95",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["student"] == "learner_00001" and len(payload["recommendations"]) <= 3
    assert all(0.3 <= r["p_correct"] <= 0.95 for r in payload["recommendations"])
    bad = ["education", "recommend", "--model", str(model), "--data", csv, "--student", "learner_00001"]
    result = runner.invoke(app, [*bad, "--band", "0.9", "0.2"])
    assert result.exit_code == 1 and "band" in result.stderr

    result = runner.invoke(
        app, ["education", "recommend", "--model", str(model), "--data", csv, "--student", "nobody"]
    )
    assert result.exit_code == 1 and "error:" in result.stderr and "nobody" in result.stderr


def test_missing_model_and_bad_format_fail_cleanly(runner, tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("user_id,order,item_id,skill_id,correct\nu,0,i,s,1\n")
    result = runner.invoke(
        app, ["education", "evaluate", "--model", str(tmp_path / "none"), "--data", str(csv)]
    )
    assert result.exit_code == 1 and result.stderr.startswith("error:")
    result = runner.invoke(
        app, ["education", "evaluate", "--model", str(tmp_path), "--data", str(csv), "--format", "xml"]
    )
    assert result.exit_code == 2


def test_bad_row_is_named_in_the_error(runner, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("user_id,order,item_id,skill_id,correct\nu,0,i,s,1\nu,1,i,s,7\n")
    result = runner.invoke(app, ["education", "train", "--data", str(csv), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "row 2" in result.stderr and "correct" in result.stderr


def test_dashboard_assigns_recommended_exercises(trained_world, tmp_path, monkeypatch):
    home = tmp_path / "home"
    paths = demo_paths(home)
    paths["root"].mkdir(parents=True)
    trained_world.train.drop(columns="source_row").to_csv(paths["data"], index=False)
    trained_world.edges.to_csv(paths["graph"], index=False)
    trained_world.tracer.save(paths["model"])
    db_url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade_database(db_url)
    monkeypatch.setenv("VERTICALS_HOME", str(home))
    monkeypatch.setenv("VERTICALS_DB_URL", db_url)

    at = AppTest.from_file(str(UI_SCRIPT), default_timeout=120).run()
    assert not at.exception, at.exception
    assert not at.error
    recommended = at.multiselect(key="edu_assign_items").options
    assert recommended, "the page should offer recommended exercises"
    at.multiselect(key="edu_assign_items").set_value([recommended[0]])
    at.text_input(key="edu_assign_tutor").input("ms tutor")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("Assigned 1 exercise" in s.value for s in at.success)

    engine = make_engine(db_url)
    with make_session_factory(engine)() as session:
        from apps.education.repository import list_assignments

        rows = list_assignments(session)
    engine.dispose()
    assert [(r.item_id, r.assigned_by) for r in rows] == [(recommended[0], "ms tutor")]


def test_dashboard_without_a_model_shows_an_error(tmp_path, monkeypatch):
    db_url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade_database(db_url)
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("VERTICALS_DB_URL", db_url)
    at = AppTest.from_file(str(UI_SCRIPT), default_timeout=60).run()
    assert not at.exception
    assert at.error and "verticals demo" in at.error[0].value

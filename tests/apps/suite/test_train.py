"""Suite training through the CLI: both stages run, every app's part is a normal model directory its app
loads with `--domain`, the run is registered, and bad domains fail clearly."""

from __future__ import annotations

import json

import pytest

from apps.suite.config import SUITE_DOMAINS, expert_groups
from core.errors import ConfigError, InputValidationError
from core.train import APP_FILE, load_checkpoint, resolve_model_dir
from tests.apps.suite.conftest import invoke


def test_joint_training_runs_both_stages_and_writes_every_part(suite_run):
    summary = suite_run.summary
    assert summary["domains"] == list(SUITE_DOMAINS)
    assert set(summary["training"]) == {"pretrain", "task"}
    for name in SUITE_DOMAINS:
        part = suite_run.model_dir / name
        for file in ("config.json", "model.safetensors", APP_FILE, "metrics.json"):
            assert (part / file).is_file(), f"{part} lacks {file}"
        assert json.loads((part / APP_FILE).read_text())["app"] == name
        assert summary["headline_metrics"][name] in summary["metrics"][name]


def test_every_part_keeps_the_shared_trunk_weights(suite_run):
    models = {name: load_checkpoint(suite_run.model_dir, domain=name)[0] for name in SUITE_DOMAINS}
    states = {name: model.state_dict() for name, model in models.items()}
    shared = [k for k in states["finance"] if k.startswith("layers.") and ".ffn.experts." in k]
    assert shared
    for key in shared:
        for name in ("medical", "education"):
            assert states[name][key].equal(states["finance"][key]), key
    # Each part's router prior is its suite domain's row, copied to every one of the app's own domains.
    for model in models.values():
        prior = model.layers[0].ffn.domain_prior.weight
        assert (prior == prior[0]).all()
    assert (
        not models["finance"]
        .layers[0]
        .ffn.domain_prior.weight[0]
        .equal(models["medical"].layers[0].ffn.domain_prior.weight[0])
    )


def test_each_app_predicts_from_its_part_through_the_cli(suite_run, tmp_path):
    model = suite_run.model_dir
    result = invoke(
        "finance", "evaluate", "--model", model, "--domain", "finance", "--data", suite_run.finance, "--json"
    )
    assert result.exit_code == 0, result.output
    assert "average_precision" in json.loads(result.stdout)
    result = invoke(
        "medical", "evaluate", "--model", model, "--domain", "medical", "--data", suite_run.medical, "--json"
    )
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["accuracy"] <= 1.0
    predictions = tmp_path / "predictions.csv"
    result = invoke(
        "education",
        "predict",
        "--model",
        model,
        "--domain",
        "education",
        "--data",
        suite_run.education,
        "--output",
        predictions,
    )
    assert result.exit_code == 0, result.output
    assert predictions.read_text().count("\n") > 10


def test_suite_run_is_registered(suite_run):
    result = invoke("--home", suite_run.home, "runs", "list", "--app", "suite", "--json")
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)
    assert run["model_dir"] == str(suite_run.model_dir.resolve())
    assert "on_group_min" in run["metrics"]


@pytest.mark.parametrize("domain", ["chemistry", None])
def test_a_suite_directory_needs_a_known_domain(suite_run, domain):
    args = ["education", "evaluate", "--model", suite_run.model_dir, "--data", suite_run.education]
    if domain is not None:
        args += ["--domain", domain]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "known domains" in result.output or "one of" in result.output
    assert "finance" in result.output and "education" in result.output


def test_domain_of_an_app_directory_must_match_its_app(suite_run):
    part = suite_run.model_dir / "medical"
    assert resolve_model_dir(part, "medical") == part
    assert resolve_model_dir(part) == part
    with pytest.raises(InputValidationError, match="model of app 'medical'"):
        resolve_model_dir(part, "finance")


def test_unknown_app_or_no_app_is_rejected(tmp_path):
    from apps.suite.train import train_suite

    with pytest.raises(InputValidationError, match="unknown apps"):
        train_suite({"chemistry": tmp_path}, tmp_path / "out")
    result = invoke("suite", "train", "--out", tmp_path / "out")
    assert result.exit_code == 2


def test_expert_groups_split_the_experts_evenly_and_need_enough_experts():
    groups = expert_groups(16)
    assert groups == {"finance": [0, 1, 2, 3], "medical": [4, 5, 6, 7], "education": [8, 9, 10, 11]}
    with pytest.raises(ConfigError, match="cannot form 4 groups"):
        expert_groups(3)


def test_suite_runs_the_medical_stage_0_on_the_medical_part_first(suite_run, tmp_path, monkeypatch):
    """The suite trains a CT stem as the diagnoser's own `fit` does: stage 0 on the medical part, first."""
    from apps.medical.predictor import Diagnoser
    from apps.suite.train import SuiteSettings, train_suite
    from core.model import CoreModel

    calls = []

    def recording_stage0(self, model, plan, work):
        calls.append((model, plan))
        return {"train_loss": 1.5}

    monkeypatch.setattr(Diagnoser, "pretrain_stem", recording_stage0)
    settings = SuiteSettings(
        medical_preset="tiny", epochs=1, pretrain_epochs=0, max_steps=1, show_progress=False
    )
    train_suite({"medical": suite_run.medical}, tmp_path / "suite", settings)
    assert len(calls) == 1
    model, plan = calls[0]
    assert isinstance(model, CoreModel) and model.config.num_labels == len(plan.context["labels"])
    summary = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert summary["training"]["stem_medical"] == {"train_loss": 1.5}

"""Per-app finishing: the settings' forms, the budget arithmetic and the capped joint schedule."""

from __future__ import annotations

import pytest

from apps.suite.train import (
    SuiteSettings,
    finish_plan,
    finish_schedule,
    parse_finish_steps,
    train_suite,
)
from core.errors import InputValidationError
from core.multitask import MultiTaskModel, RoundRobinDataset, capped_schedule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32", 32),
        ("0", 0),
        ("medical=32", {"medical": 32}),
        (" medical=32, finance=8 ", {"medical": 32, "finance": 8}),
    ],
)
def test_finish_steps_read_as_one_count_or_per_app(text, expected):
    assert parse_finish_steps(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x", "finish steps must be"),
        ("medical=", "finish steps must be"),
        ("medical=3=4", "finish steps must be"),
        ("medical=-1", "finish_steps of medical"),
        ("-2", "finish_steps of finance"),
        ("bank=3", "unknown apps"),
        ("medical=3,medical=4", "twice"),
    ],
)
def test_bad_finish_steps_are_rejected_with_the_value(text, match):
    with pytest.raises(InputValidationError, match=match):
        parse_finish_steps(text)


def test_finish_plan_gives_every_app_its_count():
    names = ["finance", "medical", "education"]
    assert finish_plan(SuiteSettings(finish_steps=5), names) == dict.fromkeys(names, 5)
    assert finish_plan(SuiteSettings(finish_steps={"medical": 32}), names) == {
        "finance": 0,
        "medical": 32,
        "education": 0,
    }
    assert finish_plan(SuiteSettings(finish_steps={"medical": 32}), ["finance"]) == {"finance": 0}


def test_finishing_is_taken_out_of_each_apps_own_budget():
    settings = SuiteSettings(max_steps=160, finish_steps={"medical": 32})
    finishing = finish_plan(settings, ["finance", "medical", "education"])
    schedule = finish_schedule(settings, {"finance": 27, "medical": 27, "education": 27}, finishing)
    assert schedule == {
        "finance": {"joint": 160, "finish": 0},
        "medical": {"joint": 128, "finish": 32},
        "education": {"joint": 160, "finish": 0},
    }
    for plan in schedule.values():  # every app's task batches add up to its own model's
        assert plan["joint"] + plan["finish"] == 160
    # By epochs: the batches the joint stage gives an app in that many epochs (ceil(2.5 * 10) = 25).
    by_epochs = SuiteSettings(epochs=2.5, finish_steps=5)
    assert finish_schedule(by_epochs, {"medical": 10}, {"medical": 5}) == {
        "medical": {"joint": 20, "finish": 5}
    }
    with pytest.raises(InputValidationError, match="must be below its task batches"):
        finish_schedule(by_epochs, {"medical": 10}, {"medical": 25})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"finish_steps": {"medical": 160}, "max_steps": 160}, "below max_steps"),
        ({"finish_steps": {"bank": 1}}, "unknown apps"),
        ({"finish_steps": {"medical": 1.5}}, "finish_steps of medical"),
    ],
)
def test_bad_per_app_finishing_is_rejected_before_reading_data(tmp_path, changes, match):
    with pytest.raises(InputValidationError, match=match):
        train_suite({"finance": tmp_path / "missing.csv"}, tmp_path / "out", SuiteSettings(**changes))


def test_capped_schedule_spreads_a_smaller_cap_over_the_rounds():
    items = capped_schedule({"a": 10, "m": 8, "e": 10}, interleave=True)
    assert len(items) == 28 and all(len(item) == 1 for item in items)
    rounds_of = {name: [i for i, item in enumerate(items) if item[0][0] == name] for name in "ame"}
    assert [n for _, n in (item[0] for item in items if item[0][0] == "m")] == list(range(8))
    assert rounds_of["m"][0] == 1  # every task is in the first round
    gaps = [b - a for a, b in zip(rounds_of["m"], rounds_of["m"][1:], strict=False)]
    assert max(gaps) <= 6  # never more than one round (three items) skipped in a row
    joint = capped_schedule({"a": 4, "m": 2}, interleave=False)
    assert joint == [[("a", 0), ("m", 0)], [("a", 1)], [("a", 2), ("m", 1)], [("a", 3)]]


def _names(item: dict) -> list:
    ((name, examples),) = item.items()
    return [name, [e["i"] for e in examples]]


def test_capped_dataset_keeps_the_other_tasks_batches_of_the_uncapped_epochs():
    examples = {name: [{"i": i} for i in range(n)] for name, n in (("a", 10), ("m", 7), ("e", 4))}
    sizes = dict.fromkeys(examples, 2)
    plain = RoundRobinDataset(examples, sizes, seed=3, interleave=True)  # 5 rounds an epoch
    uncapped: dict[str, list] = {name: [] for name in examples}
    for epoch in range(3):  # what the Trainer draws over three epochs (reshuffled at each)
        plain.set_epoch(epoch)
        for index in range(len(plain)):
            name, batch = _names(plain[index])
            uncapped[name].append(batch)
    capped = RoundRobinDataset(examples, sizes, seed=3, interleave=True, caps={"a": 15, "m": 11, "e": 15})
    assert len(capped) == 41 and capped.task_batch_counts() == {"a": 15, "m": 11, "e": 15}
    drawn: dict[str, list] = {name: [] for name in examples}
    for index in range(len(capped)):
        name, batch = _names(capped[index])
        drawn[name].append(batch)
    assert drawn["a"] == uncapped["a"] and drawn["e"] == uncapped["e"]  # the same batches, same order
    assert drawn["m"] == uncapped["m"][:11]  # its first 11


def test_caps_must_name_every_task_with_a_positive_count():
    examples = {"a": [{"i": 0}], "b": [{"i": 1}]}
    for caps in ({"a": 2}, {"a": 2, "b": 0}, {"a": 2, "b": 1, "c": 1}, {"a": 2, "b": True}):
        with pytest.raises(InputValidationError, match="caps"):
            RoundRobinDataset(examples, {"a": 1, "b": 1}, caps=caps)


def test_per_app_finishing_gives_each_app_its_own_models_task_batches(suite_run, tmp_path, monkeypatch):
    steps: list[tuple[str, ...]] = []
    forward = MultiTaskModel.forward

    def recording(self, task_batches):
        if self.training:
            steps.append(tuple(task_batches))
        return forward(self, task_batches)

    monkeypatch.setattr(MultiTaskModel, "forward", recording)
    settings = SuiteSettings(
        medical_preset="tiny",
        epochs=1000.0,
        pretrain_epochs=0,
        max_steps=4,
        finish_steps={"medical": 2},
        settle_steps=2,
    )
    summary = train_suite(
        {"finance": suite_run.finance, "medical": suite_run.medical}, tmp_path / "s", settings
    )
    assert steps.count(("finance",)) == 4 and steps.count(("medical",)) == 4  # 4 task batches each
    assert steps[-2:] == [("medical",), ("medical",)]  # medical's last 2 alone
    assert steps[:6] == [("finance",), ("medical",), ("finance",), ("finance",), ("medical",), ("finance",)]
    assert summary["training"]["schedule"] == {
        "finance_joint": 4.0,
        "finance_finish": 0.0,
        "medical_joint": 2.0,
        "medical_finish": 2.0,
    }
    assert "finish_medical" in summary["training"] and "finish_finance" not in summary["training"]
    assert summary["settings"]["finish_steps"] == {"medical": 2}


def test_cli_rejects_bad_finish_steps_before_training(suite_run, tmp_path):
    from tests.apps.suite.conftest import invoke

    result = invoke(
        "--home", suite_run.home, "suite", "train", "--medical", suite_run.medical,
        "--out", tmp_path / "s", "--finish-steps", "bank=3",
    )  # fmt: skip
    assert result.exit_code != 0
    assert "unknown apps" in result.output and "bank" in result.output
    assert not (tmp_path / "s").exists()

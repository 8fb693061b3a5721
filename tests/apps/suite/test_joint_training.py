"""The suite's training changes: relative loss balance, per-app finishing on private parameters, and
aux-free balancing within expert groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import CoreConfig
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel
from core.moe import DomainMoE
from core.multitask import MultiTaskModel, trunk_parameters
from core.train import TaskCollator
from tests.core.test_multitask import _config as multitask_config

GROUPS = {"a": [0, 1], "b": [2, 3]}  # general: 4, 5 (as in tests/core/test_multitask.py)


def _config(**changes) -> CoreConfig:
    return multitask_config(**{"bias_update_rate": 0.1, **changes})


def _batch(domain: int, seed: int, n: int = 6, length: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    examples = [
        {
            "categorical": {"x": rng.integers(2, 10, length)},
            "domain_ids": np.int64(domain),
            "labels": int(rng.integers(0, 2)),
        }
        for _ in range(n)
    ]
    return TaskCollator()(examples)


def _suite(loss_balance: str = "sum") -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(
        {"a": CoreModel(_config()), "b": CoreModel(_config(num_labels=3))}, loss_balance=loss_balance
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finishing_trains_only_the_tasks_own_parameters_and_expert_group():
    suite = _suite()
    before = {name: p.detach().clone() for name, p in suite.named_parameters()}  # shared ones once
    bias_before = [m.expert_bias.clone() for m in suite.tasks["a"].moe_layers()]
    with suite.finishing("a", GROUPS["a"]) as trainable:
        assert all(p.requires_grad for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        suite.train()
        for step in range(3):
            optimizer.zero_grad()
            suite({"a": _batch(0, step)}).loss.backward()
            optimizer.step()
            for moe in suite.tasks["a"].moe_layers():
                moe.update_balance()
    allowed = {id(p) for p in suite.private_parameters("a") + suite.expert_parameters("a", GROUPS["a"])}
    changed = [n for n, p in suite.named_parameters() if not before[n].equal(p.detach())]
    assert any(n.startswith("tasks.a.field_embedder") for n in changed)
    assert any(n.startswith("tasks.a.classifier") for n in changed)
    assert any(".ffn.experts.0." in n or ".ffn.experts.1." in n for n in changed)
    for name, p in suite.named_parameters():
        if id(p) not in allowed:
            assert before[name].equal(p.detach()), f"finishing task 'a' changed {name}"
        assert p.requires_grad, f"{name}: requires_grad not restored"
    # The selection bias moved for the own group only (task b's routing of other experts is unchanged).
    for moe, bias in zip(suite.tasks["a"].moe_layers(), bias_before, strict=True):
        moved = (bias != moe.expert_bias).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(GROUPS["a"])
    assert all(
        m.balance_groups is None and m.balance_global for m in suite.modules() if isinstance(m, DomainMoE)
    )


def test_finishing_leaves_the_shared_trunk_unchanged():
    suite = _suite()
    trunk_before = [p.detach().clone() for p in trunk_parameters(suite.tasks["b"])]
    with suite.finishing("b", GROUPS["b"]) as trainable:
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        for step in range(2):
            optimizer.zero_grad()
            suite({"b": _batch(1, step)}).loss.backward()
            optimizer.step()
    own = {id(p) for p in suite.expert_parameters("b", GROUPS["b"])}
    for before, p in zip(trunk_before, trunk_parameters(suite.tasks["b"]), strict=True):
        assert before.equal(p.detach()) or id(p) in own


def test_relative_balance_weights_each_task_by_mean_loss_over_its_loss():
    batches = {"a": _batch(0, 1), "b": _batch(1, 2)}
    plain, relative = _suite("sum"), _suite("relative")
    with torch.no_grad():
        losses = {n: float(plain.tasks[n](**b).loss) for n, b in batches.items()}
    mean = np.mean(list(losses.values()))
    plain(batches).loss.backward()
    out = relative(batches)
    assert out.loss.item() == pytest.approx(sum(losses.values()), rel=1e-5)  # same value, other gradient
    out.loss.backward()
    for name in ("a", "b"):
        g_plain = plain.tasks[name].classifier.weight.grad
        g_rel = relative.tasks[name].classifier.weight.grad
        torch.testing.assert_close(g_rel, g_plain * (mean / losses[name]), rtol=1e-4, atol=1e-7)


def test_relative_balance_with_one_task_is_the_plain_loss():
    torch.manual_seed(0)
    one = MultiTaskModel({"a": CoreModel(_config())}, loss_balance="relative")
    batch = _batch(0, 3)
    out = one({"a": batch})
    out.loss.backward()
    grad = one.tasks["a"].classifier.weight.grad.clone()
    one.zero_grad()
    one.tasks["a"](**batch).loss.backward()
    torch.testing.assert_close(grad, one.tasks["a"].classifier.weight.grad)


def test_unknown_loss_balance_is_rejected():
    with pytest.raises(ConfigError, match="loss_balance"):
        MultiTaskModel({"a": CoreModel(_config())}, loss_balance="mean")


def test_group_balancing_adds_a_within_group_term_to_the_global_one():
    moe = DomainMoE(_config())
    load = torch.tensor([100, 0, 5, 1, 50, 0])  # global mean 26: only experts 0 and 4 are above it
    moe.expert_load.copy_(load)
    moe.update_balance()
    global_step = [-0.1, 0.1, 0.1, 0.1, -0.1, 0.1]
    assert moe.expert_bias.tolist() == pytest.approx(global_step)
    # Expert 2 (5) and 3 (1) both sit below the global mean: only the group term tells them apart.
    moe.set_balance_groups([[0, 1], [2, 3]])
    moe.expert_load.copy_(load)
    moe.update_balance()
    within = [-0.1, 0.1, -0.1, 0.1, 0.0, 0.0]
    expected = [2 * g + w for g, w in zip(global_step, within, strict=True)]
    assert moe.expert_bias.tolist() == pytest.approx(expected)


def test_group_only_balancing_moves_the_listed_experts_only():
    moe = DomainMoE(_config())
    moe.set_balance_groups([[2, 3]], with_global=False)
    moe.expert_load.copy_(torch.tensor([100, 0, 5, 1, 50, 0]))
    moe.update_balance()
    assert moe.expert_bias.tolist() == pytest.approx([0.0, 0.0, -0.1, 0.1, 0.0, 0.0])


@pytest.mark.parametrize("groups", [[[0, 9]], [[0, 1], [1, 2]]])
def test_invalid_balance_groups_are_rejected(groups):
    with pytest.raises(InputValidationError, match="disjoint expert ids"):
        DomainMoE(_config()).set_balance_groups(groups)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"balance_scope": "x"}, "balance_scope"),
        ({"loss_balance": "x"}, "loss_balance"),
        ({"finish_steps": -1}, "finish_steps"),
    ],
)
def test_invalid_suite_settings_are_rejected_before_reading_data(tmp_path, changes, match):
    from apps.suite.train import SuiteSettings, train_suite

    with pytest.raises(InputValidationError, match=match):
        train_suite({"finance": tmp_path / "missing.csv"}, tmp_path / "out", SuiteSettings(**changes))


def test_interleaved_rounds_give_each_task_its_own_steps_with_the_same_batches():
    from core.multitask import RoundRobinDataset

    examples = {
        "a": [{"i": i} for i in range(10)],  # 4 batches of 3 (the last one short)
        "b": [{"i": i} for i in range(4)],  # 2 batches of 2
    }
    sizes = {"a": 3, "b": 2}
    joint = RoundRobinDataset(examples, sizes, seed=1)
    interleaved = RoundRobinDataset(examples, sizes, seed=1, interleave=True)
    assert len(joint) == 4 and len(interleaved) == 8
    for index in range(len(interleaved)):
        item = interleaved[index]
        (name,) = item
        assert name == ("a", "b")[index % 2]
        assert item[name] == joint[index // 2][name]


@pytest.mark.parametrize(
    ("steps", "apps", "interleave", "expected"), [(5, 3, True, 15), (5, 3, False, 5), (-1, 3, True, -1)]
)
def test_interleaved_step_caps_count_each_apps_batches(steps, apps, interleave, expected):
    from apps.suite.train import trainer_steps

    assert trainer_steps(steps, apps, interleave) == expected


def test_balance_every_k_calls_updates_once_on_the_summed_load():
    moe = DomainMoE(_config())
    moe.set_balance_every(3)
    for load in ([6, 0, 0, 0, 0, 0], [0, 6, 0, 0, 0, 0], [0, 0, 6, 6, 6, 6]):  # one domain per step
        assert moe.expert_bias.abs().sum() == 0  # nothing applied before the third call
        moe.expert_load += torch.tensor(load)  # what forward adds during one step
        moe.update_balance()
    # Summed load [6, 6, 6, 6, 6, 6]: perfectly even, so no expert moves; per step, all would have.
    assert moe.expert_bias.abs().sum() == 0
    assert moe.expert_load.sum() == 0
    with pytest.raises(InputValidationError, match="calls >= 1"):
        moe.set_balance_every(0)

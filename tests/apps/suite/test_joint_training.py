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


def _mixed_load(moe: DomainMoE) -> None:
    """Domain a: 90 assignments on general expert 4; domain b: 10 on general expert 5 (a's batch is 9x b's)."""
    moe.domain_load.zero_()
    moe.domain_load[0, 4] = 90
    moe.domain_load[1, 5] = 10
    moe.expert_load.copy_(moe.domain_load.sum(dim=0))


def test_balance_mix_evens_the_load_for_the_given_domain_mix_not_the_batches():
    moe = DomainMoE(_config())
    moe.set_balance_groups([[4, 5]], with_global=False)
    _mixed_load(moe)
    moe.update_balance()  # default: the batches' mix, 90 against 10 -> expert 5 gains
    assert moe.expert_bias[[4, 5]].tolist() == pytest.approx([-0.1, 0.1])
    # Served equally, each domain puts all its assignments on one expert: 0.5 against 0.5 -> no move.
    moe.expert_bias.zero_()
    moe.set_balance_mix([1.0, 1.0])
    _mixed_load(moe)
    moe.update_balance()
    assert moe.expert_bias.abs().sum() == 0
    # Serving b's tokens 4x as often as a's makes expert 5 the busy one, whatever the batches held.
    moe.set_balance_mix([1.0, 4.0])
    _mixed_load(moe)
    moe.update_balance()
    assert moe.expert_bias[[4, 5]].tolist() == pytest.approx([0.1, -0.1])
    assert moe.domain_load.sum() == 0 and moe.expert_load.sum() == 0


def test_balance_mix_counts_only_the_domains_seen_since_the_last_update():
    moe = DomainMoE(_config())
    moe.set_balance_groups([[4, 5]], with_global=False)
    moe.set_balance_mix([1.0, 100.0])
    moe.domain_load[0, 4], moe.domain_load[0, 5] = 30, 10  # only domain a trained: its own shares decide
    moe.update_balance()
    assert moe.expert_bias[[4, 5]].tolist() == pytest.approx([-0.1, 0.1])


def test_training_forward_keeps_each_domains_load_while_a_mix_is_set():
    torch.manual_seed(0)
    moe = DomainMoE(_config()).train()
    hidden = torch.randn(2, 5, 32)
    domains = torch.tensor([0, 1])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    moe(hidden, domains, mask)
    assert moe.domain_load.sum() == 0  # nothing kept without a mix
    moe.set_balance_mix([1.0, 1.0])
    moe(hidden, domains, mask)
    assert moe.domain_load.sum(dim=1).tolist() == [5 * 2, 3 * 2]  # real tokens x top_k per domain
    assert moe.domain_load.sum(dim=0).tolist() == (moe.expert_load // 2).tolist()
    moe.eval()
    moe(hidden, domains, mask)
    assert moe.domain_load.sum(dim=1).tolist() == [5 * 2, 3 * 2]  # inference does not balance


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_invalid_balance_mix_is_rejected(weights):
    with pytest.raises(InputValidationError, match="non-negative weights"):
        DomainMoE(_config()).set_balance_mix(weights)


def test_task_adamw_with_one_task_is_adamw():
    from core.multitask import TaskAdamW

    torch.manual_seed(0)
    reference, model = CoreModel(_config()), CoreModel(_config())
    model.load_state_dict(reference.state_dict())
    suite = MultiTaskModel({"a": model})
    optimizers = (
        torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False),
        TaskAdamW(suite.parameters(), suite, lr=1e-2, weight_decay=0.1),
    )
    for step in range(3):
        batch = _batch(0, step)
        for optimizer, run in zip(optimizers, (reference, lambda **b: suite({"a": b})), strict=True):
            optimizer.zero_grad()
            run(**batch).loss.backward()
            optimizer.step()
    for expected, got in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected)


def test_task_adamw_keeps_one_moment_state_per_task_on_shared_parameters():
    from core.multitask import TaskAdamW

    suite = _suite()
    optimizer = TaskAdamW(suite.parameters(), suite, lr=1e-2)
    for task, domain in (("a", 0), ("b", 1), ("a", 0)):
        optimizer.zero_grad()
        suite({task: _batch(domain, 0)}).loss.backward()
        optimizer.step()
    shared = trunk_parameters(suite.tasks["a"])[0]
    assert sorted(optimizer.state[shared]) == ["a", "b"]
    assert optimizer.state[shared]["a"]["step"] == 2 and optimizer.state[shared]["b"]["step"] == 1
    private = [list(optimizer.state[p]) for p in suite.private_parameters("b") if optimizer.state[p]]
    assert private and all(keys == ["b"] for keys in private)  # task b's own parameters: one state


def test_task_adamw_needs_a_forward_pass_first():
    from core.multitask import TaskAdamW

    suite = _suite()
    with pytest.raises(ConfigError, match="no forward pass"):
        TaskAdamW(suite.parameters(), suite).step()


def test_data_tokens_count_field_tokens_and_present_ct_patches():
    from apps.suite.train import data_tokens

    config = CoreConfig(volume_patch_size=(4, 8, 8), categorical_fields={"x": 10}, num_labels=2)
    volume = np.zeros((3, 16, 32, 32), dtype=np.float32)  # 4 x 4 x 4 patches
    examples = [
        {"numeric": np.zeros((26, 1)), "volume": volume, "volume_present": True},
        {"numeric": np.zeros((20, 1)), "volume": volume, "volume_present": False},
        {"time_delta": np.zeros(7)},
    ]
    assert data_tokens(examples, config) == 26 + 64 + 20 + 7


def test_a_smaller_task_is_reshuffled_each_time_it_starts_over():
    from core.multitask import RoundRobinDataset

    examples = {"a": [{"i": i} for i in range(60)], "b": [{"i": i} for i in range(12)]}
    dataset = RoundRobinDataset(examples, {"a": 2, "b": 2}, seed=3)  # 30 rounds: five passes over b
    passes = [[tuple(e["i"] for e in dataset[r]["b"]) for r in range(p * 6, p * 6 + 6)] for p in range(5)]
    for batches in passes:
        assert sorted(i for batch in batches for i in batch) == list(
            range(12)
        )  # each pass: every example once
    assert len({tuple(batches) for batches in passes}) > 1  # not the same batches over and over
    again = RoundRobinDataset(examples, {"a": 2, "b": 2}, seed=3)
    assert [again[r]["b"] for r in range(30)] == [dataset[r]["b"] for r in range(30)]  # reproducible


def test_target_moves_a_domains_whole_group_towards_its_share_both_ways():
    moe = DomainMoE(_config())
    moe.set_balance_groups([[0, 1], [2, 3], [4, 5]], with_global=False)
    moe.set_balance_targets({0: ([0, 1], 0.5), 1: ([2, 3], 0.5)})
    moe.domain_load[0, 4], moe.domain_load[0, 0] = 90, 10  # a: 10% on its group (target 50%)
    moe.domain_load[1, 2], moe.domain_load[1, 5] = 60, 40  # b: 60% on its group
    moe.expert_load.copy_(moe.domain_load.sum(dim=0))
    moe.update_balance()
    within = [-0.1, 0.1, -0.1, 0.1, -0.1, 0.1]  # group terms (loads 10/0, 60/0, 90/40)
    target = [0.1, 0.1, -0.1, -0.1, 0.0, 0.0]  # a's group up, b's group down
    expected = [w + t for w, t in zip(within, target, strict=True)]
    assert moe.expert_bias.tolist() == pytest.approx(expected)
    assert moe.domain_load.sum() == 0


def test_suite_balancing_within_groups_sets_each_apps_target():
    from apps.suite.train import _set_balance_scope

    suite = _suite()
    groups = {"finance": [0, 1], "medical": [2, 3]}  # general: 4, 5
    _set_balance_scope(suite, "within", groups, 6)
    moe = next(m for m in suite.modules() if isinstance(m, DomainMoE))
    assert moe.balance_targets == {0: ([0, 1], 0.5), 1: ([2, 3], 0.5)}
    assert not moe.balance_global
    _set_balance_scope(suite, "group", groups, 6)
    assert moe.balance_targets == {} and moe.balance_global


@pytest.mark.parametrize("targets", [{5: ([0], 0.5)}, {0: ([9], 0.5)}, {0: ([], 0.5)}, {0: ([0], 1.5)}])
def test_invalid_balance_targets_are_rejected(targets):
    with pytest.raises(InputValidationError, match="set_balance_targets"):
        DomainMoE(_config()).set_balance_targets(targets)

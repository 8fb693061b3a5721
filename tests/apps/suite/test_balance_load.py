"""Aux-free balancing on the routing the model serves: `serving_load_pass` and `balance_load="serving"`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.suite.train import SuiteSettings, train_suite
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel
from core.moe import DomainMoE, serving_load_pass
from core.multitask import MultiTaskModel
from tests.apps.suite.test_joint_training import _batch as joint_batch
from tests.core.test_multitask import _config


def _batch(domain: int, seed: int, n: int = 8, length: int = 12) -> dict:
    return joint_batch(domain, seed, n=n, length=length)


def _loads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.expert_load.clone() for m in model.modules() if isinstance(m, DomainMoE)]


def _counts(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.domain_expert_counts.clone() for m in model.modules() if isinstance(m, DomainMoE)]


def _suite(balance_load: str, dropout: float = 0.5) -> MultiTaskModel:
    torch.manual_seed(0)
    models = {
        "a": CoreModel(_config(dropout=dropout)),
        "b": CoreModel(_config(dropout=dropout, num_labels=3)),
    }
    return MultiTaskModel(models, balance_load=balance_load)


def test_serving_load_is_the_eval_mode_routing_of_the_training_batch():
    suite = _suite("serving")
    batch = _batch(0, seed=1)
    suite.train()
    suite({"a": batch})
    counted = _loads(suite)
    for moe in suite.modules():
        if isinstance(moe, DomainMoE):
            moe.expert_load.zero_()
    # The same batch routed as served (eval mode) by the plain model counts the same load.
    served = suite.tasks["a"]
    served.eval()
    for moe in served.moe_layers():
        moe.set_balance_load_source("train")
        moe.train()  # count this eval-mode pass: only the MoE blocks in train mode, no dropout elsewhere
    with torch.no_grad():
        served(**batch)
    for got, expected in zip(counted, _loads(served), strict=True):
        assert torch.equal(got, expected)
        assert int(got.sum()) == 2 * 8 * 12 * 1  # top-2 assignments of every real token, once


def test_training_passes_are_not_counted_with_the_serving_source():
    suite = _suite("serving")
    suite.train()
    before = _counts(suite)
    with serving_load_pass(suite.tasks["a"]):
        assert not suite.tasks["a"].training
        suite.tasks["a"](**_batch(0, seed=2))
    assert suite.tasks["a"].training and all(m.training for m in suite.tasks["a"].modules())
    assert all(int(load.sum()) > 0 for load in _loads(suite))
    # The routing statistics keep recording the training passes only.
    for got, expected in zip(_counts(suite), before, strict=True):
        assert torch.equal(got, expected)
    for moe in suite.modules():
        if isinstance(moe, DomainMoE):
            moe.expert_load.zero_()
    suite.tasks["a"](**_batch(0, seed=2))  # a training pass alone
    assert all(int(load.sum()) == 0 for load in _loads(suite))


def test_default_source_counts_training_passes_and_not_serving_passes():
    suite = _suite("train")
    suite.train()
    with serving_load_pass(suite):
        suite.tasks["a"](**_batch(0, seed=3))
    assert all(int(load.sum()) == 0 for load in _loads(suite))
    suite({"a": _batch(0, seed=3)})
    assert all(int(load.sum()) == 2 * 8 * 12 for load in _loads(suite))


def test_dropout_changes_the_training_load_that_the_serving_source_avoids():
    # The cause the serving source addresses: with dropout, training routes tokens elsewhere than serving.
    loads = {}
    for source in ("train", "serving"):
        suite = _suite(source, dropout=0.5)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():  # a router that tells tokens apart (at init the domain prior decides alone)
            for moe in suite.modules():
                if isinstance(moe, DomainMoE):
                    moe.router.weight.copy_(3.0 * torch.randn(moe.router.weight.shape, generator=generator))
        suite.train()
        torch.manual_seed(5)
        suite({"a": _batch(0, seed=4, n=16)})
        loads[source] = _loads(suite)
    assert any(not torch.equal(t, s) for t, s in zip(loads["train"], loads["serving"], strict=True))


def test_unknown_balance_load_is_rejected():
    with pytest.raises(ConfigError, match="balance_load"):
        _suite("validation")
    moe = next(m for m in _suite("train").modules() if isinstance(m, DomainMoE))
    with pytest.raises(InputValidationError, match="set_balance_load_source"):
        moe.set_balance_load_source("eval")


def test_suite_settings_reject_an_unknown_balance_load(tmp_path):
    with pytest.raises(InputValidationError, match="balance_load"):
        train_suite({"finance": tmp_path / "tx.csv"}, tmp_path / "out", SuiteSettings(balance_load="eval"))


# ---------------------------------------------------------------------- settling the bias on served routing


def _moe(n_experts: int = 4) -> DomainMoE:
    config = _config(n_routed_experts=n_experts, domain_expert_groups=None, bias_update_rate=0.03)
    return DomainMoE(config)


def _shares(moe: DomainMoE, logits: torch.Tensor) -> torch.Tensor:
    chosen = (logits + moe.expert_bias).topk(moe.top_k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(chosen, minlength=moe.num_experts).float()
    return counts / counts.sum()


def test_settle_bias_evens_out_the_load_of_a_router_that_prefers_one_expert():
    moe = _moe()
    moe.set_balance_groups([[0, 1, 2, 3]], with_global=False)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 4, generator=generator) + torch.tensor([3.0, 1.0, 0.0, 0.0])  # (N, E)
    router = moe.router.weight.clone()
    before = _shares(moe, logits)
    assert before.min() < 0.1  # top-2 of 4: an even load is 0.25 per expert
    moe.settle_bias(logits)
    after = _shares(moe, logits)
    assert after.min() > 0.22 and after.max() < 0.28, after
    assert torch.equal(moe.router.weight, router)  # only the selection bias moved
    assert moe.bias_update_rate == 0.03 and moe.balance_every == 1
    assert int(moe.expert_load.sum()) == 0 and int(moe.domain_load.sum()) == 0


def test_settle_bias_rejects_bad_input():
    moe = _moe()
    with pytest.raises(InputValidationError, match="router_logits"):
        moe.settle_bias(torch.zeros(5, 3))
    with pytest.raises(InputValidationError, match="domain_ids"):
        moe.settle_bias(torch.zeros(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputValidationError, match="steps"):
        moe.settle_bias(torch.zeros(5, 4), steps=0)


def _examples(domain: int, seed: int, n: int = 24, length: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "categorical": {"x": rng.integers(2, 10, length)},
            "domain_ids": np.int64(domain),
            "labels": int(rng.integers(0, 2)),
        }
        for _ in range(n)
    ]


def _served_loads(suite: MultiTaskModel, examples: dict) -> list[torch.Tensor]:
    """Per layer, the eval-mode assignments per expert of every task's examples."""
    from core.data import collate

    for moe in suite.tasks["a"].moe_layers():
        moe.reset_routing_stats()
    suite.eval()
    with torch.no_grad():
        for name, task_examples in examples.items():
            suite.tasks[name](**collate(task_examples).to_dict())
    return [moe.domain_expert_counts.sum(0).float() for moe in suite.tasks["a"].moe_layers()]


def test_settle_served_balance_evens_the_served_load_and_changes_only_the_bias():
    from core.multitask import settle_served_balance

    suite = _suite("train", dropout=0.1)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a router with strong preferences (an expert idle, one at 2.4x the mean load)
        for moe in suite.tasks["a"].moe_layers():
            moe.router.weight.copy_(0.5 * torch.randn(moe.router.weight.shape, generator=generator))
            moe.domain_prior.weight.zero_()
    examples = {"a": _examples(0, 1), "b": _examples(1, 2)}
    before = _served_loads(suite, examples)
    weights = {k: v.clone() for k, v in suite.state_dict().items() if "expert_bias" not in k}
    suite.train()
    assert settle_served_balance(suite, examples) == 2
    assert suite.training and all(m.training for m in suite.modules())
    for key, value in suite.state_dict().items():
        if "expert_bias" not in key:
            assert torch.equal(value, weights[key]), key
    after = _served_loads(suite, examples)
    for load_before, load_after in zip(before, after, strict=True):
        assert load_after.min() / load_after.mean() > load_before.min() / load_before.mean()
        assert load_before.min() == 0
        assert load_after.min() / load_after.mean() > 0.8


def test_settle_served_balance_needs_examples():
    from core.multitask import settle_served_balance

    with pytest.raises(InputValidationError, match="no examples"):
        settle_served_balance(_suite("train"), {})


def test_suite_settings_reject_negative_settle_steps(tmp_path):
    with pytest.raises(InputValidationError, match="settle_steps"):
        train_suite({"finance": tmp_path / "tx.csv"}, tmp_path / "out", SuiteSettings(settle_steps=-1))


def test_settle_bias_rejects_bad_step_sizes():
    with pytest.raises(InputValidationError, match="final_rate"):
        _moe().settle_bias(torch.zeros(5, 4), start_rate=0.01, final_rate=0.1)


def test_settle_floor_only_lifts_the_experts_below_it():
    moe = _moe()
    moe.set_balance_groups([[0, 1, 2, 3]], with_global=False)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 4, generator=generator) + torch.tensor([3.0, 1.0, 0.0, -3.0])  # (N, E)
    before = _shares(moe, logits)
    assert before[3] < 0.01
    moe.settle_bias(logits, floor=0.04)
    after = _shares(moe, logits)
    assert after[3] >= 0.04 * 0.95  # the last step size leaves it at the floor, up to one step
    assert after[3] < 0.08  # lifted to the floor, not balanced
    assert moe.expert_bias[:2].abs().max() == 0  # the experts above the floor never moved
    assert moe.expert_bias[3] > 0


def test_settle_floor_outside_zero_one_is_rejected(tmp_path):
    with pytest.raises(InputValidationError, match="floor"):
        _moe().settle_bias(torch.zeros(5, 4), floor=1.5)
    with pytest.raises(InputValidationError, match="settle_floor"):
        train_suite({"finance": tmp_path / "tx.csv"}, tmp_path / "out", SuiteSettings(settle_floor=0.0))


def test_settle_resamples_lift_an_expert_whose_share_comes_from_a_few_examples():
    generator = torch.Generator().manual_seed(0)
    n_examples, length = 40, 25
    logits = 0.3 * torch.randn(n_examples * length, 4, generator=generator)  # (N, E)
    logits += torch.tensor([1.0, 1.0, 0.5, -2.0])
    logits[: 4 * length, 3] = 5.0  # only the tokens of 4 of the 40 examples choose expert 3
    examples = torch.arange(n_examples).repeat_interleave(length)  # (N,) the example of every token
    plain, resampled = _moe(), _moe()
    for moe in (plain, resampled):
        moe.set_balance_groups([[0, 1, 2, 3]], with_global=False)
    assert abs(_shares(plain, logits)[3].item() - 0.05) < 1e-6  # above the floor on these examples
    plain.settle_bias(logits, floor=0.04)
    assert plain.expert_bias.abs().max() == 0  # nothing below the floor: nothing moves
    resampled.settle_bias(logits, floor=0.04, example_ids=examples, resamples=200)
    # Resampled, the 4 examples are missing or rare in many draws: expert 3 is lifted until it gets tokens of
    # the other examples too, and only it.
    assert resampled.expert_bias[3] > 0 and resampled.expert_bias[:3].abs().max() == 0
    assert _shares(resampled, logits[4 * length :])[3] > 0.02
    again = _moe()
    again.set_balance_groups([[0, 1, 2, 3]], with_global=False)
    again.settle_bias(logits, floor=0.04, example_ids=examples, resamples=200)
    assert torch.equal(again.expert_bias, resampled.expert_bias)  # fixed resamples: deterministic


def test_settle_resamples_need_example_ids_and_a_quantile_in_zero_one(tmp_path):
    moe = _moe()
    with pytest.raises(InputValidationError, match="example_ids"):
        moe.settle_bias(torch.zeros(5, 4), floor=0.04, resamples=10)
    with pytest.raises(InputValidationError, match="example_ids"):
        moe.settle_bias(torch.zeros(5, 4), floor=0.04, resamples=10, example_ids=torch.zeros(4))
    with pytest.raises(InputValidationError, match="quantile"):
        moe.settle_bias(torch.zeros(5, 4), floor=0.04, quantile=1.0)
    with pytest.raises(InputValidationError, match="settle_resamples"):
        train_suite({"finance": tmp_path / "tx.csv"}, tmp_path / "out", SuiteSettings(settle_resamples=-1))


def test_settle_served_balance_resamples_the_examples_of_every_task():
    from core.multitask import settle_served_balance

    suite = _suite("train", dropout=0.1)
    examples = {"a": _examples(0, 1), "b": _examples(1, 2)}
    seen = []
    original = DomainMoE.settle_bias

    def recording(self, logits, ids=None, **kwargs):
        seen.append((logits.shape[0], ids.clone(), kwargs["example_ids"].clone(), kwargs["resamples"]))
        return original(self, logits, ids, **kwargs)

    weights = {k: v.clone() for k, v in suite.state_dict().items() if "expert_bias" not in k}
    DomainMoE.settle_bias = recording
    try:
        settle_served_balance(suite, examples, steps=20, floor=0.2, resamples=50, batch_size=10)
    finally:
        DomainMoE.settle_bias = original
    assert len(seen) == 2
    for tokens, ids, example_ids, resamples in seen:
        assert resamples == 50 and tokens == 48 * 12 == example_ids.shape[0]
        # 24 examples of task a (domain 0), then 24 of task b, 12 tokens each, in batches of 10
        assert torch.equal(example_ids, torch.arange(48).repeat_interleave(12))
        assert torch.equal(ids, torch.tensor([0, 1]).repeat_interleave(24 * 12))
    for key, value in suite.state_dict().items():
        if "expert_bias" not in key:
            assert torch.equal(value, weights[key]), key

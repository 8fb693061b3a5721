"""Tests of DomainMoE (routing, sorted dispatch, balancing, statistics) and the router balancing loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from core.config import CoreConfig
from core.errors import InputValidationError
from core.losses import load_balancing_loss
from core.moe import DenseFFN, DomainMoE, MoEBalanceCallback, SwiGLU, update_all_balance


def _config(tiny_config: CoreConfig, **overrides: object) -> CoreConfig:
    return CoreConfig(**{**tiny_config.to_diff_dict(), **overrides})


def _naive_moe(moe: DomainMoE, hidden_states: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
    """Reference: every token through the shared experts plus its own top-k experts, one token at a time."""
    batch_size, seq_len, hidden_size = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden_size)  # (N, H)
    topk_idx, topk_weight, _, _ = moe.route(flat, domain_ids.reshape(-1))
    rows = []
    for token in range(flat.shape[0]):
        x = flat[token : token + 1]  # (1, H)
        row = moe.shared_experts(x) if moe.shared_experts is not None else torch.zeros_like(x)
        for slot in range(moe.top_k):
            row = row + topk_weight[token, slot] * moe.experts[int(topk_idx[token, slot])](x)
        rows.append(row)
    return torch.cat(rows).reshape(batch_size, seq_len, hidden_size)  # (B, T, H)


@pytest.fixture
def moe(tiny_config: CoreConfig) -> DomainMoE:
    return DomainMoE(tiny_config)


# ---------------------------------------------------------------------------- shapes and routing


def test_output_shape_and_router_logits_include_domain_prior(moe: DomainMoE) -> None:
    with torch.no_grad():
        moe.domain_prior.weight.copy_(torch.randn_like(moe.domain_prior.weight))
    hidden_states = torch.randn(2, 5, 32)
    domain_ids = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 0, 0, 0]])

    output, router_logits = moe(hidden_states, domain_ids)

    assert output.shape == (2, 5, 32)
    assert router_logits.shape == (10, 3)
    expected = moe.router(hidden_states.reshape(10, 32)) + moe.domain_prior.weight[domain_ids.reshape(-1)]
    torch.testing.assert_close(router_logits, expected)


def test_router_weights_sum_to_one_and_respect_top_k(moe: DomainMoE) -> None:
    topk_idx, topk_weight, router_logits, probs = moe.route(torch.randn(40, 32), torch.randint(0, 2, (40,)))

    assert topk_idx.shape == topk_weight.shape == (40, moe.top_k)
    torch.testing.assert_close(topk_weight.sum(-1), torch.ones(40))
    assert (topk_weight >= 0).all()
    assert all(len(set(row)) == moe.top_k for row in topk_idx.tolist())
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, router_logits.float().softmax(-1))


def test_selection_bias_steers_choice_but_not_combine_weights(moe: DomainMoE) -> None:
    hidden_states = torch.randn(30, 32)
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0]))  # expert 2 wins every selection

    topk_idx, topk_weight, _, probs = moe.route(hidden_states)

    assert (topk_idx == 2).any(dim=-1).all()
    chosen = probs.gather(1, topk_idx)  # (N, k) unbiased probabilities of the chosen experts
    torch.testing.assert_close(topk_weight, chosen / chosen.sum(-1, keepdim=True))


def test_domain_ids_per_sequence_broadcast_over_tokens(moe: DomainMoE) -> None:
    with torch.no_grad():
        moe.domain_prior.weight.copy_(torch.randn_like(moe.domain_prior.weight))
    hidden_states = torch.randn(3, 4, 32)
    per_sequence = torch.tensor([1, 0, 1])

    out_sequence, logits_sequence = moe(hidden_states, per_sequence)
    out_token, logits_token = moe(hidden_states, per_sequence[:, None].expand(3, 4))
    out_none, _ = moe(hidden_states)
    out_zero, _ = moe(hidden_states, torch.zeros(3, 4, dtype=torch.long))

    torch.testing.assert_close(out_sequence, out_token)
    torch.testing.assert_close(logits_sequence, logits_token)
    torch.testing.assert_close(out_none, out_zero)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain_ids": torch.zeros(2, 3, dtype=torch.long)}, "domain_ids must be"),
        ({"domain_ids": torch.tensor([0, 2])}, r"in \[0, num_domains=2\)"),
        ({"domain_ids": torch.zeros(2, 5)}, "integer ids"),
        ({"attention_mask": torch.ones(2, 4, dtype=torch.bool)}, "attention_mask must be"),
    ],
)
def test_invalid_inputs_raise_input_validation_error(moe: DomainMoE, kwargs: dict, match: str) -> None:
    with pytest.raises(InputValidationError, match=match):
        moe(torch.randn(2, 5, 32), **kwargs)


def test_hidden_states_of_wrong_shape_raise(moe: DomainMoE) -> None:
    with pytest.raises(InputValidationError, match="hidden_size=32"):
        moe(torch.randn(10, 32))


def test_dense_ffn_is_a_swiglu_of_dense_width(tiny_config: CoreConfig) -> None:
    ffn = DenseFFN(tiny_config.hidden_size, tiny_config.dense_ffn_size)

    assert isinstance(ffn, SwiGLU)
    assert ffn.w1.weight.shape == (tiny_config.dense_ffn_size, 32)
    assert ffn(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    assert all(linear.bias is None for linear in (ffn.w1, ffn.w2, ffn.w3))


# ---------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("n_shared_experts", [0, 1, 2])
def test_sorted_dispatch_equals_naive_per_token_loop(tiny_config: CoreConfig, n_shared_experts: int) -> None:
    moe = DomainMoE(_config(tiny_config, n_routed_experts=5, n_shared_experts=n_shared_experts))
    with torch.no_grad():
        moe.domain_prior.weight.copy_(torch.randn_like(moe.domain_prior.weight))
    hidden_states = torch.randn(3, 7, 32)
    domain_ids = torch.randint(0, 2, (3, 7))

    output, _ = moe(hidden_states, domain_ids)

    torch.testing.assert_close(output, _naive_moe(moe, hidden_states, domain_ids), rtol=1e-5, atol=1e-5)


def test_each_expert_runs_once_on_its_tokens_and_unselected_experts_not_at_all(moe: DomainMoE) -> None:
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, -100.0]))  # far below any logit: expert 2 is never chosen
    rows_seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for expert_id, expert in enumerate(moe.experts):
        expert.register_forward_hook(
            lambda module, args, output, expert_id=expert_id: rows_seen[expert_id].append(args[0].shape[0])
        )

    moe(torch.randn(4, 6, 32))

    # top_k=2 of the two remaining experts: each runs exactly once, on the 24 tokens, never on all N * E.
    assert rows_seen == {0: [24], 1: [24], 2: []}


# ---------------------------------------------------------------------------- balancing


def test_update_balance_applies_the_sign_rule_and_resets_the_load(tiny_config: CoreConfig) -> None:
    moe = DomainMoE(_config(tiny_config, bias_update_rate=0.1))
    moe.expert_load.copy_(torch.tensor([5, 1, 3]))  # mean 3

    moe.update_balance()

    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.1, 0.1, 0.0]))
    assert moe.expert_load.sum() == 0


def test_load_is_counted_only_in_training_with_aux_free_balance(tiny_config: CoreConfig) -> None:
    hidden_states = torch.randn(2, 5, 32)
    aux_free = DomainMoE(tiny_config)
    aux_free.eval()
    aux_free(hidden_states)
    assert aux_free.expert_load.sum() == 0
    aux_free.train()
    aux_free(hidden_states)
    assert aux_free.expert_load.sum() == 2 * 5 * 2

    for balance in ("aux_loss", "none"):
        moe = DomainMoE(_config(tiny_config, balance=balance))
        moe.expert_load.fill_(4)
        moe(hidden_states)
        moe.update_balance()
        assert moe.expert_load.sum() == 3 * 4
        assert moe.expert_bias.abs().sum() == 0


def test_aux_free_bias_moves_skewed_load_toward_uniform(tiny_config: CoreConfig) -> None:
    moe = DomainMoE(_config(tiny_config, n_routed_experts=8, bias_update_rate=0.05))
    with torch.no_grad():
        # A strong router preference for experts 0 and 1: every token picks them.
        moe.domain_prior.weight[0] = torch.tensor([4.0, 4.0, 0, 0, 0, 0, 0, 0])
    moe.train()
    hidden_states = torch.randn(8, 16, 32)

    def max_load_share() -> float:
        load = moe.expert_load.float()
        return float(load.max() / load.sum())

    shares = []
    with torch.no_grad():
        for _ in range(100):
            moe(hidden_states)
            shares.append(max_load_share())
            moe.update_balance()

    assert shares[0] == pytest.approx(0.5)  # top-2 on experts 0 and 1 only
    assert max(shares[-20:]) < 0.2  # uniform is 1/8
    assert moe.expert_bias[:2].max() < moe.expert_bias[2:].min()


def test_domain_prior_routes_each_domain_to_its_own_experts(tiny_config: CoreConfig) -> None:
    # Two domains with opposite linear targets and identically distributed inputs: only the domain prior
    # tells them apart, so the task is solvable only if each domain is routed to experts of its own.
    config = _config(tiny_config, hidden_size=16, ffn_size=16, n_routed_experts=4, n_shared_experts=0)
    moe = DomainMoE(config)
    target_map = torch.randn(16, 16) / 4.0
    domain_sign = torch.tensor([1.0, -1.0])
    domain_ids = torch.arange(16) % 2  # one domain per sequence

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = torch.randn(16, 16, 16)
        return hidden_states, domain_sign[domain_ids, None, None] * hidden_states @ target_map.T

    def mass_share() -> np.ndarray:
        moe.eval()
        moe.reset_routing_stats()
        with torch.no_grad():
            moe(batch()[0], domain_ids)
        moe.train()
        return moe.routing_stats()["mass_share"]  # (D, E) each domain's router probability mass per expert

    before = mass_share()
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        hidden_states, target = batch()
        output, _ = moe(hidden_states, domain_ids)
        loss = (output - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moe.update_balance()
        losses.append(loss.item())
    after = mass_share()

    # The prior starts at zero: both domains see the same routing distribution.
    assert 0.5 * np.abs(before[0] - before[1]).sum() < 0.1
    # After training, each domain owns experts (it routes more mass to them than the other domain does)
    # and sends most of its mass to them: the two domains use mostly disjoint sets of experts.
    owner = after.argmax(axis=0)  # (E,)
    for d in range(2):
        assert (owner == d).any()
        assert after[d][owner == d].sum() >= 0.65  # chance level is about 0.5
    assert 0.5 * np.abs(after[0] - after[1]).sum() > 0.5  # total-variation distance, 0 at the start
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


# ---------------------------------------------------------------------------- statistics and padding


def test_routing_stats_count_assignments_and_mass_per_domain(moe: DomainMoE) -> None:
    domain_ids = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    moe(torch.randn(2, 4, 32), domain_ids)
    stats = moe.routing_stats()

    assert stats["counts"].shape == stats["mass"].shape == (2, 3)
    np.testing.assert_array_equal(stats["tokens"], [3, 5])
    np.testing.assert_array_equal(stats["counts"].sum(axis=1), [3 * 2, 5 * 2])
    np.testing.assert_allclose(stats["mass"].sum(axis=1), [3.0, 5.0], rtol=1e-5)
    np.testing.assert_allclose(stats["count_share"].sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(stats["mass_share"].sum(axis=1), [1.0, 1.0], rtol=1e-5)

    moe.track_routing = False
    moe(torch.randn(2, 4, 32), domain_ids)
    np.testing.assert_array_equal(moe.routing_stats()["counts"], stats["counts"])
    moe.reset_routing_stats()
    assert moe.routing_stats()["counts"].sum() == 0
    np.testing.assert_array_equal(moe.routing_stats()["count_share"], np.zeros((2, 3)))


def test_padding_is_not_routed_counted_or_leaking_into_real_tokens(moe: DomainMoE) -> None:
    moe.train()
    hidden_states = torch.randn(2, 6, 32)
    domain_ids = torch.tensor([0, 1])
    attention_mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    other_padding = hidden_states.clone()
    other_padding[0, 4:] = 100.0 * torch.randn(2, 32)

    output, router_logits = moe(hidden_states, domain_ids, attention_mask)
    output_other, _ = moe(other_padding, domain_ids, attention_mask)
    alone, _ = moe(hidden_states[:1, :4], domain_ids[:1])

    torch.testing.assert_close(output[attention_mask], output_other[attention_mask])
    torch.testing.assert_close(output[0, :4], alone[0])
    torch.testing.assert_close(output[0, 4:], moe.shared_experts(hidden_states[0, 4:]))
    assert router_logits.shape == (12, 3)
    stats = moe.routing_stats()
    # Three forwards: (4 + 6) + (4 + 6) + 4 real tokens, 2 assignments each; padding never counted.
    np.testing.assert_array_equal(stats["tokens"], [4 + 4 + 4, 6 + 6])
    np.testing.assert_allclose(stats["mass"].sum(axis=1), [12.0, 12.0], rtol=1e-5)
    assert int(moe.expert_load.sum()) == (10 + 10 + 4) * 2


def test_routing_state_is_saved_but_the_step_load_is_not(moe: DomainMoE) -> None:
    keys = set(moe.state_dict())
    assert {"expert_bias", "domain_expert_counts", "domain_expert_mass"} <= keys
    assert "expert_load" not in keys
    assert moe.domain_prior.weight.abs().sum() == 0


# ---------------------------------------------------------------------------- training hooks


def test_balance_callback_updates_every_moe_layer(tiny_config: CoreConfig, tmp_path) -> None:
    config = _config(tiny_config, bias_update_rate=0.5)
    model = torch.nn.ModuleDict({"layer0": DomainMoE(config), "layer1": DomainMoE(config)})
    for moe in model.values():
        moe.expert_load.copy_(torch.tensor([6, 0, 3]))
    callback = MoEBalanceCallback()

    callback.on_step_end(
        TrainingArguments(output_dir=str(tmp_path), report_to=[]),
        TrainerState(),
        TrainerControl(),
        model=model,
    )

    for moe in model.values():
        torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.5, 0.5, 0.0]))
        assert moe.expert_load.sum() == 0
    assert update_all_balance(model) == 2
    assert update_all_balance(torch.nn.Linear(2, 2)) == 0


def test_gradients_reach_router_domain_prior_and_experts(moe: DomainMoE) -> None:
    hidden_states = torch.randn(4, 8, 32)
    domain_ids = torch.tensor([0, 1, 0, 1])
    output, router_logits = moe(hidden_states, domain_ids)
    loss = output.pow(2).mean() + load_balancing_loss(router_logits, moe.top_k, moe.num_experts)
    loss.backward()

    assert moe.router.weight.grad.abs().sum() > 0
    assert (moe.domain_prior.weight.grad.abs().sum(dim=1) > 0).all()  # both domains' rows
    stats = moe.routing_stats()
    for expert_id, expert in enumerate(moe.experts):
        if stats["counts"][:, expert_id].sum() > 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())
    assert all(p.grad.abs().sum() > 0 for p in moe.shared_experts.parameters())


# ---------------------------------------------------------------------------- balancing loss


def _cyclic_logits(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """Token i strongly prefers experts i, i+1, ..., i+k-1 (mod E): a perfectly balanced routing."""
    logits = torch.zeros(num_tokens, num_experts)
    for token in range(num_tokens):
        for slot in range(top_k):
            logits[token, (token + slot) % num_experts] = 10.0
    return logits


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_is_one_for_uniform_routing_and_larger_when_skewed(top_k: int) -> None:
    uniform = load_balancing_loss(_cyclic_logits(16, 4, top_k), top_k, 4)
    skewed_logits = torch.zeros(16, 4)
    skewed_logits[:, :top_k] = 10.0
    skewed = load_balancing_loss(skewed_logits, top_k, 4)

    assert uniform.item() == pytest.approx(1.0, abs=1e-3)
    assert skewed.item() == pytest.approx(4 / top_k, abs=1e-3)
    assert skewed > uniform


def test_load_balancing_loss_is_nonnegative_and_matches_hf_up_to_top_k() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    layers = (torch.randn(12, 5), torch.randn(12, 5) * 3)
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])

    for mask in (None, attention_mask):
        ours = load_balancing_loss(layers, 2, 5, attention_mask=mask)
        hf = mixtral.load_balancing_loss_func(layers, num_experts=5, top_k=2, attention_mask=mask)
        assert ours >= 0
        torch.testing.assert_close(ours * 2, hf.float())


def test_load_balancing_loss_ignores_padding_and_validates_shapes() -> None:
    logits = _cyclic_logits(8, 4, 2)
    padded = torch.cat([logits, torch.zeros(4, 4)])  # (12, E): 4 padding rows that would skew the routing
    mask = torch.tensor([[True] * 8 + [False] * 4])

    torch.testing.assert_close(
        load_balancing_loss(padded, 2, 4, attention_mask=mask), load_balancing_loss(logits, 2, 4)
    )
    assert load_balancing_loss(padded, 2, 4, attention_mask=torch.zeros(1, 12, dtype=torch.bool)) == 0
    with pytest.raises(InputValidationError, match="attention_mask has 8 tokens"):
        load_balancing_loss(padded, 2, 4, attention_mask=mask[:, :8])
    with pytest.raises(InputValidationError, match="num_experts=3"):
        load_balancing_loss(padded, 2, 3)


def test_bf16_model_keeps_float32_balancing_state(tiny_config: CoreConfig) -> None:
    moe = DomainMoE(_config(tiny_config, bias_update_rate=1e-3)).to(torch.bfloat16)
    moe.expert_bias.fill_(0.5)  # at 0.5, bf16 would round a 1e-3 step away
    moe.train()

    output, router_logits = moe(torch.randn(2, 5, 32, dtype=torch.bfloat16), torch.tensor([0, 1]))
    moe.update_balance()

    assert output.dtype == router_logits.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == moe.domain_expert_mass.dtype == torch.float32
    assert moe.router.weight.dtype == torch.bfloat16
    assert (moe.expert_bias != 0.5).any()


def test_autocast_forward_and_backward_run_in_mixed_precision(moe: DomainMoE) -> None:
    hidden_states = torch.randn(2, 5, 32, requires_grad=True)
    attention_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = moe(hidden_states, torch.tensor([0, 1]), attention_mask)
    output.float().sum().backward()

    assert output.shape == (2, 5, 32)
    assert torch.isfinite(hidden_states.grad).all()


@pytest.mark.parametrize("n_shared_experts", [0, 1])
def test_grouped_gemm_dispatch_equals_the_per_expert_loop(
    tiny_config: CoreConfig, n_shared_experts: int
) -> None:
    # The grouped path (used on CUDA in bf16) must give the loop's outputs and gradients, padding included.
    config = CoreConfig(**{**tiny_config.to_dict(), "n_shared_experts": n_shared_experts})
    moe = DomainMoE(config)
    torch.manual_seed(3)
    hidden = torch.randn(3, 9, config.hidden_size, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 1:] = False
    domains = torch.randint(0, config.num_domains, (3, 9))
    params = [hidden, moe.router.weight, *(e.w1.weight for e in moe.experts), moe.experts[-1].w2.weight]
    results = {}
    for mode in ("loop", "grouped"):
        moe.dispatch = mode
        out, _ = moe(hidden, domains, mask)
        results[mode] = (
            out,
            torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), params),
        )
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], atol=1e-5, rtol=1e-5)
    for grouped_grad, loop_grad in zip(results["grouped"][1], results["loop"][1], strict=True):
        assert torch.isfinite(grouped_grad).all()
        torch.testing.assert_close(grouped_grad, loop_grad, atol=1e-5, rtol=1e-5)

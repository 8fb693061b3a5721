"""The learned per-head recency bias of DynamicAttention (`CoreConfig.recency_bias`)."""

from __future__ import annotations

import pytest
import torch

from core.attention import DynamicAttention
from core.config import CoreConfig
from core.errors import ConfigError
from core.model import CoreModel
from tests.core.test_attention import make_attention as causal_or_not_attention
from tests.core.test_attention import padding_mask


def make_attention(recency_bias: bool = True, top_k_blocks: int = 1, **overrides) -> DynamicAttention:
    attention = causal_or_not_attention(True, top_k_blocks, recency_bias=recency_bias, **overrides)
    if recency_bias:
        with torch.no_grad():  # slopes far from their start, so that a missing bias would show
            attention.recency_slope.normal_(std=1.0)
    return attention


def test_recency_bias_needs_causal_attention() -> None:
    with pytest.raises(ConfigError, match="recency_bias"):
        CoreConfig(hidden_size=32, num_heads=4, recency_bias=True, causal=False)


def test_recency_bias_off_adds_no_parameter_and_keeps_outputs() -> None:
    plain = make_attention(recency_bias=False)
    biased = make_attention(recency_bias=True)
    assert plain.recency_slope is None
    assert set(biased.state_dict()) - set(plain.state_dict()) == {"recency_slope"}
    with torch.no_grad():  # softplus(-1e4) == 0: no decay, so the old attention exactly
        biased.load_state_dict({**plain.state_dict(), "recency_slope": torch.full((4,), -1e4)})
    hidden, mask = torch.randn(3, 21, 32), padding_mask()
    for force_dense in (True, False):
        expected, _ = plain(hidden, mask, force_dense=force_dense)
        got, _ = biased(hidden, mask, force_dense=force_dense)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_recency_bias_changes_the_output() -> None:
    attention = make_attention()
    hidden = torch.randn(2, 21, 32)
    biased, _ = attention(hidden, force_dense=True)
    with torch.no_grad():
        attention.recency_slope.fill_(-1e4)
    flat, _ = attention(hidden, force_dense=True)
    assert (biased - flat).abs().max() > 1e-3


def test_attention_decays_with_distance_at_each_heads_slope() -> None:
    attention = make_attention()
    with torch.no_grad():
        attention.q_proj.weight.zero_()  # every logit 0 but the bias: weights are exp(-slope * distance)
    _, trace = attention(torch.randn(1, 9, 32), force_dense=True, output_attentions=True)
    weights = trace.attention_weights[0, :, -1]  # (H, T): the last query over every key
    slopes = torch.nn.functional.softplus(attention.recency_slope)
    expected = torch.softmax(-slopes[:, None] * torch.arange(8, -1, -1.0), dim=-1)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_block_sparse_with_every_block_kept_equals_dense(padded: bool) -> None:
    attention = make_attention(top_k_blocks=10)
    hidden = torch.randn(3, 21, 32)
    mask = padding_mask() if padded else None
    valid = mask if mask is not None else torch.ones(3, 21, dtype=torch.bool)
    dense, dense_trace = attention(hidden, mask, force_dense=True, output_attentions=True)
    sparse, sparse_trace = attention(hidden, mask, force_dense=False, output_attentions=True)
    assert not sparse_trace.is_dense
    torch.testing.assert_close(sparse[valid], dense[valid], atol=1e-5, rtol=1e-5)
    rows = valid[:, None, :, None].expand(-1, 4, -1, 21)
    torch.testing.assert_close(
        sparse_trace.attention_weights[rows], dense_trace.attention_weights[rows], atol=1e-5, rtol=0
    )


def test_per_row_position_ids_set_the_distances() -> None:
    attention = make_attention(top_k_blocks=10)
    hidden = torch.randn(2, 12, 32)
    shifted = torch.arange(12)[None].expand(2, -1) + torch.tensor([[0], [5]])  # (B, T): offsets cancel
    expected, _ = attention(hidden, force_dense=True)
    for force_dense in (True, False):
        got, _ = attention(hidden, position_ids=shifted, force_dense=force_dense)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("force_dense", [False, True])
def test_recency_bias_keeps_attention_causal(force_dense: bool) -> None:
    attention = make_attention(top_k_blocks=1)
    hidden = torch.randn(1, 24, 32)
    changed = hidden.clone()
    changed[:, 17:] = torch.randn(1, 7, 32)
    before, trace = attention(hidden, force_dense=force_dense, output_attentions=True)
    after, _ = attention(changed, force_dense=force_dense)
    torch.testing.assert_close(before[:, :17], after[:, :17])
    future = torch.ones(24, 24, dtype=torch.bool).triu(1)
    assert (trace.attention_weights[0][:, future] == 0).all()


@pytest.mark.parametrize("force_dense", [False, True])
def test_gradients_flow_to_the_recency_slopes(force_dense: bool) -> None:
    attention = make_attention(top_k_blocks=1).train()
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 27:] = False
    out, trace = attention(torch.randn(2, 32, 32), mask, force_dense=force_dense)
    assert trace.is_dense == force_dense
    out.pow(2).mean().backward()
    grad = attention.recency_slope.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager FlexAttention on CPU warns it is slow
@pytest.mark.parametrize("padded", [False, True])
def test_flex_backend_applies_the_same_bias(padded: bool) -> None:
    gather = make_attention(top_k_blocks=1)
    flex = make_attention(top_k_blocks=1, attention_backend="flex")
    flex.load_state_dict(gather.state_dict())
    hidden = torch.randn(3, 21, 32)
    mask = padding_mask() if padded else None
    valid = mask if mask is not None else torch.ones(3, 21, dtype=torch.bool)
    with torch.no_grad():  # FlexAttention has no CPU backward; the CUDA test below covers gradients
        expected, _ = gather(hidden, mask, force_dense=False)
        got, _ = flex(hidden, mask, force_dense=False)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_model_with_recency_bias_saves_and_loads(tmp_path, tiny_config) -> None:
    config = CoreConfig(**{**tiny_config.to_dict(), "causal": True, "recency_bias": True})
    model = CoreModel(config).eval()
    slopes = [layer.attention.recency_slope for layer in model.layers]
    expected = torch.nn.functional.softplus(slopes[0]).detach()
    torch.testing.assert_close(expected, 2.0 ** (-8.0 * torch.arange(1, 5) / 4))  # ALiBi's start
    model.save_pretrained(tmp_path)
    loaded = CoreModel.from_pretrained(tmp_path).eval()
    assert loaded.config.recency_bias
    for before, after in zip(model.layers, loaded.layers, strict=True):
        torch.testing.assert_close(after.attention.recency_slope, before.attention.recency_slope)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_compiled_flex_matches_gather_forward_and_slope_gradients_on_cuda(padded: bool) -> None:
    gather = make_attention(top_k_blocks=1, dense_below_gpu=0).cuda().train()
    flex = make_attention(top_k_blocks=1, dense_below_gpu=0, attention_backend="flex").cuda().train()
    flex.load_state_dict(gather.state_dict())
    gather.config.attention_backend = "gather"
    hidden = torch.randn(3, 256, 32, device="cuda")
    mask = torch.ones(3, 256, dtype=torch.bool, device="cuda")
    if padded:
        mask[1, 200:] = False
    gather.dropout = flex.dropout = 0.0
    outputs = []
    for attention in (gather, flex):
        out, trace = attention(hidden, mask, force_dense=False)
        assert not trace.is_dense
        out[mask].pow(2).mean().backward()
        outputs.append((out[mask].detach(), attention.recency_slope.grad.clone()))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=1e-4, rtol=1e-3)


def test_head_pruning_keeps_the_slopes_of_the_kept_heads(tiny_config) -> None:
    from core.compress import PrunePlan, apply_plan

    config = CoreConfig(
        **{**tiny_config.to_dict(), "causal": True, "recency_bias": True, "categorical_fields": {"item": 10}}
    )
    model = CoreModel(config).eval()
    with torch.no_grad():
        model.layers[0].attention.recency_slope.normal_()
        model.layers[0].attention.o_proj.weight[:, 8:16] = 0.0  # head 1 of layer 0 contributes nothing
    plan = PrunePlan.identity(model)
    plan.heads[0] = [0, 2, 3]
    pruned = apply_plan(model, plan)
    kept = model.layers[0].attention.recency_slope[[0, 2, 3]]
    torch.testing.assert_close(pruned.layers[0].attention.recency_slope, kept)
    inputs = {"categorical": {"item": torch.randint(2, 10, (2, 12))}}
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(**inputs).hidden_states, model(**inputs).hidden_states, atol=1e-5, rtol=1e-5
        )

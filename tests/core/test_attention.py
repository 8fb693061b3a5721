"""Contract tests of DynamicAttention: dense equivalence, masking, selection, gate gradients, backends."""

from __future__ import annotations

import pytest
import torch

from core.attention import DynamicAttention, attention_flop_counter
from core.config import CoreConfig


def make_attention(causal: bool, top_k_blocks: int, **overrides) -> DynamicAttention:
    config = CoreConfig(
        hidden_size=32,
        num_heads=4,
        num_layers=2,
        block_size=4,
        top_k_blocks=top_k_blocks,
        dense_below=0,
        dense_tail_layers=0,
        causal=causal,
        **overrides,
    )
    attention = DynamicAttention(config).eval()
    with torch.no_grad():
        # A non-trivial gate so that selection differs from plain pooled similarity.
        attention.gating_factor.normal_(std=0.5)
    return attention


def padding_mask() -> torch.Tensor:
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[1, 15:] = False
    mask[2, 3:] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_all_blocks_kept_equals_dense_sdpa(causal: bool, padded: bool) -> None:
    attention = make_attention(causal, top_k_blocks=10)
    hidden = torch.randn(3, 21, 32)
    mask = padding_mask() if padded else None
    dense, dense_trace = attention(hidden, mask, force_dense=True, output_attentions=True)
    sparse, sparse_trace = attention(hidden, mask, force_dense=False, output_attentions=True)
    assert dense_trace.is_dense and not sparse_trace.is_dense
    valid = mask if mask is not None else torch.ones(3, 21, dtype=torch.bool)
    torch.testing.assert_close(sparse[valid], dense[valid], atol=1e-5, rtol=1e-5)
    weights_valid = valid[:, None, :, None].expand(-1, 4, -1, 21)
    torch.testing.assert_close(
        sparse_trace.attention_weights[weights_valid],
        dense_trace.attention_weights[weights_valid],
        atol=1e-5,
        rtol=0,
    )


def test_dense_below_sequence_length_is_exactly_dense() -> None:
    config = CoreConfig(
        hidden_size=32, num_heads=4, num_layers=2, block_size=4, dense_below=64, dense_tail_layers=0
    )
    attention = DynamicAttention(config).eval()
    hidden = torch.randn(2, 40, 32)
    out, trace = attention(hidden)
    assert trace.is_dense
    forced, _ = attention(hidden, force_dense=True)
    assert torch.equal(out, forced)


def test_dense_tail_layers_always_run_dense() -> None:
    config = CoreConfig(
        hidden_size=32, num_heads=4, num_layers=3, block_size=4, dense_below=0, dense_tail_layers=1
    )
    assert not DynamicAttention(config, layer_idx=1).use_dense(64, torch.device("cpu"))
    assert DynamicAttention(config, layer_idx=2).use_dense(64, torch.device("cpu"))


@pytest.mark.parametrize("causal", [False, True])
def test_each_query_block_keeps_own_block_plus_top_k(causal: bool) -> None:
    attention = make_attention(causal, top_k_blocks=2)
    _, trace = attention(torch.randn(2, 32, 32), output_attentions=True)
    indices = trace.block_indices  # (B, H, N, 3)
    n_blocks = 8
    assert indices.shape == (2, 4, n_blocks, 3)
    assert torch.equal(indices[..., 0], torch.arange(n_blocks).expand(2, 4, -1))
    for block in range(n_blocks):
        picks = indices[:, :, block, 1:]
        valid = picks[picks >= 0]
        assert not (valid == block).any(), "the own block is never picked twice"
        if causal:
            assert (valid < block).all(), "causal selection never picks a future block"
            assert ((picks >= 0).sum(-1) == min(2, block)).all()
        else:
            assert (picks >= 0).all()
    # Keys outside the kept blocks get exactly zero attention.
    weights = trace.attention_weights  # (B, H, T, T)
    kept = torch.zeros(2, 4, n_blocks, n_blocks, dtype=torch.bool)
    kept.scatter_(-1, indices.clamp_min(0), True)
    kept_tokens = kept.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    assert (weights[~kept_tokens] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 32))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("force_dense", [False, True])
def test_queries_never_attend_to_padding_or_future(causal: bool, force_dense: bool) -> None:
    attention = make_attention(causal, top_k_blocks=2)
    mask = padding_mask()
    _, trace = attention(torch.randn(3, 21, 32), mask, force_dense=force_dense, output_attentions=True)
    weights = trace.attention_weights  # (B, H, T, T)
    for row in range(3):
        real = mask[row]
        w = weights[row][:, real][:, :, ~real]  # real queries x padded keys
        assert (w == 0).all()
        if causal:
            future = torch.ones(21, 21, dtype=torch.bool).triu(1)
            assert (weights[row][:, future & real[:, None]] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_does_not_change_real_positions(causal: bool) -> None:
    attention = make_attention(causal, top_k_blocks=1)
    hidden = torch.randn(1, 13, 32)
    alone, _ = attention(hidden, force_dense=False)
    padded_hidden = torch.cat([hidden, torch.randn(1, 7, 32)], dim=1)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[:, :13] = True
    padded, _ = attention(padded_hidden, mask, force_dense=False)
    torch.testing.assert_close(padded[:, :13], alone, atol=1e-5, rtol=1e-5)


def test_causal_output_ignores_later_tokens() -> None:
    attention = make_attention(True, top_k_blocks=1)
    hidden = torch.randn(1, 24, 32)
    changed = hidden.clone()
    changed[:, 17:] = torch.randn(1, 7, 32)
    a, _ = attention(hidden, force_dense=False)
    b, _ = attention(changed, force_dense=False)
    torch.testing.assert_close(a[:, :17], b[:, :17])


def test_gradients_flow_to_the_gate() -> None:
    attention = make_attention(False, top_k_blocks=1).train()
    hidden = torch.randn(2, 32, 32, requires_grad=True)
    out, trace = attention(hidden, force_dense=False)
    assert not trace.is_dense
    out.pow(2).mean().backward()
    for name in ("gating_factor", "q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight"):
        grad = attention.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_output_gate_is_a_sigmoid_per_head() -> None:
    attention = make_attention(False, top_k_blocks=1)
    with torch.no_grad():
        attention.gate_proj.weight.zero_()
        attention.gate_proj.bias.fill_(-1e4)
    out, _ = attention(torch.randn(1, 16, 32))
    assert torch.allclose(out, torch.zeros_like(out))


def test_no_output_gate_when_disabled() -> None:
    attention = make_attention(False, top_k_blocks=1, output_gate=False)
    assert attention.gate_proj is None
    assert attention(torch.randn(1, 16, 32))[0].shape == (1, 16, 32)


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager (uncompiled) FlexAttention on CPU warns it is slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_backend_matches_gather_backend(causal: bool, padded: bool) -> None:
    gather = make_attention(causal, top_k_blocks=1)
    flex = make_attention(causal, top_k_blocks=1, attention_backend="flex")
    flex.load_state_dict(gather.state_dict())
    hidden = torch.randn(3, 21, 32)
    mask = padding_mask() if padded else None
    valid = mask if mask is not None else torch.ones(3, 21, dtype=torch.bool)
    with torch.no_grad():
        expected, _ = gather(hidden, mask, force_dense=False)
        got, _ = flex(hidden, mask, force_dense=False)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_block_sparse_attention_flops_shrink_with_selection() -> None:
    config = CoreConfig(
        hidden_size=256, num_heads=4, block_size=128, top_k_blocks=1, dense_below=0, dense_tail_layers=0
    )
    attention = DynamicAttention(config).eval()
    q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))
    with torch.no_grad(), attention_flop_counter() as sparse_counter:
        attention._block_sparse(q, k, v, None, False)
    with torch.no_grad(), attention_flop_counter() as dense_counter:
        attention._dense(q, k, v, None, False)
    ratio = sparse_counter.get_total_flops() / dense_counter.get_total_flops()
    # own block + 1 of 8 blocks = 25% of the score/value products, plus the gate's block-level scores.
    assert 0.25 <= ratio <= 0.30


def test_rejects_nothing_silently_on_all_padding_rows() -> None:
    attention = make_attention(True, top_k_blocks=1)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :5] = True
    out, _ = attention(torch.randn(2, 12, 32), mask, force_dense=False)
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_without_full_blocks_gives_the_same_attention(causal: bool) -> None:
    # Declaring every kept block partial only costs speed: the element mask alone must give the same output.
    from core.attention import flex_sparse_attention

    attention = make_attention(causal, top_k_blocks=1)
    bs = attention.block_size
    q, k, v = (torch.randn(2, attention.num_heads, 4 * bs, attention.head_dim) for _ in range(3))
    outputs = [
        flex_sparse_attention(q, k, v, None, attention.gating_factor, bs, 1, causal, full_blocks=full)[0]
        for full in (True, False)
    ]
    expected, _ = attention._block_sparse(q, k, v, None, False)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0], expected, atol=1e-5, rtol=1e-5)


def test_auto_backend_is_gather_on_cpu_and_flex_on_cuda() -> None:
    attention = make_attention(False, top_k_blocks=1)
    assert attention.backend(torch.device("cpu")) == "gather"
    assert attention.backend(torch.device("cuda")) == "flex"
    with torch.no_grad():  # no longer inference-only: training on CUDA takes the flex backend too
        assert attention.backend(torch.device("cuda")) == "flex"

"""DynamicAttention: gated block-selection attention that really skips work on long sequences.

Keys and values are cut into blocks of `block_size` tokens. Per head, a gate scores each query block
against each key block (mean-pooled queries against mean-pooled keys plus a learnable `gating_factor`
projection). Each query block keeps its own block plus the `top_k_blocks` best-scoring allowed blocks;
only those K/V blocks are gathered and fed to one fused `scaled_dot_product_attention` call (CPU and
fallback), or turned into a FlexAttention block mask (CUDA). Below `dense_below` tokens, and in the last
`dense_tail_layers` layers, exact dense attention runs instead. A sigmoid output gate per head follows.
With `recency_bias`, every path adds `-slope_h * (i - j)` to the logit of query i and key j: a learned
per-head decay with distance (ALiBi with learned slopes; AKT's monotonic attention in additive form).

The top-k choice is discrete; the gate learns through a straight-through factor: each query block's
output is multiplied by `m / m.detach()`, where `m` is the gate probability mass of the kept blocks.
The factor is exactly 1 in the forward pass (so outputs equal dense attention when every block is kept)
and its gradient rewards the gate for putting mass on blocks whose attention output reduces the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from core.config import CoreConfig


@dataclass(frozen=True)
class AttentionTrace:
    """What one attention call did, for explanations and tests.

    Attributes:
        is_dense: True when the exact dense path ran.
        block_indices: (B, H, n_blocks, 1 + top_k) key-block indices per query block, own block first;
            -1 marks a slot with no allowed block (causal start, padding). None on the dense path.
        gate_scores: (B, H, n_blocks, n_blocks) gate logits (before masking). None on the dense path.
        attention_weights: (B, H, T, T) attention probabilities (zeros outside the kept blocks), only
            when requested.
    """

    is_dense: bool
    block_indices: torch.Tensor | None = None
    gate_scores: torch.Tensor | None = None
    attention_weights: torch.Tensor | None = None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) over the flattened token order."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin of shape (T, D) (or (B, T, D) for per-row positions)."""
        # Frequencies are recomputed (D/2 numbers) rather than kept in a non-persistent buffer, which
        # transformers' meta-device loading would leave uninitialised.
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)  # (D/2,)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, D) by cos/sin of shape (T, D) or (B, T, D)."""
    if torch.compiler.is_exporting():
        # ONNX's RotaryEmbedding (opset 23): one ONNX Runtime kernel instead of six element-wise ops.
        from torch.onnx.ops import rotary_embedding

        batch, _, length, dim = x.shape
        half = dim // 2  # cos = cat([c, c]): the op takes c
        cos_half = cos[..., :half].expand(batch, length, half)  # (B, T, D/2)
        sin_half = sin[..., :half].expand(batch, length, half)
        return rotary_embedding(x, cos_half, sin_half)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    return x * cos + _rotate_half(x) * sin


def attention_flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` that also counts the CPU fused SDPA kernel (PyTorch registers only GPU ones)."""

    def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops},
    )


def initial_recency_slopes(num_heads: int) -> torch.Tensor:
    """(H,) raw slope parameters whose softplus is ALiBi's geometric slopes 2^(-8 (h + 1) / H).

    The heads start from a spread of ranges (the first one mostly looks at the last few answers, the last
    one almost uniformly back to the start of the window) and training moves each slope.
    """
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)  # (H,)
    return slopes + torch.log(-torch.expm1(-slopes))  # softplus^-1(slopes)


def recency_logits(slopes: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Additive logits `-slope_h * max(distance, 0)` for slopes (H,) and distances (B|1, H|1, ...).

    Keys ahead of the query (negative distance) get 0 here; causality masks them separately.
    """
    shape = (1, -1) + (1,) * (distance.dim() - 2)
    return -slopes.view(shape) * distance.clamp_min(0)


# ---------------------------------------------------------------------- block selection (stateless)
def select_blocks(q, k, key_valid, gating_factor, block_size: int, top_k_blocks: int, causal: bool):
    """Score key blocks per query block and keep the own block plus the top-k allowed ones.

    Returns:
        gate_scores (B, H, N, N), allowed (B|1, 1, N, N) bool, selected (B, H, N, S) long with
        S = 1 + k, and pick_valid (B, H, N, S) bool.
    """
    if torch.compiler.is_exporting():
        q_pool, k_pool, block_has_keys = _export_pools(q, k, key_valid, block_size, causal)
        return select_pooled_blocks(q_pool, k_pool, block_has_keys, gating_factor, top_k_blocks, causal)
    batch, heads, padded_len, dim = q.shape
    bs = block_size
    n_blocks = padded_len // bs
    q_blocks = q.view(batch, heads, n_blocks, bs, dim)  # (B, H, N, bs, D)
    k_blocks = k.view(batch, heads, n_blocks, bs, dim)
    if key_valid is None:
        q_pool = q_blocks.mean(dim=3)  # (B, H, N, D)
        k_pool = k_blocks.mean(dim=3)
        block_has_keys = torch.ones(1, n_blocks, dtype=torch.bool, device=q.device)
    else:
        weight = key_valid.view(batch, 1, n_blocks, bs, 1).to(q.dtype)  # (B, 1, N, bs, 1)
        count = weight.sum(dim=3).clamp_min(1.0)  # (B, 1, N, 1)
        q_pool = (q_blocks * weight).sum(dim=3) / count  # (B, H, N, D)
        k_pool = (k_blocks * weight).sum(dim=3) / count
        block_has_keys = key_valid.view(batch, n_blocks, bs).any(dim=-1)  # (B, N)
    if causal:
        q_pool = causal_query_pool(q, key_valid, block_size)
    return select_pooled_blocks(q_pool, k_pool, block_has_keys, gating_factor, top_k_blocks, causal)


def select_pooled_blocks(q_pool, k_pool, block_has_keys, gating_factor, top_k_blocks: int, causal: bool):
    """`select_blocks` from the pooled queries and keys (B, H, N, D) and `block_has_keys` (B|1, N) bool."""
    batch, heads, n_blocks, dim = q_pool.shape
    device = q_pool.device
    k_gate = k_pool + torch.einsum("bhnd,hde->bhne", k_pool, gating_factor.to(k_pool.dtype))  # (B, H, N, D)
    gate_scores = (q_pool @ k_gate.transpose(-1, -2)) / math.sqrt(dim)  # (B, H, N, N)

    allowed = block_has_keys[:, None, None, :].expand(-1, 1, n_blocks, -1)  # (B|1, 1, N, N)
    if causal:
        allowed = allowed & torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()
    eye = torch.eye(n_blocks, dtype=torch.bool, device=device)
    # Scores for choosing among the *other* blocks: the own block is always kept separately.
    neg = torch.finfo(gate_scores.dtype).min
    others = gate_scores.masked_fill(~allowed | eye, neg)
    top_k = min(top_k_blocks, n_blocks - 1)
    top_values, top_idx = others.topk(top_k, dim=-1)  # (B, H, N, k)
    own = torch.arange(n_blocks, device=device).view(1, 1, n_blocks, 1).expand(batch, heads, -1, 1)
    selected = torch.cat([own, top_idx], dim=-1)  # (B, H, N, S)
    pick_valid = torch.cat([torch.ones_like(own, dtype=torch.bool), top_values > neg / 2], dim=-1)
    return gate_scores, allowed, selected, pick_valid


def _export_pools(q, k, key_valid, block_size: int, causal: bool):
    """`select_blocks`' pooled queries and keys (B, H, N, D) and `block_has_keys` (B|1, N) as exported: each
    pool is a weighted sum over the tokens, one (N, Tp) x (Tp, D) MatMul per head, instead of the masked
    block sums and `causal_query_pool`'s cumulative sums (element-wise passes over all of q and k in ONNX
    Runtime). The same weights, so the same pools up to the order of float additions."""
    padded_len = q.shape[2]
    n_blocks = padded_len // block_size
    tokens = torch.arange(padded_len, device=q.device)  # (Tp,)
    blocks = torch.arange(n_blocks, device=q.device)[:, None]  # (N, 1)
    weight = (
        torch.ones(1, 1, padded_len, dtype=q.dtype, device=q.device)
        if key_valid is None
        else key_valid[:, None, :].to(q.dtype)
    )  # (B|1, 1, Tp)
    in_block = (tokens // block_size == blocks).to(q.dtype) * weight  # (B|1, N, Tp)

    def pool(members: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        count = members.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (B|1, N, 1)
        return (members / count)[:, None] @ x  # (B|1, 1, N, Tp) @ (B, H, Tp, D) -> (B, H, N, D)

    if causal:  # `causal_query_pool`: the `block_size` queries ending at each block's first token
        window = (tokens <= blocks * block_size) & (tokens > (blocks - 1) * block_size)  # (N, Tp)
        q_pool = pool(window.to(q.dtype) * weight, q)
    else:
        q_pool = pool(in_block, q)
    block_has_keys = in_block.sum(dim=-1) > 0  # (B|1, N)
    return q_pool, pool(in_block, k), block_has_keys


def causal_query_pool(q, key_valid, block_size: int):
    """(B, H, N, D) mean of the `block_size` queries ending at each block's first token.

    A block mean would let a block's later tokens steer the selection used by its earlier tokens
    (look-ahead); this window only holds tokens at or before the first query of the block.
    """
    batch, heads, padded_len, dim = q.shape
    bs = block_size
    weight = (
        torch.ones(1, 1, padded_len, 1, dtype=q.dtype, device=q.device)
        if key_valid is None
        else key_valid.view(batch, 1, padded_len, 1).to(q.dtype)
    )  # (B|1, 1, Tp, 1)
    zero = q.new_zeros(1, 1, 1, 1)
    q_cum = torch.cat(
        [zero.expand(batch, heads, 1, dim), (q * weight).cumsum(dim=2)], dim=2
    )  # (B, H, Tp+1, D)
    w_cum = torch.cat([zero.expand(weight.shape[0], 1, 1, 1), weight.cumsum(dim=2)], dim=2)
    end = torch.arange(0, padded_len, bs, device=q.device) + 1  # one past each block's first token
    start = (end - bs).clamp_min(0)
    q_sum = q_cum[:, :, end] - q_cum[:, :, start]  # (B, H, N, D)
    count = (w_cum[:, :, end] - w_cum[:, :, start]).clamp_min(1.0)
    return q_sum / count


def straight_through(gate_scores, allowed, selected, pick_valid):
    """(B, H, N) factor equal to 1 whose gradient flows into the gate scores."""
    # Softmax in float32: the gate scores of long sequences span a wide range.
    logits = gate_scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)  # (B, H, N, N)
    kept = (probs.gather(-1, selected) * pick_valid).sum(dim=-1)  # (B, H, N)
    return (kept / kept.detach().clamp_min(1e-12)).to(gate_scores.dtype)


def build_block_mask(
    selected,
    pick_valid,
    key_valid,
    block_size: int,
    causal: bool,
    padded_len: int,
    full_blocks: bool = True,
    exact_mask: bool = True,
):
    """The FlexAttention `BlockMask` of a selection (the CUDA backend).

    Blocks that need no element mask (other kept blocks without padding) are declared "full", so
    the kernel skips `mask_mod` there; the own block (causal diagonal) and padded blocks are partial.

    Args:
        full_blocks: declare the blocks that need no element mask as "full" (False: every kept block is
            partial and evaluates `mask_mod`).
        exact_mask: the element mask also checks that the key block was kept. Needed where the mask is
            evaluated on every element (eager FlexAttention on CPU); the fused CUDA kernel only visits the
            listed blocks, so there the mask only has to state causality and padding, and capturing no
            tensor made from the selection lets the whole gate-select-attend step compile as one graph.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs = block_size
    n_blocks = padded_len // bs

    def ordered(slots_valid, slots):
        # Kept blocks first in ascending order, padded to N columns (the layout BlockMask expects);
        # entries beyond the count are ignored by the kernel.
        key = torch.where(slots_valid, slots, slots.new_full((), n_blocks))
        key = F.pad(key, (0, n_blocks - key.shape[-1]), value=n_blocks)
        indices = key.sort(dim=-1).values.clamp_max(n_blocks - 1).to(torch.int32)  # (B, H, N, N)
        return indices, slots_valid.sum(-1).to(torch.int32)

    if not full_blocks:
        part_idx, part_num = ordered(pick_valid, selected)
        full_idx, full_num = None, None
    elif key_valid is None and not causal:
        full_idx, full_num = ordered(pick_valid, selected)
        part_idx, part_num = full_idx, torch.zeros_like(full_num)
    elif key_valid is None:
        full_idx, full_num = ordered(pick_valid[..., 1:], selected[..., 1:])
        part_idx, part_num = ordered(pick_valid[..., :1], selected[..., :1])
    else:
        part_idx, part_num = ordered(pick_valid, selected)
        full_idx, full_num = None, None

    # The element mask states the full semantics (kept block, causal, padding); the block lists above
    # only let the fused kernel skip work. Eager (CPU) FlexAttention evaluates the mask alone.
    kept = None
    if exact_mask:
        kept = torch.zeros(*selected.shape[:3], n_blocks, dtype=torch.bool, device=selected.device).scatter(
            -1, torch.where(pick_valid, selected, selected[..., :1]), True
        )  # (B, H, N, N)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx == kv_idx  # a padded query still attends to itself: no empty rows
        allowed = kept[b, h, q_idx // bs, kv_idx // bs] if kept is not None else q_idx >= 0
        if causal:
            allowed = allowed & (q_idx >= kv_idx)
        if key_valid is not None:
            allowed = allowed & key_valid[b, kv_idx]
        return ok | allowed

    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(padded_len, padded_len),
    )


def select_and_gate(q, k, key_valid, gating_factor, block_size: int, top_k_blocks: int, causal: bool):
    """Selection plus the straight-through factor: (gate_scores, factor (B, H, N), selected, pick_valid)."""
    gate_scores, allowed, selected, pick_valid = select_blocks(
        q, k, key_valid, gating_factor, block_size, top_k_blocks, causal
    )
    return gate_scores, straight_through(gate_scores, allowed, selected, pick_valid), selected, pick_valid


_COMPILED: dict[str, object] = {}


def _compiled(name: str, fn):
    """`fn` under torch.compile, built once per process."""
    if name not in _COMPILED:
        # One graph per (length, causal, dtype, padding) combination; past the default limit of 8,
        # dynamo would silently fall back to the unfused kernel that materialises every score.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _flex_sparse(
    q,
    k,
    v,
    key_valid,
    gating_factor,
    block_size: int,
    top_k_blocks: int,
    causal: bool,
    full_blocks: bool,
    exact_mask: bool,
    slopes=None,
    positions=None,
):
    """Gate, selection, block mask and FlexAttention as one function (compiled as one graph on CUDA).

    With `slopes` (H,) and `positions` (B, Tp), a `score_mod` adds the recency bias to every score.
    """
    from torch.nn.attention.flex_attention import flex_attention

    gate_scores, factor, selected, pick_valid = select_and_gate(
        q, k, key_valid, gating_factor, block_size, top_k_blocks, causal
    )
    batch, heads, padded_len, dim = q.shape
    block_mask = build_block_mask(
        selected, pick_valid, key_valid, block_size, causal, padded_len, full_blocks, exact_mask
    )
    score_mod = None
    if slopes is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            distance = (positions[b, q_idx] - positions[b, kv_idx]).clamp_min(0)
            return score - slopes[h] * distance

    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, H, Tp, D)
    out = out.view(batch, heads, -1, block_size, dim) * factor[..., None, None]  # (B, H, N, bs, D)
    return out.view(batch, heads, padded_len, dim), gate_scores, selected, pick_valid


def flex_sparse_attention(
    q,
    k,
    v,
    key_valid,
    gating_factor,
    block_size: int,
    top_k_blocks: int,
    causal: bool,
    compiled: bool = False,
    full_blocks: bool = True,
    slopes=None,
    positions=None,
):
    """Gate, selection and FlexAttention over the selected blocks (the CUDA backend; eager on CPU).

    Compiled (CUDA), the whole step is one graph: selection, the `BlockMask` built from the kept block
    lists and the fused kernel, whose `mask_mod` only states causality and padding (it captures no tensor
    made inside the graph, which the fused kernel would not see). Eager (CPU), FlexAttention evaluates
    the element mask on every position, so the mask also states which blocks were kept. `slopes` (H,)
    and `positions` (B, Tp) float add the recency bias through a `score_mod`.

    Returns:
        out (B, H, Tp, D) (already scaled by the straight-through factor), gate_scores (B, H, N, N),
        selected (B, H, N, S), pick_valid (B, H, N, S).
    """
    step = _compiled("flex_sparse", _flex_sparse) if compiled else _flex_sparse
    return step(
        q,
        k,
        v,
        key_valid,
        gating_factor,
        block_size,
        top_k_blocks,
        causal,
        full_blocks,
        not compiled,
        slopes,
        positions,
    )


class DynamicAttention(nn.Module):
    """Gated block-selection multi-head self-attention with a sigmoid output gate.

    Args:
        config: reads hidden_size, num_heads, block_size, top_k_blocks, dense_below(_gpu),
            dense_tail_layers, num_layers, output_gate, causal, attention_backend, position_encoding,
            rope_theta, recency_bias, dropout.
        layer_idx: index of the layer; the last `dense_tail_layers` layers always run dense.
    """

    def __init__(self, config: CoreConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        # Head pruning (`core.compress`) keeps `heads_in_layer` heads of size `config.head_dim`.
        self.num_heads = config.heads_in_layer(layer_idx)
        self.head_dim = config.head_dim
        self.block_size = config.block_size
        self.top_k_blocks = config.top_k_blocks
        self.causal = config.causal
        self.always_dense = layer_idx >= config.num_layers - config.dense_tail_layers
        hidden = config.hidden_size
        inner = self.num_heads * self.head_dim  # = hidden unless heads were pruned
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        # Per-head projection added to the mean-pooled keys; zero-initialised so the gate starts as plain
        # pooled-query x pooled-key similarity and learns to depart from it.
        self.gating_factor = nn.Parameter(torch.zeros(self.num_heads, config.head_dim, config.head_dim))
        self.gate_proj = nn.Linear(hidden, self.num_heads, bias=True) if config.output_gate else None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.rope_theta)
            if config.position_encoding == "rope"
            else None
        )
        # Learned per-head recency slopes (softplus keeps them >= 0, so attention can only decay with
        # distance); None without `recency_bias`.
        self.recency_slope = (
            nn.Parameter(initial_recency_slopes(self.num_heads)) if config.recency_bias else None
        )
        self.dropout = config.dropout

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool = False,
        force_dense: bool | None = None,
    ) -> tuple[torch.Tensor, AttentionTrace]:
        """Attend over a sequence.

        Args:
            hidden_states: (B, T, hidden) input states.
            attention_mask: (B, T) bool or 0/1, True/1 for real tokens; None means no padding.
            position_ids: (T,) or (B, T) positions for RoPE and the recency bias; default 0..T-1.
            output_attentions: also return the (B, H, T, T) attention probabilities in the trace.
            force_dense: True/False overrides the dense-or-sparse decision (benchmarks, tests).

        Returns:
            (hidden_states, trace): attended states of shape (B, T, hidden) and an `AttentionTrace`.
        """
        batch, length, _ = hidden_states.shape
        if torch.compiler.is_exporting() and (
            self.use_dense(length, hidden_states.device) if force_dense is None else force_dense
        ):
            return self._dense_export(hidden_states, attention_mask, position_ids, output_attentions)
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        # q, k, v: (B, H, T, D)
        if position_ids is None and (self.rotary is not None or self.recency_slope is not None):
            position_ids = torch.arange(length, device=hidden_states.device)
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_valid = None if attention_mask is None else attention_mask.to(torch.bool)  # (B, T)
        # (Under torch.export the mask is kept: an all-True mask gives the same result without a host sync.)
        if key_valid is not None and not torch.compiler.is_exporting() and bool(key_valid.all()):
            key_valid = None

        positions = None
        if self.recency_slope is not None:
            positions = position_ids.to(torch.float32).reshape(-1, length)  # (B|1, T)

        use_dense = self.use_dense(length, hidden_states.device) if force_dense is None else force_dense
        if use_dense:
            out, trace = self._dense(q, k, v, key_valid, output_attentions, positions)
        else:
            out, trace = self._block_sparse(q, k, v, key_valid, output_attentions, positions)

        if self.gate_proj is not None:
            gate = torch.sigmoid(self.gate_proj(hidden_states))  # (B, T, H)
            out = out * gate.transpose(1, 2).unsqueeze(-1)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out), trace

    def use_dense(self, length: int, device: torch.device) -> bool:
        """Whether a sequence of `length` tokens takes the exact dense path on `device`."""
        threshold = self.config.dense_below_gpu if device.type == "cuda" else self.config.dense_below
        n_blocks = math.ceil(length / self.block_size)
        # Keeping every block is dense attention with extra gathering: run the dense kernel instead.
        return self.always_dense or length < threshold or n_blocks <= 1 + self.top_k_blocks

    def backend(self, device: torch.device) -> str:
        """The sparse backend used on `device`: "flex" (FlexAttention block mask) or "gather".

        "auto" picks FlexAttention on CUDA (gate, selection, block mask and kernel compiled as one graph;
        forward and backward match the gather backend, bench/gpu_flex_check.py) and gather elsewhere.
        """
        if self.config.attention_backend == "auto":
            return "flex" if device.type == "cuda" else "gather"
        return self.config.attention_backend

    # ------------------------------------------------------------------ dense path
    def _recency_slopes(self) -> torch.Tensor:
        return F.softplus(self.recency_slope.float())  # (H,)

    def _dense(self, q, k, v, key_valid, output_attentions, positions=None):
        dropout = self.dropout if self.training else 0.0
        mask, bias = self._dense_mask(key_valid, positions, q.shape[-2], q.device, q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask if bias is None else bias,
            dropout_p=dropout,
            is_causal=self.causal and mask is None,
        )  # (B, H, T, D)
        weights = self._dense_weights(q, k, mask, bias) if output_attentions else None
        return out, AttentionTrace(is_dense=True, attention_weights=weights)

    def _dense_mask(self, key_valid, positions, length, device, dtype):
        """The dense path's (mask, bias): the boolean mask (B, 1, 1|T, T) of padding and causality, where
        each query sees itself (a padded query whose keys are all padding gets no NaN row), or None; with
        `positions` (recency bias, causal only) also the float mask (B|1, H, T, T) carrying -inf outside it.
        """
        mask = None
        if key_valid is not None:
            mask = key_valid[:, None, None, :]  # (B, 1, 1, T)
            if self.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=device).tril()
            mask = mask | torch.eye(length, dtype=torch.bool, device=device)
        bias = None
        if positions is not None:
            if mask is None:
                mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            distance = positions[:, None, :, None] - positions[:, None, None, :]  # (B|1, 1, T, T)
            bias = recency_logits(self._recency_slopes(), distance).masked_fill(~mask, float("-inf"))
            bias = bias.to(dtype)
        return mask, bias

    def _dense_weights(self, q, k, mask, bias):
        """The attention weights (B, H, T, T) of the dense path for q, k (B, H, T, D), `_dense_mask`'s."""
        length = q.shape[-2]
        if mask is None and self.causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if bias is not None:
            logits = logits + bias
        elif mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits.float(), dim=-1).to(q.dtype)

    def _dense_export(self, hidden_states, attention_mask, position_ids, output_attentions):
        """`forward`'s dense path as exported (torch.export / ONNX): the same arithmetic in the (B, T, H*D)
        layout. ONNX `RotaryEmbedding` and `Attention` take the head count as an attribute, so the graph
        has no head transposes (ONNX Runtime's kernels read that layout directly); the mask is `_dense`'s
        (padding, causality, each query sees itself; the recency bias as a float mask). The attention
        weights of `output_attentions` (explanation graph only) are computed in `_dense`'s 4-D layout."""
        from torch.onnx.ops import attention, rotary_embedding

        batch, length, _ = hidden_states.shape
        heads, dim, device = self.num_heads, self.head_dim, hidden_states.device
        q, k, v = (proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, T, H*D)
        if position_ids is None and (self.rotary is not None or self.recency_slope is not None):
            position_ids = torch.arange(length, device=device)
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids, q.dtype)  # (T, D) or (B, T, D), cos = cat([c, c])
            cos_half = cos[..., : dim // 2].expand(batch, length, dim // 2)  # (B, T, D/2)
            sin_half = sin[..., : dim // 2].expand(batch, length, dim // 2)
            q = rotary_embedding(q, cos_half, sin_half, num_heads=heads)
            k = rotary_embedding(k, cos_half, sin_half, num_heads=heads)
        key_valid = None if attention_mask is None else attention_mask.to(torch.bool)
        positions = None
        if self.recency_slope is not None:
            positions = position_ids.to(torch.float32).reshape(-1, length)  # (B|1, T)
        mask, bias = self._dense_mask(key_valid, positions, length, device, q.dtype)
        out = attention(
            q,
            k,
            v,
            attn_mask=mask if bias is None else bias,
            is_causal=self.causal and mask is None,
            q_num_heads=heads,
            kv_num_heads=heads,
        )[0]  # (B, T, H*D)
        if self.gate_proj is not None:
            gate = torch.sigmoid(self.gate_proj(hidden_states))  # (B, T, H)
            out = (out.view(batch, length, heads, dim) * gate.unsqueeze(-1)).reshape(
                batch, length, heads * dim
            )
        weights = None
        if output_attentions:
            q4, k4 = (t.view(batch, length, heads, dim).transpose(1, 2) for t in (q, k))  # (B, H, T, D)
            weights = self._dense_weights(q4, k4, mask, bias)
        return self.o_proj(out), AttentionTrace(is_dense=True, attention_weights=weights)

    # ------------------------------------------------------------------ block-sparse path
    def _block_sparse(self, q, k, v, key_valid, output_attentions, positions=None):
        batch, heads, length, dim = q.shape
        bs = self.block_size
        n_blocks = math.ceil(length / bs)
        padded_len = n_blocks * bs
        if padded_len != length:
            pad = padded_len - length
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, Tp, D)
            if key_valid is None:
                key_valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
            key_valid = F.pad(key_valid, (0, pad), value=False)  # (B, Tp)
            if positions is not None:  # padded keys are masked; their position is irrelevant
                positions = F.pad(positions, (0, pad))  # (B|1, Tp)
        if positions is not None:
            positions = positions.expand(batch, -1).contiguous()  # (B, Tp)
        slopes = self._recency_slopes() if positions is not None else None

        weights = None
        if self.backend(q.device) == "flex":
            out, gate_scores, selected, pick_valid = flex_sparse_attention(
                q,
                k,
                v,
                key_valid,
                self.gating_factor,
                bs,
                self.top_k_blocks,
                self.causal,
                q.device.type == "cuda",
                slopes=slopes,
                positions=positions,
            )
            if output_attentions:
                weights = self._gathered(
                    q, k, v, key_valid, selected, pick_valid, want_weights=True, positions=positions
                )[1]
        else:
            gate_scores, allowed, selected, pick_valid = select_blocks(
                q, k, key_valid, self.gating_factor, bs, self.top_k_blocks, self.causal
            )
            out, weights = self._gathered(
                q, k, v, key_valid, selected, pick_valid, output_attentions, positions=positions
            )
            # The straight-through factor is exactly 1 in a forward pass; an exported (inference) graph
            # leaves out its softmax and the multiplication of every output.
            if not torch.compiler.is_exporting():
                factor = straight_through(gate_scores, allowed, selected, pick_valid)  # (B, H, N)
                out = (out.view(batch, heads, n_blocks, bs, dim) * factor[..., None, None]).view(
                    batch, heads, padded_len, dim
                )  # (B, H, Tp, D)
        trace_indices = selected.masked_fill(~pick_valid, -1)
        out = out[:, :, :length]  # (B, H, T, D)
        if weights is not None:
            weights = weights[:, :, :length, :length]
        return out, AttentionTrace(
            is_dense=False, block_indices=trace_indices, gate_scores=gate_scores, attention_weights=weights
        )

    def _gathered_mask(self, key_valid, selected, pick_valid, n_slots):
        """(B, H, N, bs, S*bs) bool mask of the gathered keys, or None when every key is visible."""
        batch, heads, n_blocks, _ = selected.shape
        bs = self.block_size
        if key_valid is None and not self.causal and bool(pick_valid.all()):
            return None
        if key_valid is None:
            kv_ok = pick_valid[..., None].expand(-1, -1, -1, -1, bs)  # (B, H, N, S, bs)
        else:
            valid_blocks = key_valid.view(batch, 1, n_blocks, bs).expand(-1, heads, -1, -1)  # (B, H, N, bs)
            idx = selected.reshape(batch, heads, n_blocks * n_slots, 1).expand(-1, -1, -1, bs)
            kv_ok = valid_blocks.gather(2, idx).view(batch, heads, n_blocks, n_slots, bs)
            kv_ok = kv_ok & pick_valid[..., None]  # (B, H, N, S, bs)
        if torch.compiler.is_exporting():
            return self._gathered_mask_export(kv_ok, n_slots)
        mask = kv_ok.reshape(batch, heads, n_blocks, 1, n_slots * bs).expand(-1, -1, -1, bs, -1).clone()
        own = mask[..., :bs]  # (B, H, N, bs, bs) view of slot 0, the own block
        if self.causal:
            own &= torch.ones(bs, bs, dtype=torch.bool, device=mask.device).tril()
        # Each query sees at least itself, so no softmax row is empty (padded queries are discarded).
        own |= torch.eye(bs, dtype=torch.bool, device=mask.device)
        return mask

    def _gathered_mask_export(self, kv_ok, n_slots: int):
        """`_gathered_mask`'s in-place edits of the own block as two broadcast ops (an exported graph would
        turn the slice assignments into full-size ScatterND copies and transposes)."""
        batch, heads, n_blocks, _, bs = kv_ok.shape
        device = kv_ok.device
        keep = torch.ones(bs, n_slots * bs, dtype=torch.bool, device=device)  # (bs, S*bs)
        if self.causal:
            keep = torch.cat([keep[:, :bs].tril(), keep[:, bs:]], dim=-1)
        own = F.pad(torch.eye(bs, dtype=torch.bool, device=device), (0, (n_slots - 1) * bs))  # (bs, S*bs)
        mask = kv_ok.reshape(batch, heads, n_blocks, 1, n_slots * bs)  # (B, H, N, 1, S*bs)
        return (mask & keep) | own  # (B, H, N, bs, S*bs)

    def _gathered(self, q, k, v, key_valid, selected, pick_valid, want_weights, positions=None):
        """Gather the kept K/V blocks and run one fused SDPA call over all query blocks.

        `positions` (B, Tp) float adds the recency bias (the mask becomes a float mask).
        """
        batch, heads, padded_len, dim = q.shape
        bs = self.block_size
        n_blocks = padded_len // bs
        n_slots = selected.shape[-1]
        # index_select of whole (bs, D) blocks copies contiguous rows; an element-wise gather is ~10x slower.
        base = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * n_blocks
        flat = (selected + base).reshape(-1)  # (B*H*N*S,)
        k_sel = k.reshape(batch * heads * n_blocks, bs, dim).index_select(0, flat)  # (B*H*N*S, bs, D)
        v_sel = v.reshape(batch * heads * n_blocks, bs, dim).index_select(0, flat)
        k_sel = k_sel.view(batch * heads, n_blocks, n_slots * bs, dim)  # (B*H, N, S*bs, D)
        v_sel = v_sel.view(batch * heads, n_blocks, n_slots * bs, dim)
        q_blk = q.reshape(batch * heads, n_blocks, bs, dim)  # (B*H, N, bs, D)
        mask = self._gathered_mask(key_valid, selected, pick_valid, n_slots)
        if mask is not None:
            mask = mask.view(batch * heads, n_blocks, bs, n_slots * bs)  # (B*H, N, bs, S*bs)
        key_pos = selected[..., None] * bs + torch.arange(bs, device=q.device)  # (B, H, N, S, bs)
        bias = None
        if positions is not None:  # causal only, so `mask` is set
            key_positions = (
                positions[:, None, :].expand(-1, heads, -1).gather(-1, key_pos.reshape(batch, heads, -1))
            )  # (B, H, N*S*bs)
            distance = positions.view(batch, 1, n_blocks, bs, 1) - key_positions.view(
                batch, heads, n_blocks, 1, n_slots * bs
            )  # (B, H, N, bs, S*bs)
            bias = recency_logits(self._recency_slopes(), distance).view(
                batch * heads, n_blocks, bs, n_slots * bs
            )
            bias = bias.masked_fill(~mask, float("-inf")).to(q.dtype)  # (B*H, N, bs, S*bs)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q_blk, k_sel, v_sel, attn_mask=mask if bias is None else bias, dropout_p=dropout
        )
        out = out.reshape(batch, heads, padded_len, dim)  # (B, H, Tp, D); SDPA may return it strided
        weights = None
        if want_weights:
            logits = (q_blk @ k_sel.transpose(-1, -2)) / math.sqrt(dim)  # (B*H, N, bs, S*bs)
            if bias is not None:
                logits = logits + bias
            elif mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
            key_pos = key_pos.view(batch * heads, n_blocks, 1, n_slots * bs).expand(-1, -1, bs, -1)
            dense = torch.zeros(batch * heads, n_blocks, bs, padded_len, dtype=q.dtype, device=q.device)
            # scatter_add: an invalid slot repeats the own block with zero weight, adding nothing.
            dense.scatter_add_(-1, key_pos, probs)
            weights = dense.view(batch, heads, padded_len, padded_len)
        return out, weights


class ItemRetrieval(nn.Module):
    """Question-aware read-out of a causal history for the next-step head (AKT's knowledge retriever).

    The item to be answered at step t is the query; the final states of steps 0..t are keys and values;
    each head's logits carry a learned recency decay `-slope_h * (t - s)`, so a head can focus on the
    recent answers that resemble the item asked. Scoring a new item only needs the states already
    computed, so every item can be scored after a history in one pass.

    Args:
        config: reads hidden_size, num_heads, next_step_vocab, dropout.
    """

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query = nn.Embedding(config.next_step_vocab, hidden, padding_idx=0)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.recency_slope = nn.Parameter(initial_recency_slopes(self.num_heads))
        self.dropout = config.dropout

    def forward(
        self,
        item_ids: torch.Tensor,
        query_positions: torch.Tensor,
        states: torch.Tensor,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summaries of the history for each queried item.

        Args:
            item_ids: (B, Q) items to predict.
            query_positions: (B, Q) long, the step whose prediction each query serves: it reads the states
                of steps 0..position.
            states: (B, T, hidden) final states of the steps.
            key_valid: (B, T) bool, True for real steps; None means no padding.

        Returns:
            (B, Q, hidden).
        """
        batch, n_queries = item_ids.shape
        length = states.shape[1]
        q = self.q_proj(self.query(item_ids)).view(batch, n_queries, self.num_heads, self.head_dim)
        q = q.transpose(1, 2)  # (B, H, Q, D)
        k = self.k_proj(states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        steps = torch.arange(length, device=states.device)
        distance = (query_positions[:, None, :, None] - steps).to(torch.float32)  # (B, 1, Q, T)
        allowed = distance >= 0
        if key_valid is not None:
            allowed = allowed & key_valid.to(torch.bool)[:, None, None, :]
        # A query always sees its own step (a padded query has no other key): no empty softmax row.
        allowed = allowed | (distance == 0)
        bias = recency_logits(F.softplus(self.recency_slope.float()), distance)  # (B, H, Q, T)
        bias = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)  # (B, H, Q, D)
        out = out.transpose(1, 2).reshape(batch, n_queries, self.num_heads * self.head_dim)  # (B, Q, H*D)
        return self.o_proj(out)

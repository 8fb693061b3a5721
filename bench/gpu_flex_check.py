"""FlexAttention backend against the gather backend on CUDA: outputs and gradients, fp32 and bf16.

For each (causal, padding, dtype, full-block lists on/off) it runs the gate-select-attend step both ways
on the same q, k, v and gate weights and prints the largest differences of the output and of the
gradients of q, k, v and `gating_factor`, and whether anything is not finite. The gather backend in
float32 is the reference; the gather backend in the same dtype is printed too (in bf16, near-tied gate
scores can pick another block than in float32).

    python bench/gpu_flex_check.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.attention import DynamicAttention, flex_sparse_attention
from core.config import CoreConfig


def gather_reference(attention: DynamicAttention, q, k, v, key_valid):
    return attention._block_sparse(q, k, v, key_valid, False)[0]


def run_case(causal: bool, padded: bool, dtype: torch.dtype, full_blocks: bool, head_dim: int) -> dict:
    heads, length, batch, bs = 4, 1024, 2, 128
    config = CoreConfig(
        hidden_size=heads * head_dim,
        num_heads=heads,
        block_size=bs,
        top_k_blocks=1,
        dense_below=0,
        dense_below_gpu=0,
        dense_tail_layers=0,
        num_layers=1,
        causal=causal,
        attention_backend="gather",
    )
    attention = DynamicAttention(config).cuda()
    torch.manual_seed(0)
    with torch.no_grad():
        attention.gating_factor.normal_(0, 0.05)
    base = [torch.randn(batch, heads, length, head_dim, device="cuda") for _ in range(3)]
    key_valid = None
    if padded:
        key_valid = torch.ones(batch, length, dtype=torch.bool, device="cuda")
        key_valid[0, length - 200 :] = False
    grad_out = torch.randn(batch, heads, length, head_dim, device="cuda")

    def grads(fn, cast):
        q, k, v = (t.to(cast).detach().requires_grad_(True) for t in base)
        gating = attention.gating_factor
        gating.grad = None
        out = fn(q, k, v)
        out.backward(grad_out.to(cast))
        return out.float(), [q.grad.float(), k.grad.float(), v.grad.float(), gating.grad.float().clone()]

    ref_out, ref_grads = grads(lambda q, k, v: gather_reference(attention, q, k, v, key_valid), torch.float32)
    same_out, _ = grads(lambda q, k, v: gather_reference(attention, q, k, v, key_valid), dtype)

    def flex(q, k, v):
        out, *_ = flex_sparse_attention(
            q, k, v, key_valid, attention.gating_factor, bs, 1, causal, compiled=True, full_blocks=full_blocks
        )
        return out

    out, got = grads(flex, dtype)
    names = ["q", "k", "v", "gating_factor"]
    row = {
        "causal": causal,
        "padded": padded,
        "dtype": str(dtype).removeprefix("torch."),
        "full_blocks": full_blocks,
        "head_dim": head_dim,
        "out_max_diff": float((out - ref_out).abs().max()),
        "gather_same_dtype_out_max_diff": float((out - same_out).abs().max()),
        "finite": bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in got),
    }
    for name, g, r in zip(names, got, ref_grads, strict=True):
        scale = float(r.abs().max()) or 1.0
        row[f"d{name}_rel"] = float((g - r).abs().max()) / scale
    return row


def main() -> None:
    rows = []
    for causal, padded, dtype, full_blocks, head_dim in itertools.product(
        (False, True), (False, True), (torch.float32, torch.bfloat16), (True, False), (64,)
    ):
        try:
            row = run_case(causal, padded, dtype, full_blocks, head_dim)
        except Exception as error:  # report every case, even one the compiler rejects
            row = {
                "causal": causal,
                "padded": padded,
                "dtype": str(dtype),
                "full_blocks": full_blocks,
                "error": f"{type(error).__name__}: {str(error)[:300]}",
            }
        rows.append(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()

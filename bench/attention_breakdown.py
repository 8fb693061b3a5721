"""Where the GPU time of dynamic attention goes: selection, block-mask building, the FlexAttention kernel.

    python bench/attention_breakdown.py --length 8192 --batch 8

Times (bf16, forward+backward unless named) SDPA, the whole dynamic path, its forward alone, the gate
selection alone, and FlexAttention over a fixed block mask of the same sparsity (no selection), then
prints the top CUDA kernels of the whole dynamic path from the PyTorch profiler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.core_bench import median_time  # noqa: E402
from core.attention import DynamicAttention, flex_sparse_attention, select_blocks  # noqa: E402
from core.config import CoreConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    config = CoreConfig(causal=args.causal, attention_backend="flex")
    attention = DynamicAttention(config).to(device=device, dtype=torch.bfloat16)
    shape = (args.batch, config.num_heads, args.length, config.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    rows = {}

    rows["sdpa fwd+bwd"] = median_time(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal).backward(grad),
        args.repeats,
        device,
    )
    rows["dynamic fwd+bwd"] = median_time(
        lambda: attention._block_sparse(q, k, v, None, False)[0].backward(grad),
        args.repeats,
        device,
        warmup=3,
    )
    graphed = torch.compile(flex_sparse_attention, mode="reduce-overhead", dynamic=False)
    rows["dynamic fwd+bwd, CUDA graphs (reduce-overhead)"] = median_time(
        lambda: graphed(
            q, k, v, None, attention.gating_factor, config.block_size, config.top_k_blocks, args.causal
        )[0].backward(grad),
        args.repeats,
        device,
        warmup=5,
    )
    with torch.no_grad():
        rows["dynamic fwd (no grad)"] = median_time(
            lambda: attention._block_sparse(q, k, v, None, False), args.repeats, device, warmup=3
        )
        selection = torch.compile(select_blocks, dynamic=False)
        rows["selection only (compiled)"] = median_time(
            lambda: selection(
                q, k, None, attention.gating_factor, config.block_size, config.top_k_blocks, args.causal
            ),
            args.repeats,
            device,
            warmup=3,
        )

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_blocks = args.length // config.block_size
    kept = 1 + config.top_k_blocks

    def fixed_mask(b, h, q_idx, kv_idx):
        # Own block plus the previous `top_k` blocks: the same sparsity, no gate.
        q_block, kv_block = q_idx // config.block_size, kv_idx // config.block_size
        return (q_block - kv_block >= 0) & (q_block - kv_block < kept)

    block_mask = create_block_mask(fixed_mask, None, None, args.length, args.length, device="cuda")
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    rows[f"flex fixed mask ({kept}/{n_blocks} blocks) fwd+bwd"] = median_time(
        lambda: compiled_flex(q, k, v, block_mask=block_mask).backward(grad), args.repeats, device, warmup=3
    )

    base = rows["sdpa fwd+bwd"]
    print(f"L={args.length} B={args.batch} H={config.num_heads} D={config.head_dim} causal={args.causal}")
    for name, seconds in rows.items():
        print(f"{name:50s} {seconds * 1e3:8.3f} ms   sdpa/this = {base / seconds:6.2f}")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(5):
            attention._block_sparse(q, k, v, None, False)[0].backward(grad)
        torch.cuda.synchronize()
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()

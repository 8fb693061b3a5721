"""Core benchmark: dynamic attention and DomainMoE against dense baselines measured in the same run.

Prints a table per section and writes `bench/results/core_bench[_<device>].json` and `.md`.

    python bench/core_bench.py                 # CPU figures (fixed threads)
    python bench/core_bench.py --device cuda   # GPU figures (bf16, FlexAttention backend, training tokens/s)
    python bench/core_bench.py --quick         # fewer repeats and lengths (smoke run)

Figures (issue "Foundation"):
- attention FLOPs at L=1024 <= 30% of dense (analytic and FlopCounterMode, the gate included);
- CPU attention-op speedup >= 1.7x / 2.5x / 3x at L = 1024 / 2048 / 4096 (median of >= 9 runs);
- the whole-layer ratio (attention + MoE), reported as it is;
- DomainMoE: each token reaches exactly top_k routed experts; throughput >= 4x a dense SwiGLU with the
  same total parameters; latency <= 0.8x a dense FFN of width 4 x hidden at 2048 tokens;
- GPU: attention forward+backward speedup vs SDPA >= 2.5x at L=4096 and >= 8x at 8192 (selection
  included); training tokens/s of a small CoreModel, dense vs dynamic attention, dense FFN vs MoE;
- `verticals --help` under a second.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.attention import DynamicAttention, attention_flop_counter  # noqa: E402
from core.config import CoreConfig  # noqa: E402
from core.model import CoreModel, EncoderLayer  # noqa: E402
from core.moe import DomainMoE, SwiGLU  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of `fn` in seconds over `repeats` runs (after warm-up), synchronising on CUDA."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_kernel_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of GPU kernel time per call (profiler sum), i.e. without the host's launch overhead."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    total_us = sum(event.self_device_time_total for event in profiler.key_averages())
    return total_us / 1e6 / repeats


def table(title: str, rows: list[dict], columns: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- attention
def analytic_attention_flops(length: int, config: CoreConfig, sparse: bool) -> int:
    """Multiply-add FLOPs (x2) of QK^T and PV, plus the gate's block-level scores when sparse."""
    heads, dim, block = config.num_heads, config.head_dim, config.block_size
    if not sparse:
        return 2 * 2 * heads * length * length * dim
    n_blocks = math.ceil(length / block)
    kept = min(1 + config.top_k_blocks, n_blocks)
    attention = 2 * 2 * heads * length * kept * block * dim
    gate = 2 * heads * n_blocks * n_blocks * dim + 2 * heads * n_blocks * dim * dim  # scores + gating_factor
    return attention + gate


def attention_flops_section(config: CoreConfig, length: int) -> dict:
    attention = DynamicAttention(config).eval()
    q, k, v = (torch.randn(1, config.num_heads, length, config.head_dim) for _ in range(3))
    with torch.no_grad(), attention_flop_counter() as sparse_counter:
        attention._block_sparse(q, k, v, None, False)
    with torch.no_grad(), attention_flop_counter() as dense_counter:
        attention._dense(q, k, v, None, False)
    counted = sparse_counter.get_total_flops() / dense_counter.get_total_flops()
    analytic = analytic_attention_flops(length, config, True) / analytic_attention_flops(
        length, config, False
    )
    return {
        "length": length,
        "block_size": config.block_size,
        "top_k_blocks": config.top_k_blocks,
        "analytic_ratio": analytic,
        "flop_counter_ratio": counted,
        "target": "<= 0.30",
        "met": counted <= 0.30 and analytic <= 0.30,
    }


def attention_speed_section(
    config: CoreConfig, lengths: list[int], repeats: int, device: torch.device
) -> list[dict]:
    """Attention op only: from q, k, v to the attended values (gate, selection and gather included)."""
    rows = []
    targets = {1024: 1.7, 2048: 2.5, 4096: 3.0}
    for causal in (False, True):
        cfg = CoreConfig(**{**config.to_dict(), "causal": causal})
        attention = DynamicAttention(cfg).eval().to(device)
        for length in lengths:
            q, k, v = (torch.randn(1, cfg.num_heads, length, cfg.head_dim, device=device) for _ in range(3))
            with torch.no_grad():
                dense = median_time(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats, device
                )
                sparse = median_time(lambda: attention._block_sparse(q, k, v, None, False), repeats, device)
            target = targets.get(length) if not causal else None
            speedup = dense / sparse
            rows.append(
                {
                    "causal": causal,
                    "length": length,
                    "dense_ms": dense * 1e3,
                    "dynamic_ms": sparse * 1e3,
                    "speedup": speedup,
                    "target": f">= {target}" if target else "(reported)",
                    "met": speedup >= target if target else "",
                }
            )
    return rows


def layer_speed_section(
    config: CoreConfig, lengths: list[int], repeats: int, device: torch.device
) -> list[dict]:
    """Whole encoder layer (norms, projections, attention, output gate, MoE): dynamic vs dense attention."""
    rows = []
    cfg = CoreConfig(**{**config.to_dict(), "dense_tail_layers": 0})
    layer = EncoderLayer(cfg, 0).eval().to(device)
    for length in lengths:
        hidden = torch.randn(1, length, cfg.hidden_size, device=device)

        def run(force_dense: bool, hidden=hidden) -> None:
            normed = layer.attention_norm(hidden)
            attended, _ = layer.attention(normed, force_dense=force_dense)
            mixed = hidden + attended
            layer.ffn(layer.ffn_norm(mixed))

        with torch.no_grad():
            dense = median_time(lambda: run(True), repeats, device)
            sparse = median_time(lambda: run(False), repeats, device)
        rows.append(
            {"length": length, "dense_ms": dense * 1e3, "dynamic_ms": sparse * 1e3, "speedup": dense / sparse}
        )
    return rows


# ---------------------------------------------------------------------------- MoE
def moe_section(config: CoreConfig, tokens: int, repeats: int, device: torch.device) -> dict:
    moe = DomainMoE(config).eval().to(device)
    hidden = torch.randn(1, tokens, config.hidden_size, device=device)
    flat = hidden.reshape(-1, config.hidden_size)
    with torch.no_grad():
        topk_idx, topk_weight, _, _ = moe.route(flat)
    distinct = torch.tensor([len(set(row)) for row in topk_idx.tolist()])
    exact_top_k = bool((distinct == config.moe_top_k).all())
    weights_sum_to_one = bool(
        torch.allclose(topk_weight.sum(-1).float(), torch.ones(tokens, device=device), atol=1e-3)
    )

    total_width = config.ffn_size * (config.n_routed_experts + config.n_shared_experts)
    same_params = SwiGLU(config.hidden_size, total_width).eval().to(device)
    usual = SwiGLU(config.hidden_size, 4 * config.hidden_size).eval().to(device)
    moe_params = sum(p.numel() for p in moe.parameters())
    same_params_count = sum(p.numel() for p in same_params.parameters())
    # On the GPU in bf16 (autocast), the MoE takes its grouped-GEMM dispatch.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        t_moe = median_time(lambda: moe(hidden), repeats, device)
        t_same = median_time(lambda: same_params(hidden), repeats, device)
        t_usual = median_time(lambda: usual(hidden), repeats, device)
    throughput_ratio = t_same / t_moe
    latency_ratio = t_moe / t_usual
    return {
        "tokens": tokens,
        "experts": f"{config.n_routed_experts} routed (top-{config.moe_top_k}) + {config.n_shared_experts} shared",
        "moe_params": moe_params,
        "dense_same_params": same_params_count,
        "each_token_exactly_top_k": exact_top_k,
        "combine_weights_sum_to_1": weights_sum_to_one,
        "moe_ms": t_moe * 1e3,
        "dense_same_params_ms": t_same * 1e3,
        "dense_4x_ms": t_usual * 1e3,
        "throughput_vs_same_params": throughput_ratio,
        "throughput_target": ">= 4.0",
        "latency_vs_dense_4x": latency_ratio,
        "latency_target": "<= 0.8",
        "met": exact_top_k and throughput_ratio >= 4.0 and latency_ratio <= 0.8,
    }


# ---------------------------------------------------------------------------- GPU
def gpu_attention_section(config: CoreConfig, lengths: list[int], repeats: int, batch: int) -> list[dict]:
    """bf16 forward+backward of the attention op: FlexAttention block selection (gate included) vs SDPA."""
    device = torch.device("cuda")
    rows = []
    targets = {4096: 2.5, 8192: 8.0}
    for causal in (False, True):
        cfg = CoreConfig(**{**config.to_dict(), "causal": causal, "attention_backend": "flex"})
        attention = DynamicAttention(cfg).to(device=device, dtype=torch.bfloat16)
        for length in lengths:
            shape = (batch, cfg.num_heads, length, cfg.head_dim)
            q, k, v = (
                torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
            )
            grad = torch.randn(shape, device=device, dtype=torch.bfloat16)

            def dense(q=q, k=k, v=v, grad=grad) -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)

            def dynamic(q=q, k=k, v=v, grad=grad) -> None:
                out, _ = attention._block_sparse(q, k, v, None, False)
                out.backward(grad)

            t_dense = median_time(dense, repeats, device, warmup=3)
            t_dynamic = median_time(dynamic, repeats, device, warmup=3)
            k_dense = cuda_kernel_time(dense, repeats)
            k_dynamic = cuda_kernel_time(dynamic, repeats)
            target = targets.get(length) if not causal else None
            rows.append(
                {
                    "causal": causal,
                    "length": length,
                    "batch": batch,
                    "sdpa_ms": t_dense * 1e3,
                    "dynamic_flex_ms": t_dynamic * 1e3,
                    "sdpa_kernel_ms": k_dense * 1e3,
                    "dynamic_kernel_ms": k_dynamic * 1e3,
                    "kernel_speedup": k_dense / k_dynamic,
                    "speedup": t_dense / t_dynamic,
                    "target": f">= {target}" if target else "(reported)",
                    "met": (t_dense / t_dynamic) >= target if target else "",
                }
            )
    return rows


def gpu_training_section(length: int, batch: int, steps: int) -> list[dict]:
    """Training tokens/s of a small CoreModel (bf16 autocast, AdamW) for attention x FFN variants."""
    device = torch.device("cuda")
    rows = []
    variants = [
        ("dense attention + dense FFN", dict(dense_below_gpu=10**9, use_moe=False)),
        ("dynamic attention + dense FFN", dict(dense_below_gpu=0, use_moe=False)),
        ("dense attention + MoE", dict(dense_below_gpu=10**9, use_moe=True)),
        ("dynamic attention + MoE", dict(dense_below_gpu=0, use_moe=True)),
    ]
    for name, overrides in variants:
        config = CoreConfig(
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            dense_tail_layers=0,
            categorical_fields={"token": 1000},
            num_labels=2,
            **overrides,
        )
        torch.manual_seed(0)
        model = CoreModel(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(2, 1000, (batch, length), device=device)
        labels = torch.randint(0, 2, (batch,), device=device)

        def step(model=model, optimizer=optimizer, ids=ids, labels=labels) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(categorical={"token": ids}, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = median_time(step, steps, device, warmup=3)
        rows.append(
            {"variant": name, "length": length, "batch": batch, "tokens_per_s": batch * length / seconds}
        )
    return rows


# ---------------------------------------------------------------------------- CLI latency
def cli_section(repeats: int = 5) -> dict:
    exe = Path(sys.executable).parent / "verticals"
    command = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "apps.cli", "--help"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"command": "verticals --help", "median_s": seconds, "target": "< 1.0", "met": seconds < 1.0}


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (fixed for the whole run)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and lengths")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--lengths", type=int, nargs="*", help="GPU attention lengths (default 1024..8192)")
    parser.add_argument(
        "--skip-training", action="store_true", help="GPU: skip the training tokens/s section"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 3 if args.quick else max(args.repeats, 9)
    device = torch.device(args.device)
    config = CoreConfig()  # the default configuration
    results: dict = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": repeats,
        "config": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "num_heads",
                "block_size",
                "top_k_blocks",
                "ffn_size",
                "n_routed_experts",
            )
        },
    }
    sections: list[str] = []
    if device.type == "cpu":
        results["attention_flops"] = attention_flops_section(config, 1024)
        sections.append(
            table(
                "Attention FLOPs at L=1024 (dynamic / dense)",
                [results["attention_flops"]],
                list(results["attention_flops"]),
            )
        )
        lengths = [1024, 2048] if args.quick else [1024, 2048, 4096]
        results["attention_cpu"] = attention_speed_section(config, lengths, repeats, device)
        sections.append(
            table(
                f"CPU attention op, {args.threads} thread(s), median of {repeats}",
                results["attention_cpu"],
                ["causal", "length", "dense_ms", "dynamic_ms", "speedup", "target", "met"],
            )
        )
        results["layer_cpu"] = layer_speed_section(config, lengths, repeats, device)
        sections.append(
            table(
                "CPU whole encoder layer (attention + MoE)",
                results["layer_cpu"],
                list(results["layer_cpu"][0]),
            )
        )
        results["moe_cpu"] = moe_section(config, 2048, repeats, device)
        sections.append(
            table("DomainMoE at 2048 tokens (CPU)", [results["moe_cpu"]], list(results["moe_cpu"]))
        )
        results["cli"] = cli_section()
        sections.append(table("CLI start-up", [results["cli"]], list(results["cli"])))
    else:
        lengths = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192]
        lengths = args.lengths or lengths
        results["attention_gpu"] = gpu_attention_section(config, lengths, repeats, batch=8)
        sections.append(
            table(
                "GPU attention forward+backward, bf16 (FlexAttention block selection vs SDPA)",
                results["attention_gpu"],
                [
                    "causal",
                    "length",
                    "batch",
                    "sdpa_ms",
                    "dynamic_flex_ms",
                    "speedup",
                    "target",
                    "met",
                    "sdpa_kernel_ms",
                    "dynamic_kernel_ms",
                    "kernel_speedup",
                ],
            )
        )
        results["moe_gpu"] = moe_section(config, 2048, repeats, device)
        sections.append(
            table("DomainMoE at 2048 tokens (GPU)", [results["moe_gpu"]], list(results["moe_gpu"]))
        )
        if not args.skip_training:
            results["training_gpu"] = gpu_training_section(4096, 8, steps=repeats) + gpu_training_section(
                8192, 4, steps=repeats
            )
        if "training_gpu" in results:
            sections.append(
                table(
                    "GPU training tokens/s, small CoreModel (L=4096, bf16)",
                    results["training_gpu"],
                    list(results["training_gpu"][0]),
                )
            )
    report = "\n".join(sections)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "core_bench" if device.type == "cpu" else "core_bench_cuda"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(
        f"# Core benchmark ({results['device']}, torch {torch.__version__})\n\n{report}"
    )


if __name__ == "__main__":
    main()

"""Compression benchmark: the suite model compressed per domain (int8, pruned+int8, pruned+QAT+int8).

One run, the fp32 eager parent as the baseline. A small suite model (`verticals suite train`'s
`apps.suite.train.train_suite`, `bench/suite_bench.py`'s generator data and settings) is trained here, or
`--suite-model DIR` is used; then each domain's part (`DIR/<domain>`: the shared trunk plus that app's
embedders and heads, no other app's) is compressed with `verticals compress --model DIR --domain D`'s code
path (`apps.compress_cli.run_compression`) into three artifacts:

- ``int8``: ONNX export + ONNX Runtime dynamic int8 (post-training quantisation, PTQ);
- ``pruned_int8``: expert pruning from the domain's routing statistics (experts with at most
  `--expert-threshold` of its assignments dropped) + `--prune-ffn` of the FFN units, then int8;
- ``pruned_qat_int8``: the same pruning, `--qat-steps` fake-quantised fine-tuning steps on the domain's
  training data, then int8.

The metric (fraud AP, knowledge-tracing AUC, diagnosis macro AUROC) is measured by each app's own evaluation
on its held-out test data, through the app's predictor loading the artifact.

Figures (issue 6): artifact size <= 18% of the fp32 suite model's safetensors (every part's tensors, the
shared trunk once: `apps.compress_cli.suite_safetensors_bytes`); latency >= 3x lower than fp32 eager at batch
1 and 64; metric drop <= 1 point after PTQ, <= 0.5 after QAT. Latencies are medians over `--repeats` forwards
with `--threads` intra-op threads for torch and ONNX Runtime alike (inter-op 1, sequential). Where the time goes
at batch 64 is profiled on both sides: the fp32 eager parent per aten op (torch profiler) and the int8 graph
per ONNX op (ONNX Runtime's profiler, `core.onnx_model.profile_ops`).

Usage:
    .venv/bin/python bench/compress_bench.py                      # trains the suite (~3 min), CPU, 1 thread
    .venv/bin/python bench/compress_bench.py --suite-model /tmp/verticals_compress_bench/suite
    .venv/bin/python bench/compress_bench.py --apps education --qat-steps 50
    # width study (a suite at another trunk width; leave bench/results alone with --out):
    .venv/bin/python bench/compress_bench.py --apps finance education --hidden-size 256 --work W --out W/results
Writes bench/results/compress_bench.json and .md. ONNX Runtime runs on the CPU; `--device cuda` only trains
the suite on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from suite_bench import (  # noqa: E402
    TRUNK_WIDTHS,
    add_suite_arguments,
    make_data,
    suite_settings,
    trunk_changes,
    width_study_note,
)

from apps.compress_cli import run_compression  # noqa: E402
from core.compress import CompressionOptions  # noqa: E402
from core.onnx_model import KEEP_FP32_DEFAULT  # noqa: E402

APPS = ("finance", "medical", "education")
#: Pruning of the pruned variants per domain (`domain_values` specs). Medical drops the
#: layer of least block influence and the kept layer's MoE block, education both MoE blocks (the report
#: lists every block's influence); with their feed-forward blocks gone, neither prunes FFN units.
PRUNE_FFN_DEFAULT = ("0.25", "medical=0", "education=0")
PRUNE_HEADS_DEFAULT = ("0.0",)
PRUNE_LAYERS_DEFAULT = ("0", "medical=1")
PRUNE_FFN_BLOCKS_DEFAULT = ("0", "medical=1", "education=2")
#: QAT objective per domain: the parent's outputs for finance, whose task gradient rests on a few hundred
#: frauds (task QAT over three Trainer seeds moved AP by -2.19, -0.76 and +0.30 points; distillation by
#: -0.17, -0.01 and +0.19); task steps elsewhere (chosen under education's earlier head and unit pruning:
#: -0.46 with task steps, -0.65 distilled).
QAT_OBJECTIVE_DEFAULT = ("task", "finance=distill")


def domain_values(
    specs: list[str] | tuple[str, ...], option: str, read: Callable[[str], Any]
) -> dict[str, Any]:
    """Per-domain settings from specs like ``["0.25", "education=0.5"]``: a bare value sets every domain,
    ``DOMAIN=VALUE`` one domain (later specs win); `read` turns a value into the setting or raises
    ValueError saying what was expected. Raises ValueError naming the option and the spec."""
    values: dict[str, Any] = {}
    for spec in specs:
        domain, _, value = spec.rpartition("=")
        if domain and domain not in APPS:
            raise ValueError(
                f"{option}: unknown domain {domain!r} in {spec!r}; expected one of {', '.join(APPS)}"
            )
        try:
            setting = read(value)
        except ValueError as error:
            raise ValueError(f"{option}: {spec!r}: {error}") from None
        for name in [domain] if domain else APPS:
            values[name] = setting
    missing = [app for app in APPS if app not in values]
    if missing:
        raise ValueError(f"{option}: no value for {', '.join(missing)}; give a bare value for every domain")
    return values


def _ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError("expected RATIO or DOMAIN=RATIO with a number") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} is outside [0, 1)")
    return ratio


def _layer_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise ValueError("expected N or DOMAIN=N with a whole number of blocks") from None
    if count < 0:
        raise ValueError(f"{count} blocks: expected 0 or more")
    return count


def _qat_objective(value: str) -> str:
    from core.compress import QAT_OBJECTIVES

    if value not in QAT_OBJECTIVES:
        raise ValueError(f"expected one of {', '.join(QAT_OBJECTIVES)}")
    return value


#: Module paths each domain's artifacts keep fp32 beyond `KEEP_FP32_DEFAULT`: finance's first attention
#: block, the group of largest int8 sensitivity on two suites (0.039 on seed 0, 0.038 on seed 1); int8 there
#: cost AP -1.12 points on the seed-1 suite's int8 part, -0.02 with it fp32.
KEEP_FP32_BENCH = {"finance": ("layers.0.attention.*",)}

#: The pruned variants' per-domain options: flag, default specs, how a value reads, help.
PRUNING_OPTIONS = (
    (
        "--prune-ffn",
        PRUNE_FFN_DEFAULT,
        _ratio,
        "Share of the FFN units the pruned variants remove: RATIO for every domain and/or DOMAIN=RATIO.",
    ),
    (
        "--prune-heads",
        PRUNE_HEADS_DEFAULT,
        _ratio,
        "Share of the attention heads the pruned variants remove: RATIO and/or DOMAIN=RATIO.",
    ),
    (
        "--prune-layers",
        PRUNE_LAYERS_DEFAULT,
        _layer_count,
        "Encoder layers the pruned variants drop (least block influence): N and/or DOMAIN=N.",
    ),
    (
        "--prune-ffn-blocks",
        PRUNE_FFN_BLOCKS_DEFAULT,
        _layer_count,
        "Feed-forward (MoE) blocks the pruned variants drop (least block influence): N and/or DOMAIN=N.",
    ),
)

VARIANTS = ("int8", "pruned_int8", "pruned_qat_int8")


def suite_data(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`bench/suite_bench.py`'s generator data (training and held-out test data of every app) under `work`."""
    return make_data(work, args)


def suite_model(work: Path, data: dict[str, Any], args: argparse.Namespace) -> Path:
    """The suite model to compress: `--suite-model`, or one trained here with the suite benchmark's settings."""
    from apps.suite.train import train_suite

    if args.suite_model:
        return args.suite_model
    settings = suite_settings(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train_suite(data["train"], work / "suite", settings)
    return work / "suite"


def suite_trunk(suite: Path) -> dict[str, Any]:
    """The widths of the suite's shared trunk (`suite.json`), for the report."""
    trunk = json.loads((suite / "suite.json").read_text()).get("trunk", {})
    return {k: trunk[k] for k in TRUNK_WIDTHS if k in trunk}


def _finance_paths(parent: Path, artifact: Path, test: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Batch scoring rows/s and real-time ms per transaction, parent vs artifact."""
    from apps.finance.adapters import read_source, validate
    from apps.finance.predictor import FraudDetector
    from apps.finance.service import RealtimeScorer

    frame, _ = validate(read_source(str(test)))
    out: dict[str, Any] = {}
    for name, model_dir in (("parent", parent), ("artifact", artifact)):
        detector = FraudDetector.load(model_dir)
        t0 = time.perf_counter()
        detector.predict_proba(frame)
        rows_per_s = len(frame) / (time.perf_counter() - t0)
        scorer = RealtimeScorer(detector)
        records = frame.head(args.realtime_transactions).to_dict("records")
        times = []
        for record in records:
            t0 = time.perf_counter()
            scorer.score(record)
            times.append(1000 * (time.perf_counter() - t0))
        out[name] = {
            "batch_rows_per_s": round(rows_per_s, 1),
            "realtime_ms_median": round(float(sorted(times)[len(times) // 2]), 3),
        }
    return out


def _medical_paths(parent: Path, artifact: Path, test: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per-case latency of `Diagnoser.explain` (what `verticals medical diagnose` runs), parent vs artifact."""
    from apps.medical.adapters import read_cases
    from apps.medical.predictor import Diagnoser

    cases = read_cases(test)[: args.medical_latency_cases]
    out: dict[str, Any] = {}
    for name, model_dir in (("parent", parent), ("artifact", artifact)):
        diagnoser = Diagnoser.load(model_dir)
        diagnoser.explain(cases[0])  # warm-up
        times = []
        for case in cases:
            t0 = time.perf_counter()
            diagnoser.explain(case)
            times.append(1000 * (time.perf_counter() - t0))
        out[name] = {"diagnose_ms_median": round(float(sorted(times)[len(times) // 2]), 2)}
    return out


APP_PATHS = {"finance": _finance_paths, "medical": _medical_paths}


def _options(variant: str, domain: str, args: argparse.Namespace) -> CompressionOptions:
    from core.onnx_model import KEEP_FP32_DEFAULT

    keep = tuple(KEEP_FP32_DEFAULT) + tuple(getattr(args, f"{domain}_keep_fp32") or ())
    options = CompressionOptions(int8=True, latency_repeats=args.repeats, explanations=True, keep_fp32=keep)
    if variant == "pruned_int8":
        options.keep_sensitive = args.keep_sensitive  # the scan is recorded in compression.json
    if variant.startswith("pruned"):
        options.prune_experts = True
        options.expert_threshold = args.expert_threshold
        options.ffn_ratio = args.prune_ffn[domain]
        options.head_ratio = args.prune_heads[domain]
        options.layer_drop = args.prune_layers[domain]
        options.ffn_block_drop = args.prune_ffn_blocks[domain]
    if variant == "pruned_qat_int8":
        options.qat_steps = args.qat_steps
        options.qat_objective = args.qat_objective[domain]
    return options


def _profile(part: Path, artifact: Path, examples: list, batch_size: int) -> dict[str, Any]:
    """ONNX Runtime kernel time per op type of the artifact's inference graph at `batch_size`."""
    from core.compress import _repeat_to
    from core.data import collate
    from core.onnx_model import OnnxCoreModel, inference_inputs, profile_ops

    inputs = inference_inputs(collate(_repeat_to(examples, batch_size)))
    return profile_ops(artifact, OnnxCoreModel(artifact, threads=1).graph_feed(inputs))


def _eager_profile(part: Path, examples: list, batch_size: int, runs: int = 3) -> dict[str, Any]:
    """Self CPU time per aten op of the fp32 eager parent at `batch_size` (torch profiler, after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    from core.compress import _repeat_to
    from core.data import collate
    from core.onnx_model import inference_inputs
    from core.train import load_checkpoint

    model, _ = load_checkpoint(part)
    model = model.float().eval()
    inputs = inference_inputs(collate(_repeat_to(examples, batch_size)))
    with torch.inference_mode():
        model(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(**inputs)
    events = sorted(
        (e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total
    )
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = {
        e.key: {
            "ms": round(e.self_cpu_time_total / runs / 1000, 3),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in events
    }
    return {"total_ms": round(total / runs / 1000, 3), "ops": ops}


def run_domain(
    domain: str, suite: Path, data: dict[str, Any], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Compress one domain's part of the suite into the three artifacts and collect their figures."""
    from apps.compress_cli import APP_TASKS
    from core.train import resolve_model_dir

    part = resolve_model_dir(suite, domain)
    test, train = data["test"][domain], data["train"][domain]
    rows = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        report = run_compression(
            suite,
            work / variant,
            str(test),
            _options(variant, domain, args),
            qat_data=str(train) if "qat" in variant else None,
            domain=domain,
            calibration_size=args.calibration_size,
        )
        metrics = report["metrics"]
        rows[variant] = {
            "size_ratio_vs_suite": report["suite"]["size_ratio_vs_suite"],
            "size_ratio_vs_suite_with_explanations": report["suite"]["size_ratio_vs_suite_with_explanations"],
            "size_ratio_vs_part": report["sizes"]["size_ratio"],
            "artifact_bytes": report["sizes"]["artifact_bytes"],
            "artifact_bytes_with_explanations": report["sizes"]["artifact_bytes_with_explanations"],
            "part_bytes": report["sizes"]["parent_safetensors_bytes"],
            "suite_bytes": report["suite"]["suite_safetensors_bytes"],
            "parameters": report["parameters"],
            "speedup_b1": report["latency"]["batch_1"]["speedup"],
            "speedup_b64": report["latency"]["batch_64"]["speedup"],
            "latency": report["latency"],
            "metric": metrics["headline"],
            "parent_metric": metrics["parent"][metrics["headline"]],
            "artifact_metric": metrics["artifact"][metrics["headline"]],
            "delta_points": metrics["headline_delta_points"],
            "pruned": report["pruned"],
            "steps": report["steps"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        shown = {k: v for k, v in rows[variant].items() if k not in ("latency", "pruned", "steps")}
        print(f"{domain} {variant}: {json.dumps(shown)}", flush=True)
    examples = APP_TASKS[domain].examples(part, str(test))[: args.calibration_size]
    profiles = {variant: _profile(part, work / variant, examples, 64) for variant in ("int8", "pruned_int8")}
    eager_profile = _eager_profile(part, examples, 64)
    paths = None
    if domain in APP_PATHS:
        paths = APP_PATHS[domain](part, work / "pruned_int8", test, args)
        print(f"{domain} app paths (parent vs pruned_int8): {json.dumps(paths)}", flush=True)
    return {
        "parent": str(part),
        "variants": rows,
        "profile_b64": profiles,
        "eager_profile_b64": eager_profile,
        "app_paths": paths,
    }


INT8_OPS = (
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
)


def int8_share(profile: dict[str, Any]) -> float:
    """Share of the graph's kernel time in int8 kernels (and the run-time activation quantisation)."""
    return sum(v["share"] for op, v in profile["ops"].items() if op in INT8_OPS)


# The eager ops int8 replaces: the weight matrix products (the per-field `bmm` of the numeric embedder
# stays fp32 in the graph too, but is counted here).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_share(profile: dict[str, Any]) -> float:
    """Share of the eager forward's self CPU time in matrix products."""
    return sum(v["share"] for op, v in profile["ops"].items() if op in MATMUL_OPS)


def remeasure_latency(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """Time every artifact of a saved run again against its fp32 parent (`--repeats` interleaved forwards),
    profile both at batch 64 again (the same conditions for the timings and their breakdown), and time the
    finance and medical app paths again."""
    from apps.compress_cli import APP_TASKS, _subsample
    from core.compress import latency_report
    from core.train import load_checkpoint

    for domain, result in results.items():
        part = Path(result["parent"])
        test = (
            Path(meta["suite"]).parent
            / {"finance": "tx_test.csv", "medical": "med_test", "education": "edu_test.csv"}[domain]
        )
        examples = _subsample(APP_TASKS[domain].examples(part, str(test)), args.calibration_size)
        parent, _ = load_checkpoint(part)
        parent = parent.float().eval()
        for variant, row in result["variants"].items():
            artifact, _ = load_checkpoint(args.work / domain / variant)
            row["latency"] = latency_report(parent, artifact, examples, repeats=args.repeats)
            row["speedup_b1"] = row["latency"]["batch_1"]["speedup"]
            row["speedup_b64"] = row["latency"]["batch_64"]["speedup"]
            print(f"{domain} {variant}: b1 {row['speedup_b1']}x, b64 {row['speedup_b64']}x", flush=True)
        profiled = APP_TASKS[domain].examples(part, str(test))[: args.calibration_size]  # as `run_domain`
        result["profile_b64"] = {
            variant: _profile(part, args.work / domain / variant, profiled, 64)
            for variant in result["profile_b64"]
        }
        result["eager_profile_b64"] = _eager_profile(part, profiled, 64)
        if domain in APP_PATHS and result.get("app_paths") is not None:  # the app paths, timed again too
            result["app_paths"] = APP_PATHS[domain](part, args.work / domain / "pruned_int8", test, args)
            print(
                f"{domain} app paths (parent vs pruned_int8): {json.dumps(result['app_paths'])}", flush=True
            )
    meta["latency_remeasured"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repeats": args.repeats,
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],
    }


def _best(row: dict[str, Any], batch: int) -> str:
    entry = row["latency"][f"batch_{batch}"]
    shown = [f"{entry[k]:.2f}x" for k in ("speedup_best", "speedup_cpu") if k in entry]
    return f" ({'; '.join(shown)})" if shown else ""


def _top_ops(profile: dict[str, Any], n: int = 6) -> str:
    ops = list(profile["ops"].items())[:n]
    return ", ".join(f"{op} {100 * v['share']:.0f}%" for op, v in ops)


def int8_ceiling(row: dict[str, Any], profile: dict[str, Any]) -> float:
    """The batch-64 speed-up an int8-only artifact would have if its int8 kernels (and the activation
    quantisation) took no time at all: what int8 alone can give while the rest runs as it does."""
    latency = row["latency"]["batch_64"]
    return latency["parent_fp32_ms"] / (latency["artifact_ms"] * (1.0 - int8_share(profile)))


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def figures(results: dict[str, Any]) -> list[str]:
    """The issue's targets, met or not, from the rows; speed-ups judged for int8-only and pruned+int8
    separately."""
    lines = []
    for domain, result in results.items():
        rows = result["variants"]
        size = min(row["size_ratio_vs_suite"] for row in rows.values())
        ptq = [v for k, v in rows.items() if "qat" not in k]
        qat = [v for k, v in rows.items() if "qat" in k]
        worst_ptq = min(row["delta_points"] for row in ptq)
        worst_qat = min((row["delta_points"] for row in qat), default=float("nan"))
        b1 = {k: v["speedup_b1"] for k, v in rows.items()}
        b64 = {k: v["speedup_b64"] for k, v in rows.items()}
        pruned = [k for k in rows if k.startswith("pruned")]
        ceiling = ""
        if b64["int8"] < 3 and "int8" in result.get("profile_b64", {}):
            ceiling = (
                f"; int8-only ceiling at b64 (its int8 kernels at zero cost) "
                f"{int8_ceiling(rows['int8'], result['profile_b64']['int8']):.2f}x"
            )
        lines.append(
            f"- {domain}: smallest artifact {100 * size:.1f}% of the suite ({_met(size <= 0.18)}); "
            f"worst PTQ delta {worst_ptq:+.2f} points ({_met(worst_ptq >= -1)}), QAT "
            f"{worst_qat:+.2f} ({_met(worst_qat >= -0.5)}); speed-up b1 "
            + ", ".join(f"{k} {v:.2f}x" for k, v in b1.items())
            + f" (int8-only {_met(b1['int8'] >= 3)}, pruned+int8 {_met(min(b1[k] for k in pruned) >= 3)}); b64 "
            + ", ".join(f"{k} {v:.2f}x" for k, v in b64.items())
            + f" (int8-only {_met(b64['int8'] >= 3)}, pruned+int8 {_met(min(b64[k] for k in pruned) >= 3)})"
            + ceiling
            + _ratios_text(rows, "speedup_best", "fastest-run")
            + _ratios_text(rows, "speedup_cpu", "thread-CPU-time")
        )
    return lines


def _ratios_text(rows: dict, key: str, title: str) -> str:
    """ "; TITLE ratios b1 variant Rx, ..., b64 ..." from each variant's latency `key`, or "" when absent."""
    if not all(key in v["latency"]["batch_1"] for v in rows.values()):
        return ""
    parts = [
        ", ".join(f"{k} {v['latency'][f'batch_{size}'][key]:.2f}x" for k, v in rows.items())
        for size in (1, 64)
    ]
    return f"; {title} ratios b1 {parts[0]}, b64 {parts[1]}"


def _pruning_text(meta: dict[str, Any]) -> str:
    """ "F of the FFN units and H of the heads removed" per domain (one ratio for a run from before per-domain
    pruning was recorded)."""
    pruning = meta.get("pruning")
    if not pruning:
        return f"{meta['args']['prune_ffn']} of the FFN units removed"
    return "; ".join(
        f"{app}: {ratios['ffn']} of the FFN units and {ratios['heads']} of the attention heads removed"
        + (f", {ratios['layers']} layer(s) dropped" if ratios.get("layers") else "")
        + (f", {ratios['ffn_blocks']} feed-forward block(s) dropped" if ratios.get("ffn_blocks") else "")
        for app, ratios in pruning.items()
    )


def block_pruning_lines(results: dict[str, Any]) -> list[str]:
    """The block influence (1 - cos of a block's input and output on the calibration data) of every layer and
    feed-forward block of the domains whose pruned variants dropped some, and what they dropped."""
    lines = []
    for domain, result in results.items():
        step = next(
            (x for x in result["variants"]["pruned_int8"]["steps"] if x["step"] == "prune_blocks"), None
        )
        if step is None:
            continue
        influence = step["block_influence"]
        kept = step["layers_kept"]
        dropped = [i for i in range(len(influence["layers"])) if i not in kept]
        lines.append(
            f"- {domain}: layers "
            + ", ".join(f"{i} {v:.3f}" for i, v in enumerate(influence["layers"]))
            + "; feed-forward blocks "
            + ", ".join(f"{i} {v:.3f}" for i, v in enumerate(influence["ffn"]) if v is not None)
            + f"; dropped: layers {dropped or 'none'}, feed-forward blocks {step['ffn_dropped'] or 'none'}"
        )
    if not lines:
        return []
    return [
        "",
        "Block pruning of the pruned variants (block influence, 1 - cos of each real token's hidden state before "
        "and after the block on the calibration data; the least influential go):",
        "",
        *lines,
    ]


def _qat_text(meta: dict[str, Any]) -> str:
    """ " (objective: finance distill, ...)" of a run that recorded its QAT objectives, else ""."""
    objectives = meta.get("qat_objective")
    if not objectives:
        return ""
    return " (objective: " + ", ".join(f"{app} {value}" for app, value in objectives.items()) + ")"


def _markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    suite_bytes = next(iter(next(iter(results.values()))["variants"].values()))["suite_bytes"]
    lines = [
        "# Compression benchmark",
        "",
        f"Run {meta['date']}; CPU `{meta['cpu']['model']}` (AVX512-VNNI {meta['cpu']['avx512_vnni']}, "
        f"AMX {meta['cpu']['amx_int8']}), onnxruntime {meta['cpu']['onnxruntime']}, torch {meta['cpu']['torch']}, "
        f"{meta['threads']} intra-op thread(s) for torch and ONNX Runtime alike (inter-op 1); load average at "
        f"start {meta['load_average']}. Baseline: the fp32 eager suite part of each domain."
        + (
            f" Latencies, profiles and app paths re-measured {meta['latency_remeasured']['date']} on the same "
            f"artifacts, {meta['latency_remeasured']['repeats']} interleaved forwards each (load average "
            f"{meta['latency_remeasured']['load_average']})."
            if meta.get("latency_remeasured")
            else ""
        ),
        "",
        f"Suite model: {meta['suite']} ({suite_bytes / 1e6:.2f} MB fp32 safetensors, every part's tensors "
        "with the shared trunk once). Each domain's part holds the trunk and that app's embedders and heads; "
        f"`verticals compress --model SUITE --domain D`; pruning: experts with <= {meta['args']['expert_threshold']} "
        f"of the domain's assignments dropped, {_pruning_text(meta)}; QAT "
        f"{meta['args']['qat_steps']} steps{_qat_text(meta)}. Metric on each app's held-out test data through its own "
        "predictor."
        + (
            " Suite trunk: " + ", ".join(f"{k} {v}" for k, v in meta["trunk"].items()) + "."
            if meta.get("trunk")
            else ""
        )
        + width_study_note(meta.get("trunk_changes"), "(the suite preset is apps/suite/config.py's)"),
        "",
        "Targets: size <= 18% of the suite's safetensors; latency >= 3x lower at batch 1 and 64; metric drop "
        "<= 1 point (PTQ) / <= 0.5 (QAT).",
        "",
        "Speed-ups: ratio of the median latencies over interleaved forwards (in brackets: of the fastest "
        "forwards, the least disturbed by the other processes of a busy machine; then of the median CPU times "
        "of the calling thread, which both runtimes compute on with one thread, so time descheduled is left out).",
        "",
        "| domain | variant | metric | fp32 part | artifact | delta (points) | size % of suite (part) | "
        "speed-up b1 | speed-up b64 | b64 ms fp32 / int8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, result in results.items():
        for variant, row in result["variants"].items():
            b64 = row["latency"]["batch_64"]
            lines.append(
                f"| {domain} | {variant} | {row['metric']} | {row['parent_metric']:.4f} | "
                f"{row['artifact_metric']:.4f} | {row['delta_points']:+.2f} | "
                f"{100 * row['size_ratio_vs_suite']:.1f} ({100 * row['size_ratio_vs_part']:.1f}) | "
                f"{row['speedup_b1']:.2f}x{_best(row, 1)} | {row['speedup_b64']:.2f}x{_best(row, 64)} | "
                f"{b64['parent_fp32_ms']:.1f} / {b64['artifact_ms']:.1f} |"
            )
    lines += [
        "",
        "Where the time goes at batch 64 (1 thread): the fp32 eager parent per aten op (torch profiler), then "
        "the int8 graph per ONNX op (ONNX Runtime profiler, kernel time). int8 speeds up the matrix products "
        f"only; at hidden size {meta.get('trunk', {}).get('hidden_size', '?')} the rest (attention, element-wise "
        "ops, the per-expert MoE dispatch, embeddings) is a large share of both.",
        "",
    ]
    for domain, result in results.items():
        eager = result.get("eager_profile_b64")
        if eager:
            lines.append(
                f"- {domain} fp32 eager parent (torch profiler, self CPU time): {eager['total_ms']:.1f} ms; "
                f"{_top_ops(eager)}; matrix products (mm, addmm, bmm) {100 * matmul_share(eager):.0f}%"
            )
        for variant, profile in result.get("profile_b64", {}).items():
            lines.append(
                f"- {domain} {variant}: {profile['total_ms']:.1f} ms; {_top_ops(profile)}; int8 kernels and "
                f"activation quantisation {100 * int8_share(profile):.0f}%"
            )
    lines += [
        "",
        f"int8 sensitivity of pruned_int8 (relative RMS change of the graph outputs when only that module group "
        f"is int8; groups above {meta['args']['keep_sensitive']} are kept fp32):",
        "",
    ]
    for domain, result in results.items():
        step = next(x for x in result["variants"]["pruned_int8"]["steps"] if x["step"] == "onnx_int8")
        scan = step.get("sensitivity") or {}
        top = sorted(((k, v) for k, v in scan.items() if k != "all"), key=lambda kv: -kv[1])[:5]
        extra = [k for k in step["keep_fp32"] if k in scan and k not in KEEP_FP32_DEFAULT]
        lines.append(
            f"- {domain}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in top)
            + f" (every group at once {scan.get('all', float('nan')):.3f}); kept fp32 by the scan: "
            + (", ".join(extra) or "none")
        )
    lines += block_pruning_lines(results)
    lines += ["", "## Figures", "", *figures(results)]
    for domain, result in results.items():
        paths = result.get("app_paths")
        if paths:
            lines += ["", f"{domain} app paths, fp32 suite part vs pruned_int8: `{json.dumps(paths)}`"]
    lines += [
        "",
        "Size % counts the inference graph and heads (`model.onnx`, `classifier.onnx` / `next_step.onnx`); "
        "the explanation graph (`model_explain.onnx`, attention weights for explain/diagnose) is optional "
        "(`--no-explanations`). MoE routers, domain priors and a convolutional CT stem stay fp32 by "
        "default (`core.onnx_model.KEEP_FP32_DEFAULT`; a few KB); "
        + (
            "kept fp32 as well: "
            + "; ".join(f"{d}: {', '.join(p)}" for d, p in meta["keep_fp32"].items() if p)
            + "."
            if any(meta["keep_fp32"].values())
            else "nothing else is kept fp32."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "verticals_compress_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="compress_bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--suite-model", type=Path, help="A suite directory to compress (default: train one)."
    )
    # The suite and its data: bench/suite_bench.py's defaults.
    add_suite_arguments(parser)
    parser.add_argument("--device", default="cpu", help="Suite training device (ONNX runs on the CPU).")
    # Compression.
    parser.add_argument(
        "--expert-threshold",
        type=float,
        default=0.0,
        help="Experts with at most this share of the domain's assignments are dropped (0: the ones it never uses).",
    )
    for flag, default, _read, text in PRUNING_OPTIONS:
        parser.add_argument(flag, nargs="+", default=list(default), help=text)
    parser.add_argument("--qat-steps", type=int, default=30)
    parser.add_argument(
        "--qat-objective",
        nargs="+",
        default=list(QAT_OBJECTIVE_DEFAULT),
        help="What QAT fine-tunes towards (core.compress.QAT_OBJECTIVES): VALUE and/or DOMAIN=VALUE.",
    )
    parser.add_argument("--calibration-size", type=int, default=128)
    parser.add_argument(
        "--keep-sensitive",
        type=float,
        default=0.05,
        help="pruned_int8: keep fp32 the module groups whose int8 alone changes the outputs by more than this.",
    )
    for app in APPS:
        parser.add_argument(
            f"--{app}-keep-fp32",
            nargs="*",
            default=list(KEEP_FP32_BENCH.get(app, ())),
            help=f"Module path patterns of the {app} part kept fp32 by int8 (besides routers).",
        )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--realtime-transactions", type=int, default=200)
    parser.add_argument("--medical-latency-cases", type=int, default=5)
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite the .md from the .json of an earlier run."
    )
    parser.add_argument(
        "--remeasure-latency",
        action="store_true",
        help="Time (--repeats forwards) and profile the artifacts of an earlier run (same --work) again; rewrite both files.",
    )
    args = parser.parse_args()
    try:
        for flag, _default, read, _text in PRUNING_OPTIONS:
            dest = flag[2:].replace("-", "_")
            setattr(args, dest, domain_values(getattr(args, dest), flag, read))
        args.qat_objective = domain_values(args.qat_objective, "--qat-objective", _qat_objective)
    except ValueError as error:
        parser.error(str(error))
    if args.render_only or args.remeasure_latency:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        suite = Path(saved["meta"]["suite"])
        if "trunk" not in saved["meta"] and (suite / "suite.json").is_file():  # a run from before it was kept
            saved["meta"]["trunk"] = suite_trunk(suite)
        if args.remeasure_latency:
            torch.set_num_threads(args.threads)
            remeasure_latency(saved["results"], saved["meta"], args)
            (args.out / f"{args.name}.json").write_text(json.dumps(saved, indent=2))
        (args.out / f"{args.name}.md").write_text(_markdown(saved["results"], saved["meta"]))
        return
    torch.set_num_threads(args.threads)
    import os

    from core.compress import cpu_flags

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    data = suite_data(args.work, args)
    suite = suite_model(args.work, data, args)
    print(f"suite {suite} ready in {time.perf_counter() - started:.0f}s", flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_flags(),
        "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "suite": str(suite),
        "suite_trained_here": args.suite_model is None,
        "trunk_changes": trunk_changes(args) if args.suite_model is None else {},
        "trunk": suite_trunk(suite),
        "keep_fp32": {app: list(getattr(args, f"{app}_keep_fp32")) for app in args.apps},
        "pruning": {
            app: {
                "ffn": args.prune_ffn[app],
                "heads": args.prune_heads[app],
                "layers": args.prune_layers[app],
                "ffn_blocks": args.prune_ffn_blocks[app],
            }
            for app in args.apps
        },
        "qat_objective": {app: args.qat_objective[app] for app in args.apps},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    results = {}
    for domain in args.apps:
        results[domain] = run_domain(domain, suite, data, args.work / domain, args)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / f"{args.name}.md").write_text(_markdown(results, meta))
    print(_markdown(results, meta))


if __name__ == "__main__":
    main()

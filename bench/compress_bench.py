"""Compression benchmark: size, CPU latency and metric cost of int8 / pruned+int8 / QAT+int8 per app.

One run, the fp32 eager parent as the baseline. Per app (fraud AP, knowledge-tracing AUC, diagnosis
AUROC on each app's generator data) a small model is trained here (or `--<app>-model DIR` is used), then
three artifacts are made with `verticals compress`'s code path (`apps.compress_cli.run_compression`):

- ``int8``: ONNX export + ONNX Runtime dynamic int8 (post-training quantisation, PTQ);
- ``pruned_int8``: expert pruning (experts at most `--expert-threshold` of the domain's assignments) +
  `--prune-ffn` of the FFN units, then int8;
- ``qat_int8``: `--qat-steps` fake-quantised fine-tuning steps on the training split, then int8.

Figures (issue 6): artifact size <= 18% of the parent's fp32 safetensors; latency >= 3x lower than fp32
eager at batch 1 and 64; metric drop <= 1 point after PTQ, <= 0.5 after QAT. Latencies are medians over
`--repeats` forwards with `--threads` intra-op threads for both torch and ONNX Runtime.

Usage:
    python bench/compress_bench.py                       # all three apps, small sizes
    python bench/compress_bench.py --apps education --qat-steps 50 --threads 4
Writes bench/results/compress_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from apps.compress_cli import run_compression  # noqa: E402
from core.compress import CompressionOptions  # noqa: E402

VARIANTS = ("int8", "pruned_int8", "qat_int8")


def _finance_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Generated transactions split by time; a channel-routed MoE model trained on the first part."""
    import pandas as pd

    from apps.finance.predictor import FraudDetector
    from apps.finance.synthetic import generate

    df = generate(args.finance_accounts, 35, seed=args.seed).reset_index(drop=True)
    cut = df["timestamp"].min().normalize() + pd.Timedelta(days=26)
    train, val = work / "train.parquet", work / "val.parquet"
    df[df["timestamp"] < cut].to_parquet(train, index=False)
    df[df["timestamp"] >= cut].to_parquet(val, index=False)
    model_dir = work / "model"
    if args.finance_model:
        return args.finance_model, train, val
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        detector = FraudDetector(
            use_moe=True, epochs=args.epochs, pretrain_epochs=0.25, seed=args.seed, hidden_size=args.hidden
        ).fit(df[df["timestamp"] < cut])
    detector.save(model_dir)
    return model_dir, train, val


def _education_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    from apps.education.predictor import KnowledgeTracer
    from apps.education.service import write_atomic_csv
    from apps.education.synthetic import generate

    frame, _, _ = generate(students=args.education_students, seed=args.seed)
    frame = frame.drop(columns="source_row")
    users = frame["user_id"].drop_duplicates().sample(frac=1.0, random_state=args.seed).to_numpy()
    held_out = set(users[: len(users) // 4])
    train, val = work / "train.csv", work / "val.csv"
    write_atomic_csv(frame[~frame["user_id"].isin(held_out)], train)
    write_atomic_csv(frame[frame["user_id"].isin(held_out)], val)
    if args.education_model:
        return args.education_model, train, val
    from apps.education.adapters import read_interactions

    tracer = KnowledgeTracer(
        preset="small", task_epochs=args.epochs, seed=args.seed, config_overrides={"hidden_size": args.hidden}
    ).fit(read_interactions(train).frame)
    model_dir = work / "model"
    tracer.save(model_dir)
    return model_dir, train, val


def _medical_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    from apps.medical.adapters import read_cases
    from apps.medical.predictor import Diagnoser
    from apps.medical.synthetic import generate

    train, val = work / "train", work / "val"
    shape = (32, 64, 64)
    for folder, count, seed in (
        (train, args.medical_cases, args.seed),
        (val, args.medical_cases // 2, args.seed + 1),
    ):
        if not (folder / "cases.csv").is_file():
            generate(folder, count, seed, shape=shape)
    if args.medical_model:
        return args.medical_model, train, val
    diagnoser = Diagnoser(
        "small", epochs=args.epochs * 3, pretrain_epochs=0.5, seed=args.seed, show_progress=False
    ).fit(read_cases(train))
    model_dir = work / "model"
    diagnoser.save(model_dir)
    return model_dir, train, val


DATA = {"finance": _finance_data, "education": _education_data, "medical": _medical_data}


def _finance_paths(parent: Path, artifact: Path, val: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Batch scoring rows/s and real-time ms per transaction, parent vs artifact."""
    import pandas as pd

    from apps.finance.adapters import validate
    from apps.finance.predictor import FraudDetector
    from apps.finance.service import RealtimeScorer

    frame, _ = validate(pd.read_parquet(val))
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


def _medical_paths(parent: Path, artifact: Path, val: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per-case latency of `Diagnoser.explain` (what `verticals medical diagnose` runs), parent vs artifact."""
    from apps.medical.adapters import read_cases
    from apps.medical.predictor import Diagnoser

    cases = read_cases(val)[: args.medical_latency_cases]
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


def _options(variant: str, args: argparse.Namespace, use_moe: bool) -> CompressionOptions:
    options = CompressionOptions(int8=True, latency_repeats=args.repeats, explanations=True)
    if variant == "pruned_int8":
        options.prune_experts = use_moe
        options.expert_threshold = args.expert_threshold
        options.ffn_ratio = args.prune_ffn
    if variant == "qat_int8":
        options.qat_steps = args.qat_steps
    return options


def run_app(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or take) the parent, make the three artifacts, collect their figures."""
    from core.config import CoreConfig

    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, train, val = DATA[name](work, args)
    print(f"{name}: parent {model_dir} ready in {time.perf_counter() - started:.0f}s", flush=True)
    use_moe = CoreConfig.from_pretrained(model_dir).use_moe
    rows = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        report = run_compression(
            model_dir,
            work / variant,
            str(val),
            _options(variant, args, use_moe),
            qat_data=str(train) if variant == "qat_int8" else None,
            calibration_size=args.calibration_size,
        )
        metrics = report["metrics"]
        rows[variant] = {
            "size_ratio": report["sizes"]["size_ratio"],
            "artifact_bytes": report["sizes"]["artifact_bytes"],
            "artifact_bytes_with_explanations": report["sizes"]["artifact_bytes_with_explanations"],
            "parent_bytes": report["sizes"]["parent_safetensors_bytes"],
            "speedup_b1": report["latency"]["batch_1"]["speedup"],
            "speedup_b64": report["latency"]["batch_64"]["speedup"],
            "latency": report["latency"],
            "metric": metrics["headline"],
            "parent_metric": metrics["parent"][metrics["headline"]],
            "artifact_metric": metrics["artifact"][metrics["headline"]],
            "delta_points": metrics["headline_delta_points"],
            "pruned": report["pruned"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"{name} {variant}: {json.dumps({k: v for k, v in rows[variant].items() if k not in ('latency', 'pruned')})}",
            flush=True,
        )
    paths = None
    if name in APP_PATHS:
        paths = APP_PATHS[name](model_dir, work / "pruned_int8", val, args)
        print(f"{name} app paths (parent vs pruned_int8): {json.dumps(paths)}", flush=True)
    return {"parent": str(model_dir), "variants": rows, "app_paths": paths}


def _markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Compression benchmark",
        "",
        f"Run {meta['date']}; CPU `{meta['cpu']['model']}` (AVX512-VNNI {meta['cpu']['avx512_vnni']}, "
        f"AMX {meta['cpu']['amx_int8']}), onnxruntime {meta['cpu']['onnxruntime']}, torch {meta['cpu']['torch']}, "
        f"{meta['threads']} thread(s); load average at start {meta['load_average']}. Baseline: fp32 eager parent.",
        "",
        "Targets: size <= 18% of the parent's safetensors; latency >= 3x lower at batch 1 and 64; metric drop "
        "<= 1 point (PTQ) / <= 0.5 (QAT).",
        "",
        "| app | variant | metric | parent | artifact | delta (points) | size % (with explain graph) | speed-up b1 | speed-up b64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for app, result in results.items():
        for variant, row in result["variants"].items():
            with_explain = row["artifact_bytes_with_explanations"] / row["parent_bytes"]
            lines.append(
                f"| {app} | {variant} | {row['metric']} | {row['parent_metric']:.4f} | {row['artifact_metric']:.4f} | "
                f"{row['delta_points']:+.2f} | {100 * row['size_ratio']:.1f} ({100 * with_explain:.1f}) | "
                f"{row['speedup_b1']:.2f}x | {row['speedup_b64']:.2f}x |"
            )
    for app, result in results.items():
        paths = result.get("app_paths")
        if paths:
            lines += ["", f"{app} app paths, fp32 parent vs pruned_int8: `{json.dumps(paths)}`"]
    lines += [
        "",
        "Size % counts the inference graph and heads (`model.onnx`, `classifier.onnx` / `next_step.onnx`); the "
        "explanation graph (`model_explain.onnx`, attention weights for explain/diagnose) is optional "
        "(`--no-explanations`) and shown in brackets.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "verticals_compress_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="compress_bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--finance-accounts", type=int, default=300)
    parser.add_argument("--education-students", type=int, default=200)
    parser.add_argument("--medical-cases", type=int, default=60)
    parser.add_argument("--finance-model", type=Path)
    parser.add_argument("--education-model", type=Path)
    parser.add_argument("--medical-model", type=Path)
    parser.add_argument("--expert-threshold", type=float, default=0.02)
    parser.add_argument("--prune-ffn", type=float, default=0.25)
    parser.add_argument("--qat-steps", type=int, default=30)
    parser.add_argument("--calibration-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--realtime-transactions", type=int, default=200)
    parser.add_argument("--paths-only", action="store_true", help="Only re-measure the app paths of a run.")
    parser.add_argument("--medical-latency-cases", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="Training device of the parents (ONNX runs on CPU).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os

    from core.compress import cpu_flags

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_flags(),
        "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    results = {}
    if args.paths_only:
        # Re-measure only the app paths on the artifacts of an earlier run (same --work and --out).
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        meta, results = saved["meta"], saved["results"]
        meta["app_paths_measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for app in args.apps:
            if app in APP_PATHS and app in results:
                work = args.work / app
                val = work / ("val.parquet" if app == "finance" else "val")
                results[app]["app_paths"] = APP_PATHS[app](
                    Path(results[app]["parent"]), work / "pruned_int8", val, args
                )
                print(f"{app} app paths: {json.dumps(results[app]['app_paths'])}", flush=True)
    else:
        for app in args.apps:
            results[app] = run_app(app, args.work / app, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / f"{args.name}.md").write_text(_markdown(results, meta))
    print(_markdown(results, meta))


if __name__ == "__main__":
    main()

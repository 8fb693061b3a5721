"""Suite benchmark: routing figures of the suite model and each app's metric against its own model, one run.

On generator data (finance transactions, medical CT + record cases, education interactions), in one run:

1. the suite: one shared trunk trained jointly on the three apps (`apps.suite.train.train_suite`);
2. each app's own model: the same trainer, architecture and settings, on that app alone, with as many
   batches of its data and optimizer updates on them as the app gets in the suite (so the only difference
   is the joint training; the suite interleaves the apps, one optimizer step per app batch);
3. every model's parts are loaded through the apps' own predictors and scored on held-out test data:
   fraud average precision (the last week, with the earlier weeks as history), diagnosis macro AUROC
   (cases of another generator seed), knowledge-tracing AUC (held-out students, pyKT protocol);
4. the routing report of the suite on its validation data.

Figures (issue 6): >= 80% of each domain's routed mass on its own expert group plus the general experts; no
expert below 2% use within its group; each app's metric from the suite within 1 point (0.01) of its own
model's. With `--seeds N` every seed runs on its own generated data and the parity figure is the mean
paired delta over seeds with a 95% t-interval (one seed's delta moves by several points with the seed).

Usage:
    .venv/bin/python bench/suite_bench.py --seeds 15 --jobs 15 --test-cases 150 --accounts 600  # reported run
    # a screen of a suite-only change: data and own models of an earlier run in --work are reused
    .venv/bin/python bench/suite_bench.py --seeds 4 --jobs 2 --test-cases 150 --accounts 600 \
        --work /tmp/sb --reuse --own --finish-steps medical=32  # the suite alone, medical finishing
    .venv/bin/python bench/suite_bench.py                  # CPU, 1 thread (a few minutes)
    .venv/bin/python bench/suite_bench.py --device cuda --threads 8
    .venv/bin/python bench/suite_bench.py --quick          # smoke test
    # parity over several seed sets of the same settings (the per-seed deltas pooled)
    .venv/bin/python bench/suite_bench.py --pool bench/results/suite_bench.json \
        bench/results/suite_bench_seeds100.json bench/results/suite_bench_seeds200.json
Writes bench/results/suite_bench.json and .md (with --pool: suite_bench_pooled.json and .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.suite.config import trunk_overrides  # noqa: E402
from apps.suite.routing import routing_report  # noqa: E402
from apps.suite.train import (  # noqa: E402
    HEADLINE_METRICS,
    SuiteSettings,
    finish_plan,
    parse_finish_steps,
    train_suite,
)
from core.errors import InputValidationError  # noqa: E402
from core.train import resolve_model_dir  # noqa: E402

logger = logging.getLogger("suite_bench")
APPS = ("finance", "medical", "education")
METRIC_TOLERANCE = 0.01
ON_GROUP_TARGET = 0.80


# ------------------------------------------------------------------------------------------ data
DATA_ARGS = ("seed", "accounts", "cases", "test_cases", "ct_shape", "students", "answers")
"""The arguments that determine a seed's generated data (`make_data`)."""


def source_fingerprint() -> str:
    """SHA-256 over every Python file of `core/` and `apps/`: a cached own-model result is reused only by
    the same code."""
    from core.train import fingerprint

    files = sorted([*(ROOT / "core").rglob("*.py"), *(ROOT / "apps").rglob("*.py")])
    return fingerprint(*[f"{path.relative_to(ROOT)}\n".encode() + path.read_bytes() for path in files])


def load_or_make_data(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`make_data`, or with `--reuse` the data an earlier run generated in `work` with the same arguments."""
    key = {name: getattr(args, name) for name in DATA_ARGS}
    record = work / "data.json"
    if args.reuse and record.is_file():
        stored = json.loads(record.read_text())
        if stored.get("key") == key:
            logger.info("seed %s: reusing the data in %s", args.seed, work)
            data = stored["data"]
            return {
                **data,
                "train": {app: Path(path) for app, path in data["train"].items()},
                "test": {app: Path(path) for app, path in data["test"].items()},
            }
    record.unlink(missing_ok=True)  # written again only once the data is complete
    data = make_data(work, args)
    record.write_text(json.dumps({"key": key, "data": data}, indent=2, default=str))
    return data


def make_data(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Generate every app's training and test data under `work`."""
    from apps.education.service import write_atomic_csv
    from apps.education.synthetic import generate as simulate_students
    from apps.finance.synthetic import generate as simulate_transactions
    from apps.finance.synthetic import write as write_transactions
    from apps.medical.synthetic import generate as write_cases

    transactions = simulate_transactions(args.accounts, 28, seed=args.seed)
    cut = transactions["timestamp"].min() + pd.Timedelta(days=21)
    finance_train = write_transactions(transactions[transactions["timestamp"] < cut], work / "tx_train.csv")
    finance_test = write_transactions(transactions[transactions["timestamp"] >= cut], work / "tx_test.csv")

    shape = tuple(int(v) for v in args.ct_shape.split("x"))
    for folder in ("med_train", "med_test"):  # an earlier run's cases: regenerated for this run's settings
        shutil.rmtree(work / folder, ignore_errors=True)
    write_cases(work / "med_train", args.cases, args.seed, shape=shape)
    write_cases(work / "med_test", args.test_cases, args.seed + 1, shape=shape)

    frame, _, _ = simulate_students(
        students=args.students,
        skills=8,
        items_per_skill=6,
        interactions_per_student=args.answers,
        seed=args.seed,
    )
    users = frame["user_id"].drop_duplicates()
    test_users = set(users.sample(frac=0.2, random_state=args.seed))
    rows = frame.drop(columns="source_row")
    write_atomic_csv(rows[~rows["user_id"].isin(test_users)], work / "edu_train.csv")
    write_atomic_csv(rows[rows["user_id"].isin(test_users)], work / "edu_test.csv")
    return {
        "train": {
            "finance": finance_train,
            "medical": work / "med_train",
            "education": work / "edu_train.csv",
        },
        "test": {"finance": finance_test, "medical": work / "med_test", "education": work / "edu_test.csv"},
        "sizes": {
            "finance_rows": len(transactions),
            "finance_frauds": int(transactions["is_fraud"].sum()),
            "medical_cases": args.cases,
            "medical_test_cases": args.test_cases,
            "education_answers": len(frame),
            "education_students": int(users.size),
        },
    }


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(app: str, model_dir: Path, data: dict[str, Any], device: str) -> dict[str, float]:
    """The app's metrics of its part of `model_dir` on the test data, through the app's own predictor."""
    part = resolve_model_dir(model_dir, app)
    if app == "finance":
        from apps.finance.adapters import read_source, validate
        from apps.finance.metrics import fraud_metrics
        from apps.finance.predictor import FraudDetector

        detector = FraudDetector.load(part, device=device)
        history, _ = validate(read_source(str(data["train"]["finance"])))
        test, _ = validate(read_source(str(data["test"]["finance"])))
        scores = detector.predict_proba(test, history=history)
        days = test["timestamp"].dt.floor("D").to_numpy()
        return fraud_metrics(test["is_fraud"].to_numpy(), scores, days, detector.threshold_)
    if app == "medical":
        from apps.medical.predictor import Diagnoser
        from apps.medical.service import evaluate_model

        return evaluate_model(Diagnoser.load(part, device=device), data["test"]["medical"])
    from apps.education.adapters import read_interactions
    from apps.education.predictor import KnowledgeTracer

    tracer = KnowledgeTracer.load(part, device=device)
    frame = read_interactions(data["test"]["education"], format="canonical", on_invalid="raise").frame
    return tracer.evaluate(frame)


TEST_METRICS = {"finance": "average_precision", "medical": "auroc_macro", "education": "auc"}


# ------------------------------------------------------------------------------------------ main
def suite_settings(args: argparse.Namespace) -> SuiteSettings:
    """The suite's training settings (shared with bench/compress_bench.py).

    `--steps` task batches per app: an app with K finishing steps (`--finish-steps K` for every app, or
    `APP=K`) trains `--steps - K` of them with every app (interleaved: one optimizer step per app batch,
    the apps in turn; joint: one step per round of a batch of every app), spread over the joint stage, then
    K alone on its own embedders, head and expert group (`apps.suite.train.finish_schedule`).
    """
    steps = finish_plan(SuiteSettings(finish_steps=args.finish_steps), APPS)
    if any(not 0 <= k < args.steps for k in steps.values()):
        raise ValueError(
            f"--finish-steps must be in [0, --steps={args.steps}) per app, got {args.finish_steps}"
        )
    return SuiteSettings(
        epochs=1000.0,  # the length is set by the step caps, identical for every run
        pretrain_epochs=1000.0 if args.pretrain_steps > 0 else 0.0,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_steps=args.steps,
        pretrain_max_steps=args.pretrain_steps,
        finish_steps=args.finish_steps,
        loss_balance=args.loss_balance,
        balance_scope=args.balance_scope,
        balance_mix=args.balance_mix,
        balance_load=args.balance_load,
        settle_steps=args.settle_steps,
        settle_floor=args.settle_floor or None,
        settle_resamples=args.settle_resamples,
        optimizer_state=args.optimizer_state,
        interleave=args.step_mode == "interleaved",
        medical_preset=args.medical_preset,
        device=args.device,
        trunk=trunk_changes(args),
    )


def trunk_changes(args: argparse.Namespace) -> dict[str, int]:
    """Changes to the suite trunk (`apps.suite.config.TRUNK`) for a width study: `--hidden-size` (and
    `--ffn-size`, by default the hidden size, as in the preset); none by default."""
    changes = {}
    if args.hidden_size is not None:
        changes["hidden_size"] = args.hidden_size
        changes["ffn_size"] = args.ffn_size or args.hidden_size
    elif args.ffn_size is not None:
        changes["ffn_size"] = args.ffn_size
    return changes


def width_study_note(changes: dict[str, int] | None, context: str) -> str:
    """The report's sentence on a width study (`trunk_changes`): empty without one."""
    if not changes:
        return ""
    return (
        " Width study: shared trunk changed to "
        + ", ".join(f"{k} {v}" for k, v in changes.items())
        + f" {context}."
    )


TRUNK_WIDTHS = ("hidden_size", "ffn_size", "num_heads", "num_layers")


def trunk_widths(changes: dict[str, int] | None) -> dict[str, int]:
    """The shared trunk's widths with `changes` (`trunk_changes`) applied to the current preset."""
    trunk = trunk_overrides(**(changes or {}))
    return {k: trunk[k] for k in TRUNK_WIDTHS}


def mean_interval(deltas: list[float]) -> tuple[float | None, list[float] | None]:
    """The mean of paired deltas and its 95% t-interval (None without deltas, no interval with one)."""
    from scipy import stats

    if not deltas:
        return None, None
    mean = float(np.mean(deltas))
    if len(deltas) < 2:
        return mean, None
    half = float(stats.t.ppf(0.975, len(deltas) - 1) * np.std(deltas, ddof=1) / np.sqrt(len(deltas)))
    return mean, [mean - half, mean + half]


def own_settings(args: argparse.Namespace) -> SuiteSettings:
    """An app's own model: `--steps` task steps of all its parameters (no finishing), otherwise the suite's."""
    return dataclasses.replace(suite_settings(args), max_steps=args.steps, finish_steps=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    work_root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="suite-bench-"))
    work_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_or_make_data(work_root, args)
    data_seconds = time.perf_counter() - started
    settings = {"suite": suite_settings(args), "own": own_settings(args)}
    runs: dict[str, Any] = {}
    code = getattr(args, "code", None) or (source_fingerprint() if args.reuse else None)
    with warnings.catch_warnings():
        # Small validation sets: the finance threshold may fall back to best-F1; not what is measured here.
        warnings.simplefilter("ignore", UserWarning)
        own_apps = [app for app in APPS if app in args.own]
        for label, sources in [("suite", data["train"])] + [
            (app, {app: data["train"][app]}) for app in own_apps
        ]:
            run_settings = settings["suite" if label == "suite" else "own"]
            cache = work_root / f"run_{label}.json"
            key = {"settings": dataclasses.asdict(run_settings), "data": data["sizes"], "code": code}
            key = json.loads(json.dumps(key, default=str))
            if label != "suite" and args.reuse and cache.is_file():
                stored = json.loads(cache.read_text())
                if stored.get("key") == key:
                    runs[label] = stored["run"]
                    logger.info("%s: reusing the own model's run in %s", label, cache)
                    continue
            t0 = time.perf_counter()
            summary = train_suite(sources, work_root / f"model_{label}", run_settings)
            train_seconds = time.perf_counter() - t0
            tests = {app: evaluate(app, work_root / f"model_{label}", data, args.device) for app in sources}
            runs[label] = {
                "train_seconds": round(train_seconds, 1),
                "validation": {app: summary["metrics"][app].get(HEADLINE_METRICS[app]) for app in sources},
                "test": {app: tests[app].get(TEST_METRICS[app]) for app in sources},
                "test_all": tests,
            }
            logger.info("%s: %s (%.0f s)", label, runs[label]["test"], train_seconds)
            if label != "suite":
                cache.write_text(json.dumps({"key": key, "run": runs[label]}, indent=2, default=str))
    report = routing_report(work_root / "model_suite")
    comparison = {}
    for app in own_apps:
        suite_value, own_value = runs["suite"]["test"][app], runs[app]["test"][app]
        delta = None if suite_value is None or own_value is None else suite_value - own_value
        comparison[app] = {
            "metric": TEST_METRICS[app],
            "suite": suite_value,
            "own": own_value,
            "delta": delta,
            "within_tolerance": delta is not None and delta >= -METRIC_TOLERANCE,
            "within_abs_tolerance": delta is not None and abs(delta) <= METRIC_TOLERANCE,
        }
    checks = report["checks"]
    return {
        "settings": {
            "steps": args.steps,
            "finish_steps": args.finish_steps,
            "joint_steps": {
                app: args.steps - k for app, k in finish_plan(settings["suite"], list(APPS)).items()
            },
            "pretrain_steps": args.pretrain_steps,
            "step_mode": args.step_mode,
            "loss_balance": args.loss_balance,
            "balance_scope": args.balance_scope,
            "balance_mix": args.balance_mix,
            "balance_load": args.balance_load,
            "settle_steps": args.settle_steps,
            "settle_floor": args.settle_floor,
            "settle_resamples": args.settle_resamples,
            "optimizer_state": args.optimizer_state,
            "learning_rate": args.learning_rate,
            "trunk_changes": trunk_changes(args),
            "trunk": trunk_widths(trunk_changes(args)),
            "seed": args.seed,
            "medical_preset": args.medical_preset,
            "ct_shape": args.ct_shape,
            "device": args.device,
            "threads": args.threads,
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu": platform.processor()},
        "data": data["sizes"],
        "data_seconds": round(data_seconds, 1),
        "runs": runs,
        "comparison": comparison,
        "routing": {
            "on_group_share_per_layer": [layer["on_group_share"] for layer in report["layers"]],
            "on_group_share_all_layers": report["all_layers"]["on_group_share"],
            "max_violation_per_layer": [layer["max_violation"] for layer in report["layers"]],
            "low_use_experts_per_layer": [layer["low_use_experts"] for layer in report["layers"]],
            "mass_share_all_layers": report["all_layers"]["mass_share"],
            "load_all_layers": report["all_layers"]["load"],
            "expert_groups": report["expert_groups"],
        },
        "figures": {
            "on_group_min": checks["on_group_min"],
            "on_group_target_met": checks["on_group_min"] >= ON_GROUP_TARGET,
            "low_use_count": checks["low_use_count"],
            "no_low_use_met": checks["low_use_count"] == 0,
            "max_violation": checks["max_violation"],
            "metrics_within_1_point_met": all(c["within_tolerance"] for c in comparison.values()),
        },
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def _seed_run(args: argparse.Namespace) -> dict[str, Any]:
    """One seed's run in its own process (`--jobs`): logging set up again, the result returned."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(args)


def run_seeds(args: argparse.Namespace) -> dict[str, Any]:
    """`run` for seeds `args.seed` .. `args.seed + args.seeds - 1`, each on its own generated data.

    One seed's suite-vs-own delta is noisy (small test sets, one training run each), so the parity figure
    is the mean paired delta over seeds with a 95% t-interval. The routing figures are the first seed's,
    with the on-group share and low-use count taken as the worst over seeds.
    """
    work_root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="suite-bench-"))
    per_seed = []
    for offset in range(args.seeds):
        seed_args = argparse.Namespace(**vars(args))
        seed_args.seed, seed_args.work = args.seed + offset, str(work_root / f"seed{args.seed + offset}")
        per_seed.append(seed_args)
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(per_seed)), mp_context=context) as pool:
            results = list(pool.map(_seed_run, per_seed))
    else:
        results = [run(seed_args) for seed_args in per_seed]
    result = dict(results[0])
    seeds = {}
    for app in results[0]["comparison"]:
        deltas = [r["comparison"][app]["delta"] for r in results if r["comparison"][app]["delta"] is not None]
        mean, interval = mean_interval(deltas)
        seeds[app] = {
            "metric": TEST_METRICS[app],
            "suite": [r["comparison"][app]["suite"] for r in results],
            "own": [r["comparison"][app]["own"] for r in results],
            "deltas": deltas,
            "delta_mean": mean,
            "delta_ci95": interval,
            "within_tolerance": mean is not None and mean >= -METRIC_TOLERANCE,
        }
    result["seeds"] = {
        "seeds": [a.seed for a in per_seed],
        "apps": seeds,
        # Every seed's suite figures, also when no own model is trained (a screen of the suite alone).
        "suite_test": [r["runs"]["suite"]["test"] for r in results],
        "routing": [
            {
                "on_group_min": r["figures"]["on_group_min"],
                "low_use_count": r["figures"]["low_use_count"],
                "low_use_experts_per_layer": r["routing"]["low_use_experts_per_layer"],
                "max_violation": r["figures"]["max_violation"],
            }
            for r in results
        ],
    }
    figures = dict(result["figures"])
    figures["on_group_min"] = min(r["figures"]["on_group_min"] for r in results)
    figures["on_group_target_met"] = figures["on_group_min"] >= ON_GROUP_TARGET
    figures["low_use_count"] = max(r["figures"]["low_use_count"] for r in results)
    figures["no_low_use_met"] = figures["low_use_count"] == 0
    figures["max_violation"] = max(r["figures"]["max_violation"] for r in results)
    figures["metrics_within_1_point_met"] = all(c["within_tolerance"] for c in seeds.values())
    result["figures"] = figures
    result["total_seconds"] = round(sum(r["total_seconds"] for r in results), 1)
    return result


#: Settings that may differ between the seed sets `pool` combines: where and how fast they ran, and the
#: trunk as given (compared as the widths it resolves to).
POOL_FREE_SETTINGS = ("seed", "device", "threads", "trunk_changes", "trunk")


def _pool_key(settings: dict[str, Any]) -> dict[str, Any]:
    key = {k: v for k, v in settings.items() if k not in POOL_FREE_SETTINGS}
    # A run that predates the recorded widths resolves its changes against the current preset.
    key["trunk"] = settings.get("trunk") or trunk_widths(settings.get("trunk_changes"))
    return key


def pool(paths: list[Path]) -> dict[str, Any]:
    """Parity and routing over several `--seeds` runs of the same settings: the per-seed deltas of every
    file pooled into one mean with its 95% t-interval, and the routing figures taken over every seed.

    Raises:
        InputValidationError: a file that is missing, not a multi-seed result, run with other settings
            than the first (the differing keys are named), or repeating a seed of an earlier file.
    """
    loaded = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputValidationError(f"{path}: not a readable suite benchmark result ({error})") from None
        if "seeds" not in result or "settings" not in result:
            raise InputValidationError(
                f"{path}: not a multi-seed suite benchmark result (run with --seeds N)"
            )
        loaded.append((Path(path), result))
    first_path, first = loaded[0]
    reference = _pool_key(first["settings"])
    seen: dict[int, Path] = {}
    for path, result in loaded:
        key = _pool_key(result["settings"])
        differing = sorted(k for k in set(reference) | set(key) if reference.get(k) != key.get(k))
        if differing:
            raise InputValidationError(
                f"{path}: settings differ from {first_path}'s in "
                + ", ".join(f"{k} ({key.get(k)!r} vs {reference.get(k)!r})" for k in differing)
                + "; only runs of the same settings pool"
            )
        for seed in result["seeds"]["seeds"]:
            if seed in seen:
                raise InputValidationError(f"{path}: seed {seed} is already in {seen[seed]}")
            seen[seed] = path
    apps: dict[str, Any] = {}
    for app in first["seeds"]["apps"]:
        per_file = [r["seeds"]["apps"].get(app, {}).get("deltas", []) for _, r in loaded]
        deltas = [d for file_deltas in per_file for d in file_deltas]
        mean, interval = mean_interval(deltas)
        apps[app] = {
            "metric": TEST_METRICS[app],
            "deltas": deltas,
            "delta_mean": mean,
            "delta_ci95": interval,
            "file_means": [mean_interval(d)[0] for d in per_file],
            "within_tolerance": mean is not None and mean >= -METRIC_TOLERANCE,
        }
    routing = [x for _, r in loaded for x in r["seeds"]["routing"]]
    seeds = [seed for _, r in loaded for seed in r["seeds"]["seeds"]]
    below = [seed for seed, x in zip(seeds, routing, strict=True) if x["on_group_min"] < ON_GROUP_TARGET]
    low = [seed for seed, x in zip(seeds, routing, strict=True) if x["low_use_count"] > 0]
    return {
        "files": [str(path) for path, _ in loaded],
        "trunk_resolved": [str(path) for path, r in loaded if not r["settings"].get("trunk")],
        "settings": reference,
        "seeds": seeds,
        "apps": apps,
        "routing": {
            "on_group_min": min(x["on_group_min"] for x in routing),
            "seeds_below_on_group_target": below,
            "low_use_experts": sum(x["low_use_count"] for x in routing),
            "seeds_with_low_use": low,
        },
        "figures": {
            "on_group_target_met": not below,
            "no_low_use_met": not low,
            "metrics_within_1_point_met": all(c["within_tolerance"] for c in apps.values()),
        },
    }


def pooled_markdown(pooled: dict[str, Any]) -> str:
    """The report of `pool`."""
    s, r, f = pooled["settings"], pooled["routing"], pooled["figures"]
    trunk = ", ".join(f"{k} {v}" for k, v in s["trunk"].items())
    lines = [
        "# Suite benchmark, seed sets pooled",
        "",
        f"{len(pooled['seeds'])} seeds from {len(pooled['files'])} runs of the same settings ("
        + ", ".join(f"`{Path(x).name}`" for x in pooled["files"])
        + f"): {s['steps']} task steps, lr {s['learning_rate']}, trunk {trunk}"
        + (
            " (" + ", ".join(f"`{Path(x).name}`" for x in pooled["trunk_resolved"]) + " predate the recorded "
            "widths: their trunk changes are resolved against the current preset, apps/suite/config.py)"
            if pooled["trunk_resolved"]
            else ""
        )
        + ".",
        "",
        "| app | metric | mean delta per run | pooled mean delta [95% t-interval] | seeds | within 1 point |",
        "|---|---|---|---|---|---|",
    ]
    for app, c in pooled["apps"].items():
        runs = ", ".join("n/a" if m is None else f"{m:+.4f}" for m in c["file_means"])
        ci = "" if c["delta_ci95"] is None else f" [{c['delta_ci95'][0]:+.4f}, {c['delta_ci95'][1]:+.4f}]"
        mean = "n/a" if c["delta_mean"] is None else f"{c['delta_mean']:+.4f}{ci}"
        lines.append(
            f"| {app} | {c['metric']} | {runs} | {mean} | {len(c['deltas'])} | "
            f"{'yes' if c['within_tolerance'] else 'no'} |"
        )
    below = ", ".join(map(str, r["seeds_below_on_group_target"])) or "none"
    low = ", ".join(map(str, r["seeds_with_low_use"])) or "none"
    lines += [
        "",
        "## Figures",
        "",
        f"- >= 80% of each domain's routed mass on its group + general experts: lowest "
        f"{100 * r['on_group_min']:.1f}%, seeds below: {below} -> {'met' if f['on_group_target_met'] else 'not met'}",
        f"- no expert below 2% use within its group: {r['low_use_experts']} below, seeds: {low} -> "
        f"{'met' if f['no_low_use_met'] else 'not met'}",
        f"- each app's metric within 1 point of its own model (pooled mean): "
        f"{'met' if f['metrics_within_1_point_met'] else 'not met'}",
        "",
    ]
    return "\n".join(lines)


def _per_app(value: Any) -> dict[str, int]:
    """A per-app count of the settings (an int for every app, or app -> count) as app -> count."""
    return (
        {app: int(value.get(app, 0)) for app in APPS}
        if isinstance(value, dict)
        else dict.fromkeys(APPS, value)
    )


def _counts_text(counts: dict[str, int]) -> str:
    values = set(counts.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{app} {k}" for app, k in counts.items())


def _suite_budget(s: dict[str, Any]) -> str:
    finish = _per_app(s.get("finish_steps", 0))
    joint = _counts_text(_per_app(s.get("joint_steps", s["steps"])))
    if s.get("step_mode", "joint") == "interleaved":
        text = (
            f"Suite: interleaved, one optimizer step per app batch with the apps in turn ({joint} task and "
            f"{s['pretrain_steps']} masked-field batches per app: {len(APPS)}x the trainer steps of one app, so the shared "
            f"trunk gets {len(APPS)}x the updates, each from one app's batch)"
        )
    else:
        text = (
            f"Suite: joint, one optimizer step per round of a batch of every app ({joint} task rounds, app "
            f"losses added as `{s.get('loss_balance', 'sum')}`)"
        )
    if any(finish.values()):
        alone = {app: k for app, k in finish.items() if k}
        counts = (
            f"{_counts_text(alone)} per app"
            if len(alone) == len(APPS) and len(set(alone.values())) == 1
            else ", ".join(f"{app} {k}" for app, k in alone.items())
        )
        text += (
            f", then task batches alone on that app's embedders, head and domain expert group ({counts}; the "
            "shared trunk as the joint steps left it), taken out of its joint batches. An app's joint batches "
            "are spread evenly over the joint stage, whose cosine learning-rate schedule runs over all of its "
            "steps (so the other apps' batches keep their place in it), and each app's finishing is a Trainer "
            "run of its own: 5% warmup, then cosine decay from the peak learning rate to 0 over its steps"
        )
    text += f". Aux-free balancing scope: {s.get('balance_scope', 'all')}"
    if "balance_mix" in s:
        mix = {
            "tokens": "each app weighted by its share of the data's tokens",
            "batches": "the training batches as they come",
        }
        text += f", on {mix[s['balance_mix']]}"
    if "balance_load" in s:
        load = {
            "serving": "counted on each batch's routing as served (an eval-mode pass without dropout)",
            "train": "counted on the training passes (with dropout)",
        }
        text += f", {load[s['balance_load']]}"
    if s.get("settle_steps"):
        text += (
            f"; after training, {s['settle_steps']} bias updates per layer on the served (eval-mode) routing of "
            "every app's training examples, router fixed, "
            + (
                f"lifting only experts below {100 * s['settle_floor']:.0f}% of their group's load"
                if s.get("settle_floor")
                else "with the full balance rule"
            )
        )
        if s.get("settle_resamples") and s.get("settle_floor"):
            text += (
                f", a share that must hold on {s['settle_resamples']} bootstrap resamples of the training "
                "examples but for 5% of them"
            )
    if s.get("optimizer_state") == "per_app":
        text += "; AdamW moments kept per app (`core.multitask.TaskAdamW`)"
    return text + "."


def markdown(result: dict[str, Any]) -> str:
    s, f = result["settings"], result["figures"]
    lines = [
        "# Suite benchmark",
        "",
        f"Generator data ({result['data']}); lr {s['learning_rate']}, seed {s['seed']}, medical preset "
        f"`{s['medical_preset']}` (CT {s['ct_shape']}), device {s['device']}, {s['threads']} thread(s). "
        f"Total {result['total_seconds']:.0f} s."
        + width_study_note(
            s.get("trunk_changes"), "(apps/suite/config.py), for the suite and the own models alike"
        ),
        "",
        "Training budget per app, the same in the suite and in its own model: "
        f"{s['pretrain_steps']} masked-field batches, then {s['steps']} task batches of its own data, each "
        "batch one optimizer update of that app's parameters; same trainer (AdamW, cosine schedule, gradient "
        "clipping at 1), architecture and expert groups. " + _suite_budget(s),
        "",
        "## Each app: suite model vs its own model (same trainer, architecture and task batches), held-out test data",
        "",
        "| app | metric | suite | own model | delta | within 1 point |",
        "|---|---|---|---|---|---|",
    ]
    for app, c in result["comparison"].items():
        suite = "n/a" if c["suite"] is None else f"{c['suite']:.4f}"
        own = "n/a" if c["own"] is None else f"{c['own']:.4f}"
        delta = "n/a" if c["delta"] is None else f"{c['delta']:+.4f}"
        lines.append(
            f"| {app} | {c['metric']} | {suite} | {own} | {delta} | {'yes' if c['within_tolerance'] else 'no'} |"
        )
    if "seeds" in result:
        seeds = result["seeds"]
        lines += [
            "",
            f"The table above is seed {seeds['seeds'][0]}. Over seeds {seeds['seeds']} (each on its own "
            "generated data), suite minus own model:",
            "",
            "| app | metric | suite per seed | own per seed | mean delta [95% t-interval] | within 1 point |",
            "|---|---|---|---|---|---|",
        ]
        for app, c in seeds["apps"].items():
            values = [", ".join("n/a" if v is None else f"{v:.4f}" for v in c[k]) for k in ("suite", "own")]
            ci = "" if c["delta_ci95"] is None else f" [{c['delta_ci95'][0]:+.4f}, {c['delta_ci95'][1]:+.4f}]"
            mean = "n/a" if c["delta_mean"] is None else f"{c['delta_mean']:+.4f}{ci}"
            lines.append(
                f"| {app} | {c['metric']} | {values[0]} | {values[1]} | {mean} | "
                f"{'yes' if c['within_tolerance'] else 'no'} |"
            )
        if not seeds["apps"] and seeds.get("suite_test"):
            lines += [
                "",
                "No own model trained; the suite's test figures per seed: "
                + "; ".join(
                    f"seed {seed}: " + ", ".join(f"{app} {value:.4f}" for app, value in test.items())
                    for seed, test in zip(seeds["seeds"], seeds["suite_test"], strict=True)
                ),
            ]
        per_seed = seeds.get("routing", [])
        if per_seed:
            lines += [
                "",
                "Routing per seed: experts < 2% of their group "
                + ", ".join(str(r["low_use_count"]) for r in per_seed)
                + "; lowest on-group share "
                + ", ".join(f"{100 * r['on_group_min']:.1f}%" for r in per_seed)
                + ".",
            ]
    lines += [
        "",
        "Training time (s): "
        + ", ".join(f"{k} {v['train_seconds']:.0f}" for k, v in result["runs"].items())
        + ".",
        "",
        "## Routing of the suite (validation data of every app)",
        "",
        "| layer | "
        + " | ".join(f"{d}: own group + general" for d in APPS)
        + " | max violation | experts < 2% of group |",
        "|---|" + "---|" * (len(APPS) + 2),
    ]
    routing = result["routing"]
    for index, shares in enumerate(routing["on_group_share_per_layer"]):
        low = routing["low_use_experts_per_layer"][index]
        low_text = (
            ", ".join(f"{x['expert']} ({x['group']} {100 * x['share_in_group']:.1f}%)" for x in low) or "none"
        )
        lines.append(
            f"| {index} | "
            + " | ".join(f"{100 * shares[d]:.1f}%" for d in APPS)
            + f" | {routing['max_violation_per_layer'][index]:.2f} | {low_text} |"
        )
    lines += [
        "",
        "## Figures",
        "",
        f"- >= 80% of each domain's routed mass on its group + general experts: lowest "
        f"{100 * f['on_group_min']:.1f}% -> {'met' if f['on_group_target_met'] else 'not met'}",
        f"- no expert below 2% use within its group: {f['low_use_count']} below -> "
        f"{'met' if f['no_low_use_met'] else 'not met'}",
        "- each app's metric within 1 point of its own model"
        + (" (mean over seeds)" if "seeds" in result else "")
        + f": {'met' if f['metrics_within_1_point_met'] else 'not met'} (a suite metric higher than the own "
        "model's counts as within)",
        f"- load balance (max violation, max over layers): {f['max_violation']:.2f}",
        "",
    ]
    return "\n".join(lines)


def _finish_steps_argument(text: str) -> int | dict[str, int]:
    try:
        return parse_finish_steps(text)
    except InputValidationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's training settings and generated data sizes (shared with bench/compress_bench.py)."""
    parser.add_argument("--steps", type=int, default=240, help="task steps per app and run")
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=None,
        help="Width study: the shared trunk's hidden size (default: the suite preset, apps/suite/config.py).",
    )
    parser.add_argument(
        "--ffn-size",
        type=int,
        default=None,
        help="Width study: the experts' FFN width (default: the hidden size with --hidden-size, else the preset).",
    )
    parser.add_argument(
        "--pretrain-steps", type=int, default=24, help="suite masked-field steps per run (0: skip)"
    )
    parser.add_argument(
        "--step-mode",
        default="interleaved",
        choices=("interleaved", "joint"),
        help="suite optimizer steps: one per app batch, apps in turn (interleaved), or one per round of a "
        "batch of every app with the losses added (joint)",
    )
    parser.add_argument(
        "--finish-steps",
        type=_finish_steps_argument,
        default=0,
        help="of --steps, an app's last task steps alone on its own parameters: K (every app) or APP=K[,APP=K] "
        "(e.g. medical=32); 0: none",
    )
    parser.add_argument(
        "--loss-balance", default="sum", choices=("sum", "relative"), help="joint steps: how losses add"
    )
    parser.add_argument(
        "--balance-scope",
        default="within",
        choices=("all", "group", "within"),
        help="aux-free balancing: global mean (all), global plus within each expert group (group), or "
        "within each expert group only (within)",
    )
    parser.add_argument(
        "--balance-mix",
        default="tokens",
        choices=("tokens", "batches"),
        help="aux-free balancing: on each app's share of the data's tokens (tokens) or on the training "
        "batches as they come (batches)",
    )
    parser.add_argument(
        "--balance-load",
        default="train",
        choices=("serving", "train"),
        help="aux-free balancing: count each training batch's routing as served, eval mode without dropout "
        "(serving: one extra forward pass per batch) or the training passes (train)",
    )
    parser.add_argument(
        "--settle-steps",
        type=int,
        default=300,
        help="after training, aux-free updates of each layer's expert bias on the served (eval-mode) routing "
        "of every app's training examples, router fixed (0: none)",
    )
    parser.add_argument(
        "--settle-floor",
        type=float,
        default=0.08,
        help="the settling only lifts experts below this share of their group's served load (0: the full "
        "balance rule)",
    )
    parser.add_argument(
        "--settle-resamples",
        type=int,
        default=200,
        help="the settle floor must hold on this many bootstrap resamples of the training examples but for "
        "5%% of them (0: on the examples themselves)",
    )
    parser.add_argument(
        "--optimizer-state",
        default="per_app",
        choices=("per_app", "shared"),
        help="AdamW moments kept per app (per_app) or one state for every step (shared)",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--ct-shape", default="32x64x64")
    parser.add_argument("--medical-preset", default="tiny")
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--answers", type=int, default=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run (each on its own data)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    parser.add_argument(
        "--own",
        nargs="*",
        default=list(APPS),
        choices=APPS,
        help="the apps whose own model is trained and compared (default all; fewer or none: a faster screen "
        "of the suite alone)",
    )
    add_suite_arguments(parser)
    parser.add_argument("--work", help="folder for data and models (default: a new temporary folder)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="screening: reuse the data and the own models' results an earlier run left in --work when "
        "they were made with the same data arguments, own-model settings and code (core/, apps/); only the "
        "suite is trained again",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (not written)")
    parser.add_argument(
        "--pool",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="pool the seeds of earlier --seeds runs of the same settings (their suite_bench*.json) into one "
        "parity and routing report, written to --out as suite_bench_pooled.json and .md; nothing is trained",
    )
    args = parser.parse_args()
    if args.pool:
        try:
            pooled = pool(args.pool)
        except InputValidationError as error:
            parser.error(str(error))
        text = pooled_markdown(pooled)
        print(text)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite_bench_pooled.json").write_text(json.dumps(pooled, indent=2))
        (out / "suite_bench_pooled.md").write_text(text)
        return
    if args.quick:
        args.steps, args.pretrain_steps, args.accounts, args.cases, args.test_cases = 6, 2, 60, 15, 10
        args.finish_steps = {app: min(k, 2) for app, k in _per_app(args.finish_steps).items()}
        args.ct_shape, args.students, args.answers = "16x32x32", 40, 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    # Once, before any training: the code the worker processes import is the code this fingerprints.
    args.code = source_fingerprint() if args.reuse else None
    result = run_seeds(args) if args.seeds > 1 else run(args)
    text = markdown(result)
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite_bench.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "suite_bench.md").write_text(text)


if __name__ == "__main__":
    main()

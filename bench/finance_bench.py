"""Finance benchmark: the sequence fraud model against gradient boosting on the handbook's aggregate features.

Sections (one run, side by side; figures are measured here, nothing is copied from elsewhere):

1. handbook: ../shared/data/finance/fraud-handbook-simulated with the handbook protocol (train 7 days from
   2018-07-25, 7-day label delay, test the next 7 days, cards with known fraud removed from the test
   set). Baseline: scikit-learn HistGradientBoostingClassifier on the handbook's 15 aggregate features
   (amount, weekend, night, customer count/mean amount over 1/7/30 days, terminal count/risk over
   1/7/30 days with the 7-day delay). Ours: FraudDetector (trained on the same 7 days, with the
   preceding weeks as unlabelled-for-training context). AP mean and spread over seeds.
2. generator: our synthetic generator, train on the earlier weeks, test on the later ones; same two models.
3. throughput: `service.score` end to end (read CSV, validate, encode, model, write Parquet), one thread.
4. realtime: `RealtimeScorer` latency over 10,000 replayed transactions, one thread (p50, p99).

Writes bench/results/finance_bench.json and .md.

Usage:
    .venv/bin/python bench/finance_bench.py                 # everything (several minutes on a CPU)
    .venv/bin/python bench/finance_bench.py --seeds 1 --sections throughput realtime
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.finance import service  # noqa: E402
from apps.finance.adapters import read_source, validate  # noqa: E402
from apps.finance.predictor import FraudDetector  # noqa: E402
from apps.finance.synthetic import generate, write  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HANDBOOK = ROOT.parent / "shared" / "data" / "finance" / "fraud-handbook-simulated"
DAY = pd.Timedelta(days=1)
FEATURES = [
    "amount",
    "weekend",
    "night",
    *(f"customer_{kind}_{w}d" for w in (1, 7, 30) for kind in ("count", "mean_amount")),
    *(f"terminal_{kind}_{w}d" for w in (1, 7, 30) for kind in ("count", "risk")),
]


# ---------------------------------------------------------------------- aggregate features (baseline)
def _window_sums(
    group: np.ndarray, seconds: np.ndarray, values: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Sum of `values` over rows of the same group with time in (lo, hi] (rows sorted by group, time)."""
    key = group.astype(np.int64) << 32 | seconds.astype(np.int64)
    cum = np.concatenate([[0.0], np.cumsum(values)])
    upper = np.searchsorted(key, group.astype(np.int64) << 32 | hi.astype(np.int64), "right")
    lower = np.searchsorted(key, group.astype(np.int64) << 32 | lo.astype(np.int64), "right")
    return cum[upper] - cum[lower]


def aggregate_features(df: pd.DataFrame, delay_days: int = 7) -> pd.DataFrame:
    """The handbook's 15 features for every row of a canonical frame (customer = account, terminal = merchant)."""
    t0 = df["timestamp"].min().normalize()
    seconds = ((df["timestamp"] - t0) // pd.Timedelta(seconds=1)).to_numpy().astype(np.int64) + 100 * 86_400
    out = pd.DataFrame(index=df.index)
    out["amount"] = df["amount"].to_numpy()
    out["weekend"] = (df["timestamp"].dt.day_of_week >= 5).astype(int).to_numpy()
    out["night"] = (df["timestamp"].dt.hour <= 6).astype(int).to_numpy()
    amount = df["amount"].to_numpy()
    fraud = df["is_fraud"].to_numpy().astype(float)
    for name, column in (("customer", "account_id"), ("terminal", "merchant_id")):
        codes = pd.factorize(df[column])[0]
        order = np.lexsort((seconds, codes))
        g, s = codes[order], seconds[order]
        for w in (1, 7, 30):
            if name == "customer":
                lo, hi = s - w * 86_400, s
                count = _window_sums(g, s, np.ones(len(s)), lo, hi)
                total = _window_sums(g, s, amount[order], lo, hi)
                out.loc[out.index[order], f"customer_count_{w}d"] = count
                out.loc[out.index[order], f"customer_mean_amount_{w}d"] = total / np.maximum(count, 1)
            else:
                hi = s - delay_days * 86_400
                lo = hi - w * 86_400
                count = _window_sums(g, s, np.ones(len(s)), lo, hi)
                frauds = _window_sums(g, s, fraud[order], lo, hi)
                out.loc[out.index[order], f"terminal_count_{w}d"] = count
                out.loc[out.index[order], f"terminal_risk_{w}d"] = np.where(
                    count > 0, frauds / np.maximum(count, 1), 0.0
                )
    return out[FEATURES]


def boosting_ap(
    features: pd.DataFrame, train_mask: np.ndarray, test_mask: np.ndarray, labels: np.ndarray, seed: int
) -> tuple[float, float]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import average_precision_score

    started = time.perf_counter()
    model = HistGradientBoostingClassifier(random_state=seed).fit(features[train_mask], labels[train_mask])
    scores = model.predict_proba(features[test_mask])[:, 1]
    return float(average_precision_score(labels[test_mask], scores)), time.perf_counter() - started


def sequence_ap(
    df: pd.DataFrame,
    train_mask: np.ndarray,
    test_mask: np.ndarray,
    history_mask: np.ndarray,
    seed: int,
    params: dict,
) -> tuple[float, float, dict]:
    """Train FraudDetector on train rows (history rows as context), score every row from the test start on."""
    from sklearn.metrics import average_precision_score

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        detector = FraudDetector(seed=seed, validation_share=0.0, **params).fit(
            df[train_mask], history=df[history_mask]
        )
    test_start, test_stop = df.loc[test_mask, "timestamp"].min(), df.loc[test_mask, "timestamp"].max()
    scored = ((df["timestamp"] >= test_start) & (df["timestamp"] <= test_stop)).to_numpy()
    context = ((df["timestamp"] < test_start) & (df["timestamp"] >= test_start - 40 * DAY)).to_numpy()
    scores = pd.Series(detector.predict_proba(df[scored], history=df[context]), index=df.index[scored])
    ap = float(average_precision_score(df.loc[test_mask, "is_fraud"], scores.loc[df.index[test_mask]]))
    return ap, time.perf_counter() - started, detector.training_metrics_


# ---------------------------------------------------------------------- sections
def handbook_section(seeds: int, params: dict) -> dict:
    files = [HANDBOOK / f"transactions_2018-{m:02d}.csv.gz" for m in (6, 7, 8)]
    if not all(f.is_file() for f in files):
        return {"skipped": f"handbook data not found under {HANDBOOK}"}
    frames = [validate(read_source(f, format="handbook"))[0] for f in files]
    df = pd.concat(frames).reset_index(drop=True)
    df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    start = pd.Timestamp("2018-07-25", tz="UTC")
    train_end = start + 7 * DAY
    train_mask = ((df["timestamp"] >= start) & (df["timestamp"] < train_end)).to_numpy()
    # The handbook's protocol: cards with a fraud in the training week, or in the delay period up to each
    # test day minus the delay, are known compromised and removed from that test day.
    known = set(df.loc[train_mask & (df["is_fraud"] == 1).to_numpy(), "account_id"])
    day_index = ((df["timestamp"] - start) // DAY).to_numpy()
    test_mask = np.zeros(len(df), bool)
    for day in range(7):
        delay_day = day_index == 7 + day - 1
        known |= set(df.loc[delay_day & (df["is_fraud"] == 1).to_numpy(), "account_id"])
        today = day_index == 14 + day
        test_mask |= today & ~df["account_id"].isin(known).to_numpy()
    history_mask = ((df["timestamp"] >= start - 28 * DAY) & (df["timestamp"] < start)).to_numpy()
    labels = df["is_fraud"].to_numpy()
    features = aggregate_features(df)
    result: dict = {
        "train_rows": int(train_mask.sum()),
        "train_frauds": int(labels[train_mask].sum()),
        "test_rows": int(test_mask.sum()),
        "test_frauds": int(labels[test_mask].sum()),
        "boosting_ap": [],
        "sequence_ap": [],
        "boosting_seconds": [],
        "sequence_seconds": [],
    }
    for seed in range(seeds):
        ap, seconds = boosting_ap(features, train_mask, test_mask, labels, seed)
        result["boosting_ap"].append(round(ap, 4))
        result["boosting_seconds"].append(round(seconds, 1))
        ap, seconds, _ = sequence_ap(df, train_mask, test_mask, history_mask, seed, params)
        result["sequence_ap"].append(round(ap, 4))
        result["sequence_seconds"].append(round(seconds, 1))
        print(
            f"handbook seed {seed}: boosting AP {result['boosting_ap'][-1]}, sequence AP {ap:.4f}", flush=True
        )
    return result


def generator_section(seeds: int, params: dict, accounts: int, days: int, test_days: int) -> dict:
    df = generate(accounts, days, seed=11).drop(columns="scenario").reset_index(drop=True)
    test_start = df["timestamp"].min().normalize() + (days - test_days) * DAY
    train_mask = (df["timestamp"] < test_start).to_numpy()
    test_mask = ~train_mask
    labels = df["is_fraud"].to_numpy()
    features = aggregate_features(df)
    result: dict = {
        "accounts": accounts,
        "days": days,
        "train_rows": int(train_mask.sum()),
        "train_frauds": int(labels[train_mask].sum()),
        "test_rows": int(test_mask.sum()),
        "test_frauds": int(labels[test_mask].sum()),
        "boosting_ap": [],
        "sequence_ap": [],
    }
    for seed in range(seeds):
        ap, _ = boosting_ap(features, train_mask, test_mask, labels, seed)
        result["boosting_ap"].append(round(ap, 4))
        ap, _, _ = sequence_ap(df, train_mask, test_mask, np.zeros(len(df), bool), seed, params)
        result["sequence_ap"].append(round(ap, 4))
        print(
            f"generator seed {seed}: boosting AP {result['boosting_ap'][-1]}, sequence AP {ap:.4f}",
            flush=True,
        )
    return result


def _demo_model(work: Path, params: dict) -> tuple[Path, pd.DataFrame]:
    df = generate(800, 35, seed=21)
    cut = df["timestamp"].min().normalize() + 28 * DAY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        detector = FraudDetector(**params).fit(df[df["timestamp"] < cut])
    return detector.save(work / "model"), df


def throughput_section(work: Path, model_dir: Path, accounts: int, days: int) -> dict:
    df = generate(accounts, days, seed=31)
    source = write(df, work / "throughput.csv")
    started = time.perf_counter()
    report = service.score(model_dir, source, work / "scores.parquet", 100_000, progress=False)
    seconds = time.perf_counter() - started
    return {
        "rows": report.rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(report.rows / seconds, 0),
        "chunk_size": 100_000,
        "target_rows_per_second": 10_000,
    }


def realtime_section(model_dir: Path, df: pd.DataFrame, n: int) -> dict:
    detector = FraudDetector.load(model_dir)
    cut = df["timestamp"].min().normalize() + 28 * DAY
    scorer = service.RealtimeScorer(detector, history=df[df["timestamp"] < cut])
    records = df[df["timestamp"] >= cut].drop(columns="scenario").to_dict("records")[:n]
    latencies = []
    for record in records:
        started = time.perf_counter()
        scorer.score(record)
        latencies.append(1000 * (time.perf_counter() - started))
    values = np.array(latencies)
    return {
        "transactions": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "max_ms": round(float(values.max()), 3),
        "target_p99_ms": 10.0,
    }


def _summary(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f} (n={len(values)})" if values else "-"


def markdown(results: dict) -> str:
    lines = [
        "# Finance benchmark",
        "",
        f"load average (1, 5, 15 min) at start {results.get('load_average_at_start')}, "
        f"at end {results.get('load_average_at_end')}: timings are only as clean as the machine was idle",
        "",
        f"{results['machine']}; torch threads {results['threads']}; model {results['params']}",
        "",
    ]
    for name in ("handbook", "generator"):
        section = results.get(name)
        if not section:
            continue
        lines += [f"## {name}", ""]
        if "skipped" in section:
            lines += [section["skipped"], ""]
            continue
        lines += [
            f"train {section['train_rows']:,} rows ({section['train_frauds']} frauds), "
            f"test {section['test_rows']:,} rows ({section['test_frauds']} frauds)",
            "",
            "| model | average precision (mean ± std over seeds) | per seed |",
            "|---|---|---|",
            f"| HistGradientBoosting on 15 aggregate features | {_summary(section['boosting_ap'])} | {section['boosting_ap']} |",
            f"| FraudDetector (sequence model) | {_summary(section['sequence_ap'])} | {section['sequence_ap']} |",
            "",
        ]
    if "throughput" in results:
        t = results["throughput"]
        lines += [
            "## batch scoring (one thread, CSV in, Parquet out)",
            "",
            f"{t['rows']:,} rows in {t['seconds']} s: **{t['rows_per_second']:,.0f} rows/s** (target {t['target_rows_per_second']:,})",
            "",
        ]
    if "realtime" in results:
        r = results["realtime"]
        lines += [
            "## real-time scoring (one thread)",
            "",
            f"{r['transactions']:,} transactions: p50 **{r['p50_ms']} ms**, p99 **{r['p99_ms']} ms**, max {r['max_ms']} ms (target p99 {r['target_p99_ms']} ms)",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sections", nargs="+", default=["handbook", "generator", "throughput", "realtime"])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--pretrain-epochs", type=float, default=0.25)
    parser.add_argument("--generator-accounts", type=int, default=600)
    parser.add_argument("--throughput-accounts", type=int, default=3000)
    parser.add_argument("--realtime-transactions", type=int, default=10_000)
    parser.add_argument("--name", default="finance_bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    params = dict(epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, batch_size=64, learning_rate=2e-3)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
        "threads": torch.get_num_threads(),
        "params": params,
        "seeds": args.seeds,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if "handbook" in args.sections:
        results["handbook"] = handbook_section(args.seeds, params)
    if "generator" in args.sections:
        results["generator"] = generator_section(args.seeds, params, args.generator_accounts, 42, 14)
    with tempfile.TemporaryDirectory(prefix="finance-bench-") as tmp:
        work = Path(tmp)
        if {"throughput", "realtime"} & set(args.sections):
            model_dir, df = _demo_model(work, params)
        if "throughput" in args.sections:
            results["throughput"] = throughput_section(work, model_dir, args.throughput_accounts, 40)
            print("throughput", results["throughput"], flush=True)
        if "realtime" in args.sections:
            results["realtime"] = realtime_section(model_dir, df, args.realtime_transactions)
            print("realtime", results["realtime"], flush=True)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

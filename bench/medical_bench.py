"""Medical benchmark: fusion vs image-only vs record-only AUROC, few-shot rare-class accuracy, CPU latency.

Phases (``--phases``, comma-separated):

- ``design``: how much the generator lets fusion gain, without CT: gradient boosting on the record fields,
  on the true lesion pattern (a perfect CT reader) and on both, macro AUROC on held-out drawn cases.
- ``accuracy``: generates semi-synthetic train/test sets (base labels) and a pool of rare ``miliary`` cases,
  trains three diagnosers with the same settings (CT + record, CT only, record only) and reports AUROC per
  class, macro AUROC, accuracy, Brier and ECE on the held-out test set.
- ``fewshot``: on the fusion model, >= 200 episodes per k in (1, 5, 20): k support cases of the rare class
  give its prototype (`Diagnoser.add_class`, no retraining); the query is 20 other rare cases + 20 base test
  cases. Reports 6-way query accuracy and rare-class recall with 95 % intervals, against a logistic
  regression (class-balanced) fitted on the same embeddings (base training cases + the k support cases),
  and the paired accuracy difference (both see the same episodes). The fusion model's outputs are saved as
  ``medical_fewshot_outputs.npz``; ``--fewshot-outputs FILE`` draws the episodes again from such a file.
- ``latency``: per case on the CPU (``torch.set_num_threads(2)``): read a 64-slice 512 x 512 DICOM series and
  its record, resample, run the model (``predict``) and, separately, ``explain``; p50/p95 over repeats. With
  ``--int8`` the same for the int8 ONNX Runtime artifact that `core.compress` makes of the model.

Usage:
    python bench/medical_bench.py --phases accuracy,fewshot --device cuda --train-cases 400
    python bench/medical_bench.py --phases latency --model bench/results/medical_model --int8
    python bench/medical_bench.py --phases fewshot --fewshot-outputs medical_fewshot_outputs.npz
Results are merged into ``<out>/medical_bench.json`` and ``<out>/medical_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.medical.adapters import read_case, read_cases  # noqa: E402
from apps.medical.predictor import Diagnoser, classification_metrics  # noqa: E402
from apps.medical.schema import PatientRecord  # noqa: E402
from apps.medical.synthetic import LABEL_WEIGHTS, RARE_LABELS, generate  # noqa: E402

RARE = RARE_LABELS[0]
BASE = tuple(label for label in LABEL_WEIGHTS if label not in RARE_LABELS)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """CoreConfig fields the run sets instead of the preset's (`--stem-channels`, `--pooling`)."""
    overrides: dict[str, object] = {}
    if args.stem_channels is not None:
        overrides["volume_stem_channels"] = args.stem_channels
    if args.pooling is not None:
        overrides["classifier_pooling"] = args.pooling
    return overrides


def _labels(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    weights = np.array([LABEL_WEIGHTS[label] for label in BASE])
    return [BASE[i] for i in rng.choice(len(BASE), size=n, p=weights / weights.sum())]


def _image_only(cases):
    return [replace(c, record=PatientRecord(patient_id=c.record.patient_id, missing=("all",))) for c in cases]


def _record_only(cases):
    return [replace(c, volume=None) for c in cases]


_VIEWS = {"fusion": (lambda c: c), "image_only": _image_only, "record_only": _record_only}


def _fit_variant(name: str, preset: str, settings: dict, work: str, model_dir: str | None = None, cases=None):
    """Train one variant on ``work/train`` and score it on ``work/test`` (or on `cases`, the two already
    read): (metrics, diagnoser), or only the metrics when `model_dir` is given (the model is saved there; a
    process of its own returns it that way)."""
    view = _VIEWS[name]
    train, test = cases or (read_cases(Path(work) / "train"), read_cases(Path(work) / "test"))
    t0 = time.perf_counter()
    diagnoser = Diagnoser(preset, labels=list(BASE), **settings).fit(view(train))
    fit_s = time.perf_counter() - t0
    metrics = classification_metrics(
        [c.label for c in test], diagnoser.predict_proba(view(test)), diagnoser.classes_
    )
    metrics["fit_seconds"] = fit_s
    if model_dir is None:
        return metrics, diagnoser
    diagnoser.save(model_dir, metrics=metrics)
    return metrics


def _print_variant(name: str, metrics: dict) -> None:
    print(
        f"{name:>12}: macro AUROC {metrics['auroc_macro']:.4f}  accuracy {metrics['accuracy']:.3f}  "
        f"ECE {metrics['ece']:.3f}  ({metrics['fit_seconds']:.0f}s)",
        flush=True,
    )


def _interval(values) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def phase_accuracy(args, work: Path, results: dict) -> dict:
    shape = tuple(int(v) for v in args.shape.split("x"))
    t0 = time.perf_counter()
    work = args.data or work
    subsets = {
        "train": (args.train_cases, args.seed, _labels(args.train_cases, args.seed)),
        "test": (args.test_cases, args.seed + 1, _labels(args.test_cases, args.seed + 1)),
        "rare": (args.rare_cases, args.seed + 2, [RARE] * args.rare_cases),
    }
    for name, (count, seed, labels) in subsets.items():
        if not (work / name / "cases.csv").is_file():  # reuse a data set written by an earlier run
            generate(work / name, count, seed, shape=shape, labels=labels, jobs=args.jobs)
    train, test = read_cases(work / "train"), read_cases(work / "test")
    print(
        f"generated {len(train)} train / {len(test)} test / {args.rare_cases} rare cases in "
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    settings = dict(
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        show_progress=False,
        config_overrides=_overrides(args),
        stem_epochs=args.stem_epochs,
        stem_learning_rate=args.stem_lr,
        freeze_stem=not args.train_stem,
    )
    names = args.variants.split(",")
    table, models = {}, {}
    if args.variant_jobs > 1:  # each variant in its own process (a GPU fits several); same settings
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        model_dirs = {name: work / "models" / name for name in names}
        with ProcessPoolExecutor(args.variant_jobs, mp_context=get_context("spawn")) as pool:
            futures = {
                name: pool.submit(_fit_variant, name, args.preset, settings, str(work), str(model_dirs[name]))
                for name in names
            }
            for name in names:
                table[name] = futures[name].result()
                _print_variant(name, table[name])
        models = {name: Diagnoser.load(model_dirs[name], device=args.device) for name in names}
    else:
        for name in names:
            table[name], models[name] = _fit_variant(
                name, args.preset, settings, str(work), cases=(train, test)
            )
            _print_variant(name, table[name])
    state = {"fusion": models.get("fusion"), "train": train, "test": test, "rare": read_cases(work / "rare")}
    if len(table) < 3:
        print("not every variant trained: the accuracy figures are not recorded", flush=True)
        return state
    best_single = max(table["image_only"]["auroc_macro"], table["record_only"]["auroc_macro"])
    results["accuracy"] = {
        "settings": {
            **settings,
            "preset": args.preset,
            "shape": list(shape),
            "train_cases": len(train),
            "test_cases": len(test),
            "seed": args.seed,
            # What the preset and the overrides gave the trained model (0: linear patch embedding).
            "volume_stem_channels": models["fusion"].model_.config.volume_stem_channels,
        },
        "models": table,
        "fusion_minus_best_single_auroc": table["fusion"]["auroc_macro"] - best_single,
    }
    if args.save_model:
        models["fusion"].save(args.save_model, metrics=table["fusion"])
    return state


def phase_design(args, results: dict) -> None:
    """Ceilings of the generator's design: gradient boosting on the drawn findings, no CT.

    ``record`` sees the record fields, ``image pattern`` the true lesion pattern (a perfect CT reader),
    ``both`` the two: the margin a fusion model can reach over the better single modality.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    from apps.medical.encode import CATEGORY_VALUES, RECORD_FIELDS, record_values
    from apps.medical.synthetic import PATTERNS, sample_findings

    def features(n: int, seed: int):
        findings = [sample_findings(i, seed, label=label) for i, label in enumerate(_labels(n, seed))]
        record = []
        for f in findings:
            values = record_values(f.record)
            record.append(
                [
                    np.nan
                    if values[name] is None
                    else CATEGORY_VALUES[name].index(values[name])
                    if name in CATEGORY_VALUES
                    else float(values[name])
                    for name in RECORD_FIELDS
                ]
            )
        record = np.array(record, dtype=np.float64)
        pattern = np.eye(len(PATTERNS))[[PATTERNS.index(f.pattern) for f in findings]]
        return record, pattern, [f.label for f in findings]

    train_record, train_pattern, train_y = features(args.design_cases, args.seed + 20)
    test_record, test_pattern, test_y = features(args.design_cases // 2, args.seed + 21)
    observed = ~np.isnan(train_record).all(axis=0)  # fields the generator never writes carry nothing
    views = {
        "record": (train_record[:, observed], test_record[:, observed]),
        "image pattern": (train_pattern, test_pattern),
        "both": (
            np.hstack([train_record[:, observed], train_pattern]),
            np.hstack([test_record[:, observed], test_pattern]),
        ),
    }
    out = {}
    for name, (train_x, test_x) in views.items():
        model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=args.seed)
        model.fit(train_x, train_y)
        metrics = classification_metrics(test_y, model.predict_proba(test_x), list(model.classes_))
        out[name] = {"auroc_macro": metrics["auroc_macro"], "accuracy": metrics["accuracy"]}
        print(f"design {name:>13}: macro AUROC {metrics['auroc_macro']:.3f}", flush=True)
    best_single = max(out["record"]["auroc_macro"], out["image pattern"]["auroc_macro"])
    results["design"] = {
        "cases": {"train": args.design_cases, "test": args.design_cases // 2},
        "views": out,
        "both_minus_best_single_auroc": out["both"]["auroc_macro"] - best_single,
    }


def phase_fewshot(args, state: dict, results: dict) -> None:
    diagnoser, train, test, rare = state["fusion"], state["train"], state["test"], state["rare"]
    _, train_emb = diagnoser.outputs(train)
    test_logits, test_emb = diagnoser.outputs(test)
    rare_logits, rare_emb = diagnoser.outputs(rare)
    outputs = {
        "classes": np.array(diagnoser.classes_),
        "base_prototypes": diagnoser.prototypes_.base.detach().cpu().numpy(),
        "train_embeddings": train_emb,
        "train_labels": np.array([c.label for c in train]),
        "test_logits": test_logits,
        "test_embeddings": test_emb,
        "test_labels": np.array([c.label for c in test]),
        "rare_logits": rare_logits,
        "rare_embeddings": rare_emb,
    }
    # The fusion model's outputs, so the episodes can be drawn again without retraining (--fewshot-outputs).
    np.savez_compressed(args.out / "medical_fewshot_outputs.npz", **outputs)
    fewshot_episodes(args, outputs, results)


def fewshot_episodes(args, outputs, results: dict) -> None:
    """>= 200 episodes per k: the prototype path (`apps.medical.predictor`) vs logistic regression.

    Both see the same support and query cases in each episode, so the paired difference is reported too.
    """
    from sklearn.linear_model import LogisticRegression

    from apps.medical.predictor import class_prototype, fewshot_probabilities

    train_emb, train_y = outputs["train_embeddings"], outputs["train_labels"]
    test_logits, test_emb, test_y = outputs["test_logits"], outputs["test_embeddings"], outputs["test_labels"]
    rare_logits, rare_emb = outputs["rare_logits"], outputs["rare_embeddings"]
    classes = np.array([*outputs["classes"], RARE])
    base_prototypes = torch.as_tensor(outputs["base_prototypes"])
    rng = np.random.default_rng(args.seed)
    out = {}
    for k in (1, 5, 20):
        proto_acc, proto_recall, lr_acc, lr_recall = [], [], [], []
        for _ in range(args.episodes):
            order = rng.permutation(len(rare_emb))
            support, query_rare = order[:k], order[k : k + 20]
            query_base = rng.choice(len(test_emb), size=min(20, len(test_emb)), replace=False)
            q_logits = np.concatenate([rare_logits[query_rare], test_logits[query_base]])
            q_emb = np.concatenate([rare_emb[query_rare], test_emb[query_base]])
            q_y = np.array([RARE] * len(query_rare) + list(test_y[query_base]))
            is_rare = q_y == RARE
            proba = fewshot_probabilities(
                torch.as_tensor(q_logits),
                torch.as_tensor(q_emb),
                base_prototypes,
                [class_prototype(rare_emb[support])],
            )
            predicted = classes[proba.numpy().argmax(axis=1)]
            proto_acc.append(float((predicted == q_y).mean()))
            proto_recall.append(float((predicted[is_rare] == RARE).mean()))
            baseline = LogisticRegression(max_iter=500, class_weight="balanced")
            baseline.fit(
                np.concatenate([train_emb, rare_emb[support]]), np.concatenate([train_y, [RARE] * k])
            )
            predicted = baseline.predict(q_emb)
            lr_acc.append(float((predicted == q_y).mean()))
            lr_recall.append(float((predicted[is_rare] == RARE).mean()))
        out[f"{k}_shot"] = {
            "prototype_accuracy": _interval(proto_acc),
            "prototype_rare_recall": _interval(proto_recall),
            "logreg_accuracy": _interval(lr_acc),
            "logreg_rare_recall": _interval(lr_recall),
            "accuracy_difference": _interval(np.subtract(proto_acc, lr_acc)),
            "episodes": args.episodes,
        }
        p, lr = out[f"{k}_shot"]["prototype_accuracy"], out[f"{k}_shot"]["logreg_accuracy"]
        diff = out[f"{k}_shot"]["accuracy_difference"]
        print(
            f"{k:>2}-shot: prototype {p[0]:.3f} [{p[1]:.3f}, {p[2]:.3f}]  logreg {lr[0]:.3f} "
            f"[{lr[1]:.3f}, {lr[2]:.3f}]  paired difference {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]",
            flush=True,
        )
    results["fewshot"] = {"query": "20 rare + 20 base test cases, 6-way", **out}


def _timings(run, repeats: int) -> dict:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times = np.array(times)
    return {
        "p50_s": float(np.percentile(times, 50)),
        "p95_s": float(np.percentile(times, 95)),
        "mean_s": float(times.mean()),
        "repeats": repeats,
    }


def _int8_model(args, model_dir: Path, work: Path) -> Path | None:
    """The int8 ONNX artifact of `model_dir` (core.compress), or None when compression is unavailable."""
    try:
        from core.compress import CompressionOptions, compress
    except ImportError as e:
        print(f"int8: core.compress unavailable ({e})", flush=True)
        return None
    from apps.medical.encode import encode_case

    parent = Diagnoser.load(model_dir)
    generate(work / "lat_calib", 16, args.seed + 3, labels=[BASE[i % 5] for i in range(16)])
    calibration = [encode_case(c, parent.grid_, parent.record_stats_) for c in read_cases(work / "lat_calib")]
    out_dir = work / "int8_model"
    compress(model_dir, out_dir, CompressionOptions(int8=True, measure_latency=False), calibration)
    return out_dir


def phase_latency(args, work: Path, results: dict) -> None:
    import warnings

    torch.set_num_threads(2)
    if args.model:
        model_dir = args.model
        source = str(args.model)
    else:
        generate(
            work / "lat_train", 16, args.seed, shape=(16, 48, 48), labels=[BASE[i % 5] for i in range(16)]
        )
        Diagnoser(
            args.preset,
            epochs=1,
            pretrain_epochs=0,
            stem_epochs=1,
            show_progress=False,
            config_overrides=_overrides(args),
        ).fit(read_cases(work / "lat_train")).save(work / "lat_model")
        model_dir = work / "lat_model"
        overrides = _override_text({"config_overrides": _overrides(args)})
        source = (
            f"untrained {args.preset} preset{overrides} (1 epoch on 16 cases; weights do not change the cost)"
        )
    generate(work / "lat", 1, args.seed, shape=(64, 512, 512), labels=[BASE[2]])
    series, record = work / "lat" / "case_0000" / "ct", work / "lat" / "case_0000" / "record.json"

    def read():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read_case(series, record)

    out = {
        "model": source,
        "series": "64 x 512 x 512 DICOM slices + record JSON",
        "threads": 2,
        "cpu": platform.processor() or platform.machine(),
        "load_average_1m_at_start": os.getloadavg()[0],  # other work on the machine skews absolute times
        "cpu_count": os.cpu_count(),
    }
    models = {"fp32": Diagnoser.load(model_dir)}
    if args.int8:
        int8_dir = _int8_model(args, model_dir, work)
        if int8_dir is not None:
            models["int8"] = Diagnoser.load(int8_dir)
            case = read()
            reference, quantised = (models[k].predict_proba([case])[0] for k in ("fp32", "int8"))
            out["int8_max_probability_change"] = float(np.abs(reference - quantised).max())
    for precision, diagnoser in models.items():
        for name, run in (
            ("predict", lambda d=diagnoser: d.predict_proba([read()])),
            ("explain", lambda d=diagnoser: d.explain(read())),
        ):
            key = name if precision == "fp32" else f"{name}_{precision}"
            out[key] = _timings(run, args.repeats)
            print(
                f"latency {key:>14}: p50 {out[key]['p50_s']:.3f}s  p95 {out[key]['p95_s']:.3f}s", flush=True
            )
    results["latency"] = out


def _override_text(settings: dict) -> str:
    overrides = settings.get("config_overrides") or {}
    return "".join(f", {name}={value}" for name, value in overrides.items())


def _stage0_text(settings: dict) -> str:
    """The stem's stage 0, when the run's model has a CT stem (`Diagnoser.pretrain_stem`)."""
    overrides = settings.get("config_overrides") or {}
    stem = settings.get("volume_stem_channels", overrides.get("volume_stem_channels", 0))
    if not stem or not settings.get("stem_epochs"):
        return ""
    frozen = "frozen" if settings.get("freeze_stem", True) else "trained on"
    return (
        f"; stage 0: the CT stem alone, {settings['stem_epochs']} epochs at peak lr "
        f"{settings.get('stem_learning_rate')}, then {frozen}"
    )


def write_markdown(results: dict) -> str:
    lines = ["# Medical benchmark", ""]
    if "accuracy" in results:
        acc = results["accuracy"]
        s = acc["settings"]
        lines += [
            f"Held-out semi-synthetic test set: {s['test_cases']} cases, trained on {s['train_cases']} "
            f"({s['preset']} preset{_override_text(s)}, {s['epochs']} epochs, batch {s['batch_size']}, "
            f"lr {s['learning_rate']}, series {s['shape']}, device {s['device']}{_stage0_text(s)}).",
            "",
        ]
        models = acc["models"]
        classes = [k for k in models["fusion"] if k.startswith("auroc_") and k != "auroc_macro"]
        lines += [
            "| model | "
            + " | ".join(c.removeprefix("auroc_") for c in classes)
            + " | macro AUROC | accuracy | Brier | ECE |",
            "|---" * (len(classes) + 5) + "|",
        ]
        for name, m in models.items():
            cells = [f"{m.get(c, float('nan')):.3f}" for c in classes]
            lines.append(
                f"| {name} | "
                + " | ".join(cells)
                + f" | {m['auroc_macro']:.3f} | {m['accuracy']:.3f} | {m['brier']:.3f} | {m['ece']:.3f} |"
            )
        lines += [
            "",
            f"Fusion macro AUROC minus the better single modality: "
            f"{acc['fusion_minus_best_single_auroc']:+.3f}",
            "",
        ]
    if "design" in results:
        design = results["design"]
        lines += [
            f"Design ceilings (gradient boosting on {design['cases']['train']} drawn cases' findings, "
            f"{design['cases']['test']} held out; `image pattern` = the true lesion pattern, i.e. a perfect "
            "CT reader):",
            "",
            "| view | macro AUROC | accuracy |",
            "|---|---|---|",
        ]
        for name, m in design["views"].items():
            lines.append(f"| {name} | {m['auroc_macro']:.3f} | {m['accuracy']:.3f} |")
        lines += [
            "",
            f"Both minus the better single view: {design['both_minus_best_single_auroc']:+.3f}",
            "",
        ]
    if "fewshot" in results:
        few = results["fewshot"]
        lines += [
            f"Few-shot `{RARE}` ({few['query']}), mean [95 % interval] over episodes:",
            "",
            "| shots | episodes | prototype acc | logreg acc | prototype - logreg (paired) "
            "| prototype rare recall | logreg rare recall |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in (1, 5, 20):
            e = few[f"{k}_shot"]
            cell = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
            diff = e.get("accuracy_difference")
            paired = f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "-"
            lines.append(
                f"| {k} | {e['episodes']} | {cell(e['prototype_accuracy'])} | {cell(e['logreg_accuracy'])} | "
                f"{paired} | {cell(e['prototype_rare_recall'])} | {cell(e['logreg_rare_recall'])} |"
            )
        lines.append("")
    if "latency" in results:
        lat = results["latency"]
        lines += [
            f"CPU latency per case ({lat['series']}, {lat['threads']} threads, model: {lat['model']}; "
            f"1-minute load average {lat.get('load_average_1m_at_start', float('nan')):.1f} on "
            f"{lat.get('cpu_count', os.cpu_count())} cores at the start):",
            "",
            "| path | p50 s | p95 s | mean s |",
            "|---|---|---|---|",
        ]
        for name in ("predict", "explain", "predict_int8", "explain_int8"):
            if name not in lat:
                continue
            m = lat[name]
            label = name.replace("_int8", " (int8 ONNX)") if name.endswith("_int8") else f"{name} (fp32)"
            lines.append(
                f"| read + resample + {label} | {m['p50_s']:.3f} | {m['p95_s']:.3f} | {m['mean_s']:.3f} |"
            )
        if "int8_max_probability_change" in lat:
            lines.append("")
            lines.append(
                f"int8 vs fp32 on the latency case: largest probability change "
                f"{lat['int8_max_probability_change']:.4f}."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default="design,accuracy,fewshot,latency")
    parser.add_argument("--train-cases", type=int, default=400)
    parser.add_argument("--test-cases", type=int, default=150)
    parser.add_argument("--rare-cases", type=int, default=60)
    parser.add_argument("--shape", default="32x96x96")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--epochs", type=float, default=30.0)
    parser.add_argument("--pretrain-epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--stem-channels",
        type=int,
        help="accuracy: CT stem channels instead of the preset's (0: linear patch embedding)",
    )
    parser.add_argument(
        "--pooling",
        choices=("mean", "max", "modality_mean", "modality_max"),
        help="accuracy: classifier pooling instead of the preset's",
    )
    parser.add_argument(
        "--stem-epochs", type=float, default=30.0, help="stage 0: the CT stem trained alone (with a stem)"
    )
    parser.add_argument("--stem-lr", type=float, default=3e-4, help="stage 0 peak learning rate")
    parser.add_argument(
        "--train-stem", action="store_true", help="keep training the stem after stage 0 (default: frozen)"
    )
    parser.add_argument(
        "--variant-jobs", type=int, default=1, help="accuracy: train the variants in this many processes"
    )
    parser.add_argument(
        "--variants",
        default="fusion,image_only,record_only",
        help="accuracy: which of fusion,image_only,record_only to train (exploration; the figure needs all)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="data generation processes")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument(
        "--fewshot-outputs",
        type=Path,
        help="fewshot: draw the episodes again from a saved medical_fewshot_outputs.npz (no training)",
    )
    parser.add_argument("--design-cases", type=int, default=3000, help="design: drawn training cases")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", type=Path, help="latency: a saved model directory (default: a quick one)")
    parser.add_argument(
        "--data", type=Path, help="accuracy: keep/reuse the generated data sets in this folder"
    )
    parser.add_argument("--save-model", type=Path, help="accuracy: save the fusion model here")
    parser.add_argument(
        "--int8", action="store_true", help="latency: also time the int8 ONNX model (core.compress)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    phases = args.phases.split(",")
    if "fewshot" in phases and "fusion" not in args.variants.split(","):
        parser.error("--phases fewshot needs the fusion variant in --variants")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "medical_bench.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}

    def save() -> str:  # after each phase, so a run stopped later keeps what it measured
        json_path.write_text(json.dumps(results, indent=2))
        markdown = write_markdown(results)
        (args.out / "medical_bench.md").write_text(markdown)
        return markdown

    with tempfile.TemporaryDirectory(prefix="medical-bench-") as tmp:
        work = Path(tmp)
        if args.fewshot_outputs is not None:
            with np.load(args.fewshot_outputs) as saved:
                fewshot_episodes(args, dict(saved), results)
            save()
        elif "accuracy" in phases or "fewshot" in phases:
            state = phase_accuracy(args, work, results)
            save()
            if "fewshot" in phases:
                phase_fewshot(args, state, results)
                save()
        if "design" in phases:
            phase_design(args, results)
            save()
        if "latency" in phases:
            phase_latency(args, work, results)
    print(save())


if __name__ == "__main__":
    main()

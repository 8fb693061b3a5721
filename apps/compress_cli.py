"""`verticals compress`: prune and quantise a model directory (`core.compress`), with its metric cost.

Usage:
    verticals compress --model models/fraud --data tx_val.parquet --out models/fraud-int8 --int8
    verticals compress --model models/tracer --data edu/val.csv --out models/tracer-small \\
        --prune-experts --prune-ffn 0.25 --int8 --qat-steps 50 --qat-data edu/train.csv
    verticals compress --model suite --domain medical --data cases --out medical-int8 --prune-experts --int8
    verticals compress --model suite --domain finance --data tx_val.csv --out fraud-int8 --int8 \
        --keep-fp32 classifier --keep-sensitive 0.05

With a suite directory and `--domain D` the part `suite/D` (the shared trunk plus that app's embedders and
heads, no other app's) is compressed; `--prune-experts` keeps the experts D's routing uses, and
`compression.json` also sizes the artifact against the whole fp32 suite (`suite_safetensors_bytes`).

The output is a model directory the app commands load unchanged (`verticals finance score --model OUT`,
...): pruned fp32 weights (`model.safetensors`), or with `--int8` / `--qat-steps` an ONNX Runtime int8
model (`model.onnx`). `compression.json` beside it records sizes, latency at batch 1 and 64 against the
fp32 eager parent, the app metric before and after (`--data`: the app's labelled validation data), the
CPU's VNNI/AMX flags and what was pruned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from core.errors import InputValidationError


@dataclass(frozen=True)
class AppTask:
    """How compression reaches one app: encode its data and evaluate its model directory.

    Attributes:
        metric: the headline metric (higher is better) whose delta the figures use.
        examples: (model_dir, data) -> encoded examples with task targets (see `core.data`).
        evaluate: (model_dir, data) -> the app's evaluation metrics.
    """

    metric: str
    examples: Callable[[Path, str], list[dict[str, Any]]]
    evaluate: Callable[[Path, str], dict[str, Any]]


def _finance_frame(data: str):
    from apps.finance.adapters import read_source, validate

    frame, _ = validate(read_source(data))
    return frame


def _finance_examples(model_dir: Path, data: str) -> list[dict[str, Any]]:
    from apps.finance.predictor import FraudDetector

    detector = FraudDetector.load(model_dir)
    windows = detector.encoder_.encode(_finance_frame(data), detector.new_state(), with_labels=True)
    return list(windows.examples)


def _finance_evaluate(model_dir: Path, data: str) -> dict[str, Any]:
    from apps.finance.metrics import fraud_metrics
    from apps.finance.predictor import FraudDetector
    from apps.finance.schema import LABEL_COLUMN

    detector = FraudDetector.load(model_dir)
    frame = _finance_frame(data)
    if LABEL_COLUMN not in frame.columns:
        raise InputValidationError(f"{data}: evaluation needs the label column {LABEL_COLUMN!r}")
    scores = detector.predict_proba(frame)
    days = frame["timestamp"].dt.floor("D").to_numpy()
    return fraud_metrics(frame[LABEL_COLUMN].to_numpy(), scores, days, detector.threshold_)


def _education_frame(data: str):
    from apps.education.adapters import read_interactions

    return read_interactions(Path(data)).frame


def _education_examples(model_dir: Path, data: str) -> list[dict[str, Any]]:
    from apps.education.encode import make_windows, to_examples, to_sequences
    from apps.education.predictor import KnowledgeTracer

    tracer = KnowledgeTracer.load(model_dir)
    sequences = to_sequences(
        _education_frame(data), tracer.item_vocab_, tracer.skill_vocab_, on_unknown="unknown"
    )
    windows = make_windows(sequences, maxlen=tracer.maxlen, mode="sliding")
    # The tracer's skill -> domain map (sub-domain routing) when the model uses one.
    extra = {"skill_domain": tracer._skill_domain()} if hasattr(tracer, "_skill_domain") else {}
    return list(to_examples(windows, **extra))


def _education_evaluate(model_dir: Path, data: str) -> dict[str, Any]:
    from apps.education.predictor import KnowledgeTracer

    return KnowledgeTracer.load(model_dir).evaluate(_education_frame(data))


def _medical_examples(model_dir: Path, data: str) -> list[dict[str, Any]]:
    from apps.medical.adapters import read_cases
    from apps.medical.encode import encode_case
    from apps.medical.predictor import Diagnoser

    diagnoser = Diagnoser.load(model_dir)
    label_ids = {name: i for i, name in enumerate(diagnoser.labels_)}
    cases = [c for c in read_cases(data) if c.label in label_ids]
    if not cases:
        raise InputValidationError(
            f"{data}: no case has a label among the model's classes {diagnoser.labels_}"
        )
    return [encode_case(c, diagnoser.grid_, diagnoser.record_stats_, label_ids=label_ids) for c in cases]


def _medical_evaluate(model_dir: Path, data: str) -> dict[str, Any]:
    from apps.medical.predictor import Diagnoser
    from apps.medical.service import evaluate_model

    return evaluate_model(Diagnoser.load(model_dir), Path(data))


APP_TASKS = {
    "finance": AppTask("average_precision", _finance_examples, _finance_evaluate),
    "education": AppTask("auc", _education_examples, _education_evaluate),
    "medical": AppTask("auroc_macro", _medical_examples, _medical_evaluate),
}


def app_task(model_dir: Path) -> tuple[str, AppTask]:
    """The app of a model directory (from its app.json) and its `AppTask`.

    Raises:
        InputValidationError: not a model directory, or an app compression does not know.
    """
    meta_file = model_dir / "app.json"
    if not meta_file.is_file():
        raise InputValidationError(f"{model_dir}: not a verticals model directory (app.json missing)")
    name = json.loads(meta_file.read_text()).get("app")
    if name not in APP_TASKS:
        raise InputValidationError(f"{model_dir}: app {name!r}; compression knows {sorted(APP_TASKS)}")
    return name, APP_TASKS[name]


def suite_safetensors_bytes(suite_dir: Path) -> int:
    """Bytes of the fp32 suite model as one safetensors file: every tensor of its parts, the shared trunk once.

    The parts of a suite directory (`DIR/<app>/model.safetensors`) each hold a copy of the shared trunk; a
    tensor with the same name and the same bytes in several parts is counted once (the trunk), every other
    tensor (each app's embedders, heads, domain rows) once per part. The tensors are written to a temporary
    safetensors file and its size returned, so the figure includes the format's header like the parts'.

    Raises:
        InputValidationError: not a suite directory, or a part without model.safetensors.
    """
    import hashlib
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from apps.suite.train import read_suite

    suite_dir = Path(suite_dir)
    unique: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    for domain in read_suite(suite_dir)["domains"]:
        path = suite_dir / domain / "model.safetensors"
        if not path.is_file():
            raise InputValidationError(f"{path}: missing; the suite part {domain!r} has no fp32 weights")
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = weights.get_tensor(name)
                digest = hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                if (name, digest) in seen:
                    continue
                seen.add((name, digest))
                unique[f"{domain}.{name}"] = tensor.contiguous()
    with tempfile.TemporaryDirectory(prefix="verticals-suite-size-") as work:
        target = Path(work) / "suite.safetensors"
        save_file(unique, str(target))
        return target.stat().st_size


def _subsample(examples: Sequence[dict[str, Any]], limit: int, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np

    if len(examples) <= limit:
        return list(examples)
    chosen = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in chosen]


def run_compression(
    model: Path,
    out: Path,
    data: str,
    options: Any,
    qat_data: Optional[str] = None,
    domain: Optional[str] = None,
    calibration_size: int = 256,
) -> dict[str, Any]:
    """Compress an app model directory and add the app metric before/after to `compression.json`.

    Args:
        model: an app model directory or a suite directory (then `domain` picks the part).
        out: the compressed model directory.
        data: the app's labelled validation data (calibration, latency and the metric deltas).
        options: a `core.compress.CompressionOptions`.
        qat_data: labelled data for QAT (default `data`).
        domain: the suite part, also the domain whose experts `--prune-experts` keeps when the model's
            config knows it (otherwise the experts the app's data uses are kept).
        calibration_size: examples used for routing statistics, importance and latency.

    Returns:
        The report written to `out/compression.json`.
    """
    from core.compress import compress, metric_deltas, update_report
    from core.train import load_checkpoint, resolve_model_dir

    model_dir = resolve_model_dir(model, domain)
    _, task = app_task(model_dir)
    config = load_checkpoint(model_dir)[0].config
    options.domain = domain if domain is not None and domain in config.domains else None
    examples = task.examples(model_dir, data)
    if not examples:
        raise InputValidationError(f"{data}: nothing the model can encode")
    calibration = _subsample(examples, calibration_size)
    task_examples = None
    if options.qat_steps:
        task_examples = examples if qat_data is None else task.examples(model_dir, qat_data)
    compress(model_dir, out, options, calibration, task_examples)
    parent_metrics = task.evaluate(model_dir, data)
    artifact_metrics = task.evaluate(out, data)
    deltas = metric_deltas(parent_metrics, artifact_metrics)
    suite = None
    if model_dir != Path(model):  # a part of a suite directory: also size against the whole suite model
        report = json.loads((out / "compression.json").read_text())
        suite_bytes = suite_safetensors_bytes(Path(model))
        suite = {
            "suite_dir": str(Path(model).resolve()),
            "domain": domain,
            "suite_safetensors_bytes": suite_bytes,
            "size_ratio_vs_suite": round(report["sizes"]["artifact_bytes"] / suite_bytes, 4),
            "size_ratio_vs_suite_with_explanations": round(
                report["sizes"]["artifact_bytes_with_explanations"] / suite_bytes, 4
            ),
        }
    return update_report(
        out,
        suite=suite,
        metrics={
            "data": str(data),
            "qat_data": str(qat_data or data) if options.qat_steps else None,
            "headline": task.metric,
            "parent": parent_metrics,
            "artifact": artifact_metrics,
            "delta": deltas,
            "headline_delta_points": round(100 * deltas.get(task.metric, float("nan")), 3),
        },
    )


def compress_command(
    model: Annotated[
        Path, typer.Option("--model", help="Model directory (or suite directory with --domain).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the compressed model.")],
    data: Annotated[
        str,
        typer.Option("--data", help="The app's labelled validation data (calibration and metric deltas)."),
    ],
    domain: Annotated[
        Optional[str], typer.Option("--domain", help="Suite part to compress / domain whose experts to keep.")
    ] = None,
    prune_experts: Annotated[
        bool, typer.Option("--prune-experts", help="Drop the routed experts the domain does not use.")
    ] = False,
    expert_threshold: Annotated[
        float, typer.Option("--expert-threshold", help="Drop experts with at most this share of assignments.")
    ] = 0.0,
    prune_ffn: Annotated[
        float, typer.Option("--prune-ffn", help="Share of FFN units to remove (0-1).")
    ] = 0.0,
    prune_heads: Annotated[
        float, typer.Option("--prune-heads", help="Share of attention heads to remove (0-1).")
    ] = 0.0,
    prune_layers: Annotated[
        int,
        typer.Option(
            "--prune-layers",
            min=0,
            help="Encoder layers to drop: those that change their input least on the calibration data "
            "(block influence).",
        ),
    ] = 0,
    prune_ffn_blocks: Annotated[
        int,
        typer.Option(
            "--prune-ffn-blocks",
            min=0,
            help="Feed-forward (MoE) blocks to drop, those of least block influence; their layers keep "
            "attention.",
        ),
    ] = 0,
    int8: Annotated[bool, typer.Option("--int8", help="Export to ONNX and quantise to int8.")] = False,
    qat_steps: Annotated[
        int, typer.Option("--qat-steps", help="Fake-quantised fine-tuning steps before the int8 export.")
    ] = 0,
    qat_data: Annotated[
        Optional[str], typer.Option("--qat-data", help="Labelled data for QAT (default: --data).")
    ] = None,
    qat_objective: Annotated[
        str,
        typer.Option(
            "--qat-objective",
            help="What QAT trains towards: 'task' (the data's targets), 'distill' (the fp32 parent's "
            "outputs) or 'task+distill'.",
        ),
    ] = "task",
    explanations: Annotated[
        bool,
        typer.Option(help="Also export the explanation graph (attention weights) used by explain/diagnose."),
    ] = True,
    keep_fp32: Annotated[
        Optional[list[str]],
        typer.Option(
            "--keep-fp32",
            help="Module path pattern kept in fp32 by --int8 (repeatable, e.g. 'volume_embedder.*', "
            "'classifier'); always kept: the MoE routers and domain priors and the convolutional CT stem.",
        ),
    ] = None,
    keep_sensitive: Annotated[
        float,
        typer.Option(
            "--keep-sensitive",
            min=0.0,
            help="Keep fp32 every module group (embedder, layer attention/FFN, head) whose int8 quantisation "
            "alone changes the outputs by more than this relative error on the calibration data (0: off).",
        ),
    ] = 0.0,
    calibration_size: Annotated[
        int, typer.Option("--calibration-size", min=1, help="Examples for statistics and latency.")
    ] = 256,
    latency_repeats: Annotated[
        int, typer.Option("--latency-repeats", min=1, help="Timed forwards per batch size (median).")
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print compression.json on stdout.")] = False,
) -> None:
    """Prune experts / FFN units / heads / layers and quantise to int8 (ONNX Runtime); write compression.json."""
    from core.compress import QAT_OBJECTIVES, CompressionOptions

    if not 0.0 <= prune_ffn < 1.0:
        raise typer.BadParameter(f"expected a share in [0, 1); got {prune_ffn}", param_hint="--prune-ffn")
    if not 0.0 <= prune_heads < 1.0:
        raise typer.BadParameter(f"expected a share in [0, 1); got {prune_heads}", param_hint="--prune-heads")
    if qat_steps < 0:
        raise typer.BadParameter(f"expected an integer >= 0; got {qat_steps}", param_hint="--qat-steps")
    if qat_objective not in QAT_OBJECTIVES:
        raise typer.BadParameter(
            f"expected one of {', '.join(QAT_OBJECTIVES)}; got {qat_objective!r}",
            param_hint="--qat-objective",
        )
    from core.onnx_model import KEEP_FP32_DEFAULT

    options = CompressionOptions(
        keep_fp32=tuple(KEEP_FP32_DEFAULT) + tuple(keep_fp32 or ()),
        keep_sensitive=keep_sensitive,
        prune_experts=prune_experts,
        expert_threshold=expert_threshold,
        ffn_ratio=prune_ffn,
        head_ratio=prune_heads,
        layer_drop=prune_layers,
        ffn_block_drop=prune_ffn_blocks,
        int8=int8,
        qat_steps=qat_steps,
        qat_objective=qat_objective,
        explanations=explanations,
        latency_repeats=latency_repeats,
    )
    options.validate()  # nothing to do, or a bad value: said before any data is read
    report = run_compression(model, out, data, options, qat_data, domain, calibration_size)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    sizes = report["sizes"]
    typer.echo(f"compressed model written to {out} ({report['format']})")
    typer.echo(
        f"  size {sizes['artifact_bytes'] / 1e6:.3f} MB = {sizes['size_ratio']:.1%} of the parent's safetensors"
    )
    for name, entry in report.get("latency", {}).items():
        typer.echo(
            f"  latency {name}: {entry['artifact_ms']:.2f} ms vs {entry['parent_fp32_ms']:.2f} ms fp32 eager "
            f"({entry['speedup']:.2f}x)"
        )
    metrics = report["metrics"]
    headline = metrics["headline"]
    typer.echo(
        f"  {headline}: {metrics['artifact'][headline]:.4f} vs {metrics['parent'][headline]:.4f} "
        f"({metrics['headline_delta_points']:+.2f} points)"
    )

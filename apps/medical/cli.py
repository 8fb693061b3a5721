"""`verticals medical ...`: inspect CT series, generate phantom cases, train/evaluate, diagnose, few-shot classes.

Usage:
    verticals medical inspect path/to/series --json
    verticals medical generate --out data/med --cases 60 --seed 0
    verticals medical train --data data/med --out models/med --exclude-label miliary
    verticals medical evaluate --model models/med --data data/med_test --json
    verticals medical diagnose --model models/med --series data/med/case_0003/ct --record data/med/case_0003/record.json
    verticals medical add-class --model models/med --name miliary --cases data/med_rare
    verticals medical user add alice --role reviewer
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.db import SuiteSettings

app = typer.Typer(
    no_args_is_help=True, help="CT-plus-record diagnosis, few-shot rare classes, clinician review."
)
user_app = typer.Typer(no_args_is_help=True, help="Review UI accounts.")
app.add_typer(user_app, name="user")

ModelOption = Annotated[Path, typer.Option("--model", help="Model directory written by `train`.")]
DomainOption = Annotated[
    Optional[str],
    typer.Option("--domain", help="With a suite model directory: the part to load (this app's name)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _settings(ctx: typer.Context) -> SuiteSettings:
    from core.db import SuiteSettings

    return ctx.find_object(SuiteSettings) or SuiteSettings.resolve(db=None, home=None, environ=os.environ)


def _session_factory(settings: SuiteSettings) -> tuple[sessionmaker[Session], object]:
    from core.db import make_engine, make_session_factory, upgrade_database

    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.db_url)
    engine = make_engine(settings.db_url)
    return make_session_factory(engine), engine


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise typer.BadParameter(
            f"expected SLICESxROWSxCOLS such as 32x96x96, got {text!r}", param_hint="--shape"
        )
    return shape  # type: ignore[return-value]


def _check_device(device: str) -> str:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = ""
    if kind not in ("cpu", "cuda"):
        raise typer.BadParameter(f"expected cpu, cuda or cuda:N, got {device!r}", param_hint="--device")
    if kind == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA GPU is available on this machine; use cpu", param_hint="--device")
    return device


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A series folder, or a DICOM file.")],
    as_json: JsonOption = False,
) -> None:
    """Describe the CT series under PATH: slices, shape, spacing, orientation, tilt, HU range, warnings."""
    import warnings

    from apps.medical.adapters import inspect_series

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every warning is in the report
        report = inspect_series(path)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"source: {report['source']} ({len(report['series'])} series)")
    for series in report["series"]:
        typer.echo(f"series {series['series_uid']} ({series['modality']}, {series['files']} files)")
        if series["error"]:
            typer.echo(f"  error: {series['error']}")
            continue
        spacing = series["spacing_mm"]
        typer.echo(f"  slices {series['slices']}, shape {tuple(series['shape'])}")
        typer.echo(
            f"  spacing (row, col, slice) mm: {spacing['row']:.4g}, {spacing['col']:.4g}, {spacing['slice']:.4g}"
        )
        typer.echo(f"  orientation {series['orientation']}, tilt {series['tilt_deg']} deg")
        typer.echo(f"  HU range {series['hu_range']}, uniform spacing {series['uniform_spacing']}")
        for warning in series["warnings"]:
            typer.echo(f"  warning: {warning}")
    if any(s["error"] for s in report["series"]):
        from core.errors import InputValidationError

        raise InputValidationError(next(s["error"] for s in report["series"] if s["error"]))


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="A new or empty folder.")],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases.")] = 60,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    shape: Annotated[str, typer.Option("--shape", help="Series shape SLICESxROWSxCOLS.")] = "32x96x96",
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Worker processes (same files for any).")] = 1,
) -> None:
    """Write semi-synthetic cases: a DICOM CT series and a record per case, plus cases.csv."""
    from rich.progress import Progress

    from apps.medical.synthetic import generate as write_cases

    size = _parse_shape(shape)
    with Progress(transient=True) as progress:
        progress.add_task(f"generating {cases} cases", total=None)
        manifest = write_cases(out, cases, seed, shape=size, jobs=jobs)
    typer.echo(f"wrote {cases} cases to {out} ({manifest.name})")


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Folder with cases.csv.")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    preset: Annotated[
        str, typer.Option(help="Model preset: small, cnn (CT stem; GPU, >= ~1,000 cases) or tiny.")
    ] = "small",
    epochs: Annotated[float, typer.Option(help="Classification epochs.")] = 8.0,
    pretrain_epochs: Annotated[
        float, typer.Option(help="Masked-field pretraining epochs; 0 skips it.")
    ] = 2.0,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 8,
    device: Annotated[str, typer.Option(help="Torch device to train on: cpu, cuda, cuda:1...")] = "cpu",
    exclude_label: Annotated[
        Optional[list[str]],
        typer.Option("--exclude-label", help="Leave a label out (add it later with add-class)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    register: Annotated[bool, typer.Option(help="Record the run in the database.")] = True,
) -> None:
    """Train a diagnoser on 4/5 of the cases (masked-field pretraining, then classification); validate on 1/5."""
    from apps.medical.service import train_model

    _, result = train_model(
        data,
        out,
        preset=preset,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        exclude_labels=tuple(exclude_label or ()),
        seed=seed,
        device=_check_device(device),
    )
    shown = ", ".join(
        f"{k} {result.metrics[k]:.3f}" for k in ("accuracy", "auroc_macro") if k in result.metrics
    )
    typer.echo(f"model written to {out} ({result.train_cases} training cases; validation: {shown or 'none'})")
    if register:
        from core.db import migrated_session
        from core.repository import record_model_run
        from core.train import code_version

        with migrated_session(_settings(ctx).db_url) as session:
            record_model_run(
                session,
                model_dir=out.resolve(),
                app="medical",
                metrics=result.metrics,
                data_fingerprint=result.data_fingerprint,
                code_version=code_version(),
            )


@app.command()
def evaluate(
    model: ModelOption,
    data: Annotated[Path, typer.Option("--data", help="Folder with cases.csv (labelled).")],
    as_json: JsonOption = False,
    domain: DomainOption = None,
) -> None:
    """AUROC per class, accuracy and calibration (Brier, ECE) on a labelled data set."""
    from apps.medical.predictor import Diagnoser
    from apps.medical.service import evaluate_model
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    metrics = evaluate_model(Diagnoser.load(model), data)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    for name, value in metrics.items():
        typer.echo(f"{name:>24}  {value:.4f}")


@app.command()
def diagnose(
    ctx: typer.Context,
    model: ModelOption,
    record: Annotated[Path, typer.Option("--record", help="Patient record (.json or .csv).")],
    series: Annotated[
        Optional[Path], typer.Option("--series", help="CT series folder (omit: record only).")
    ] = None,
    store: Annotated[bool, typer.Option(help="Store the diagnosis in the review queue.")] = True,
    as_json: JsonOption = False,
    domain: DomainOption = None,
) -> None:
    """Diagnose one case: diagnosis, probabilities, and the CT regions and record fields that drove it."""
    from apps.medical.adapters import read_case
    from apps.medical.predictor import Diagnoser
    from apps.medical.service import diagnose as diagnose_case
    from apps.medical.service import load_secret, summary
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    diagnoser = Diagnoser.load(model)
    if store:
        settings = _settings(ctx)
        secret = load_secret(settings.home, os.environ)
        factory, engine = _session_factory(settings)
        try:
            with factory() as session, session.begin():
                stored, explanation = diagnose_case(
                    session, diagnoser, series_dir=series, record_file=record, secret=secret
                )
                result = summary(stored)
        finally:
            engine.dispose()
    else:
        explanation = diagnoser.explain(read_case(series, record, case_id=record.parent.name))
        result = {k: v for k, v in explanation.to_dict().items() if k != "patch_map"}
        result["prediction"] = explanation.label
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"diagnosis: {explanation.label}" + (f" (case {result['case_id']})" if store else ""))
    for name, p in sorted(explanation.probabilities.items(), key=lambda item: -item[1]):
        typer.echo(f"  {name:>16}  {p:.3f}")
    if explanation.volume_present:
        typer.echo(f"CT slices with the most attention: {explanation.top_slices}")
        for region in explanation.regions[:3]:
            typer.echo(
                f"  slices {region['slices']} rows {region['rows']} cols {region['cols']}  {region['score']:.4f}"
            )
    else:
        typer.echo("no CT: diagnosed from the record alone")
    typer.echo("record fields (drop in probability when hidden):")
    for entry in explanation.record_fields[:5]:
        typer.echo(f"  {entry['field']:>16} = {entry['value']!s:<8} {entry['effect']:+.3f}")


@app.command("add-class")
def add_class(
    model: ModelOption,
    name: Annotated[str, typer.Option("--name", help="The new class.")],
    cases: Annotated[
        list[Path],
        typer.Option(
            "--cases", "--support", help="A data set folder (cases.csv) or a case folder; repeatable."
        ),
    ],
    domain: DomainOption = None,
) -> None:
    """Add a class from a few confirmed cases (prototype of their embeddings), without retraining."""
    from apps.medical.predictor import Diagnoser
    from apps.medical.service import support_cases
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    diagnoser = Diagnoser.load(model)
    support = support_cases(cases, name)
    diagnoser.add_class(name, support).save_prototypes(model)
    typer.echo(f"class {name!r} added from {len(support)} case(s); classes: {', '.join(diagnoser.classes_)}")


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    username: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[str, typer.Option(help="clinician, reviewer or admin.")] = "clinician",
) -> None:
    """Create a review UI account; its random password is printed once (only a scrypt hash is stored)."""
    from apps.medical.service import create_clinician

    factory, engine = _session_factory(_settings(ctx))
    try:
        with factory() as session, session.begin():
            _, password = create_clinician(session, username, role=role)
    finally:
        engine.dispose()
    typer.echo(f"account {username!r} ({role}) created; password (shown once): {password}")

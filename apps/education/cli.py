"""`verticals education ...`: simulate learners, train and evaluate a knowledge tracer, predict, recommend.

Usage:
    verticals education generate --out data/edu --students 200
    verticals education train --data data/edu/interactions.csv --out models/edu
    verticals education train --data ../shared/data/education/assist2015_pykt/train_valid.csv --format pykt \\
        --out models/a15 --preset bench
    verticals education evaluate --model models/edu --data held_out.csv --json
    verticals education predict --model models/edu --data held_out.csv --output predictions.csv
    verticals education recommend --model models/edu --data data/edu/interactions.csv \\
        --student learner_00001 --graph data/edu/prerequisites.csv --k 5 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Knowledge tracing and knowledge-gap recommendation.")

FORMATS = ("canonical", "pykt", "dkvmn", "assistments")

DataOption = Annotated[
    Path, typer.Option("--data", help="Interaction file (CSV/Parquet, or pyKT/DKVMN files).")
]
FormatOption = Annotated[
    str, typer.Option("--format", help="Input format: canonical, pykt, dkvmn or assistments.")
]
ModelOption = Annotated[Path, typer.Option("--model", help="Model directory written by `train`.")]
DomainOption = Annotated[
    Optional[str],
    typer.Option("--domain", help="With a suite model directory: the part to load (this app's name)."),
]
OnInvalidOption = Annotated[
    str,
    typer.Option(
        "--on-invalid", help="raise (stop at the first bad row) or quarantine (write bad rows aside)."
    ),
]


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise typer.BadParameter(
            f"expected one of {', '.join(FORMATS)}; got {format!r}", param_hint="--format"
        )


def _read(path: Path, format: str, on_invalid: str = "raise", quarantine: Optional[Path] = None):
    """Read interactions through the adapters; quarantined rows go to `quarantine` (or beside the input)."""
    from apps.education.adapters import read_interactions, write_quarantine

    _check_format(format)
    if on_invalid not in ("raise", "quarantine"):
        raise typer.BadParameter(
            f"expected raise or quarantine; got {on_invalid!r}", param_hint="--on-invalid"
        )
    log = read_interactions(path, format=format, on_invalid=on_invalid)  # type: ignore[arg-type]
    if len(log.rejected):
        target = quarantine or path.with_name(path.stem + ".quarantine.csv")
        write_quarantine(log.rejected, target)
        typer.echo(f"{len(log.rejected)} invalid row(s) written to {target}", err=True)
    return log.frame


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="Folder for interactions.csv and prerequisites.csv.")],
    students: Annotated[int, typer.Option(help="Number of simulated students.")] = 200,
    skills: Annotated[int, typer.Option(help="Number of skills.")] = 12,
    items_per_skill: Annotated[int, typer.Option(help="Items per skill.")] = 8,
    answers: Annotated[int, typer.Option(help="Answers per student.")] = 60,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Simulate learners on a prerequisite graph and write canonical interactions and the graph."""
    from apps.education.service import write_atomic_csv
    from apps.education.synthetic import generate as simulate

    frame, edges, _ = simulate(
        students=students,
        skills=skills,
        items_per_skill=items_per_skill,
        interactions_per_student=answers,
        seed=seed,
    )
    write_atomic_csv(frame.drop(columns="source_row"), out / "interactions.csv")
    write_atomic_csv(edges, out / "prerequisites.csv")
    typer.echo(f"wrote {len(frame)} answers of {students} students to {out / 'interactions.csv'}")
    typer.echo(f"wrote {len(edges)} prerequisite edges to {out / 'prerequisites.csv'}")


@app.command()
def train(
    ctx: typer.Context,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    format: FormatOption = "canonical",
    preset: Annotated[
        str,
        typer.Option(
            help="Model preset: small, retrieval, practice (retrieval + per-skill practice features) or bench."
        ),
    ] = "small",
    epochs: Annotated[
        Optional[float], typer.Option(help="Fine-tuning epochs (default: the preset's).")
    ] = None,
    pretrain_epochs: Annotated[
        Optional[float], typer.Option(help="Masked-field pretraining epochs; 0 skips it.")
    ] = None,
    max_steps: Annotated[int, typer.Option(help="Cap on steps per stage (-1: none).")] = -1,
    validation_share: Annotated[
        float, typer.Option(help="Share of students held out to report validation AUC.")
    ] = 0.1,
    on_invalid: OnInvalidOption = "raise",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    register: Annotated[bool, typer.Option(help="Record the run in the database.")] = True,
    graph: Annotated[
        Optional[Path],
        typer.Option("--graph", help="Prerequisite CSV: skill clusters (MoE domains) follow its topics."),
    ] = None,
) -> None:
    """Train a knowledge tracer (masked-field pretraining, then next-step fine-tuning)."""
    import numpy as np

    from apps.education.predictor import KnowledgeTracer
    from apps.education.service import load_graph

    if not 0.0 <= validation_share < 1.0:
        raise typer.BadParameter("expected a share in [0, 1)", param_hint="--validation-share")
    frame = _read(data, format, on_invalid)
    users = frame["user_id"].drop_duplicates().to_numpy()
    rng = np.random.default_rng(seed)
    held = set(rng.choice(users, size=int(len(users) * validation_share), replace=False).tolist())
    train_rows = frame[~frame["user_id"].isin(held)]
    tracer = KnowledgeTracer(
        preset, task_epochs=epochs, pretrain_epochs=pretrain_epochs, max_steps=max_steps, seed=seed
    ).fit(train_rows, graph=load_graph(graph) if graph else None)
    metrics = {}
    if held:
        metrics = {f"valid_{k}": v for k, v in tracer.evaluate(frame[frame["user_id"].isin(held)]).items()}
    tracer.save(out, metrics=metrics)
    typer.echo(
        f"model written to {out}" + (f"; validation AUC {metrics['valid_auc']:.4f}" if metrics else "")
    )
    if register:
        _register(ctx, out, metrics, tracer.data_fingerprint_)


def _register(ctx: typer.Context, model_dir: Path, metrics: dict, data_fingerprint: str) -> None:
    import os

    from core.db import SuiteSettings, migrated_session
    from core.repository import record_model_run
    from core.train import code_version

    settings = ctx.find_object(SuiteSettings) or SuiteSettings.resolve(db=None, home=None, environ=os.environ)
    settings.home.mkdir(parents=True, exist_ok=True)
    with migrated_session(settings.db_url) as session:
        record_model_run(
            session,
            model_dir=model_dir.resolve(),
            app="education",
            metrics=metrics,
            data_fingerprint=data_fingerprint,
            code_version=code_version(),
        )


@app.command()
def evaluate(
    model: ModelOption,
    data: DataOption,
    format: FormatOption = "canonical",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    domain: DomainOption = None,
) -> None:
    """AUC and accuracy under pyKT's protocol (windows of the model's length, sliding window)."""
    from apps.education.predictor import KnowledgeTracer
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    _check_format(format)
    tracer = KnowledgeTracer.load(model)
    metrics = tracer.evaluate(_read(data, format))
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    typer.echo(
        f"AUC {metrics['auc']:.4f}  accuracy {metrics['accuracy']:.4f}  "
        f"({metrics['n_predictions']} answers of {metrics['n_students']} students)"
    )


@app.command()
def predict(
    model: ModelOption,
    data: DataOption,
    output: Annotated[Path, typer.Option("--output", help="CSV to write (one row per interaction).")],
    format: FormatOption = "canonical",
    unknown: Annotated[
        bool, typer.Option("--map-unknown", help="Map ids unseen in training to the unknown bucket.")
    ] = False,
    domain: DomainOption = None,
) -> None:
    """Write P(correct) of every answer, each predicted before its response was seen."""
    from apps.education.predictor import KnowledgeTracer
    from apps.education.service import write_atomic_csv
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    _check_format(format)
    tracer = KnowledgeTracer.load(model)
    predictions = tracer.predict_proba(_read(data, format), on_unknown="unknown" if unknown else "raise")
    write_atomic_csv(predictions, output)
    typer.echo(f"wrote {len(predictions)} predictions to {output}")


@app.command()
def recommend(
    model: ModelOption,
    data: DataOption,
    student: Annotated[str, typer.Option("--student", help="The student's user_id.")],
    graph: Annotated[
        Optional[Path], typer.Option("--graph", help="Prerequisite CSV (prerequisite_skill,skill).")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Number of exercises.")] = 5,
    band: Annotated[
        Optional[tuple[float, float]],
        typer.Option(
            "--band",
            help="Predicted success of a recommended exercise, LOW HIGH (default 0.4 0.85: see config.py).",
        ),
    ] = None,
    format: FormatOption = "canonical",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    domain: DomainOption = None,
) -> None:
    """Knowledge gaps and the next k exercises for one student, each with a reason."""
    from apps.education.config import TARGET_BAND
    from apps.education.predictor import KnowledgeTracer
    from apps.education.service import knowledge_gaps, load_graph
    from apps.education.service import recommend as recommend_items
    from core.errors import InputValidationError
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    _check_format(format)
    if k < 1:
        raise typer.BadParameter("expected at least 1", param_hint="--k")
    tracer = KnowledgeTracer.load(model)
    frame = _read(data, format)
    if not (frame["user_id"] == student).any():
        raise InputValidationError(f"{data}: no answers of student {student!r}; check --student.")
    prerequisites = load_graph(graph, skills=list(tracer.skill_vocab_.tokens)) if graph else None
    state = tracer.student_state(frame, student, on_unknown="unknown")
    gaps = knowledge_gaps(tracer, state, prerequisites)
    items = recommend_items(tracer, state, prerequisites, k=k, gaps=gaps, band=band or TARGET_BAND)
    if as_json:
        payload = {
            "student": student,
            "gaps": [
                {"skill_id": g.skill_id, "mastery": g.mastery, "score": g.score, "reason": g.reason}
                for g in gaps
            ],
            "recommendations": [r.to_dict() for r in items],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"student {student}: {len(state.history)} answers")
    for gap in gaps[:5]:
        typer.echo(f"  gap  {gap.reason}")
    if not items:
        typer.echo("  no exercise fits the target band with prerequisites mastered")
    for rank, rec in enumerate(items, start=1):
        typer.echo(f"  {rank}. {rec.item_id}: {rec.reason}")

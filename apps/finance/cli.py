"""`verticals finance ...`: generate transactions, train and evaluate the fraud model, score, explain.

Usage:
    verticals finance generate --out data/tx.parquet --accounts 1000 --days 60 --seed 0
    verticals finance train --data data/tx.parquet --out models/fraud
    verticals finance train --data ../shared/data/finance/fraud-handbook-simulated/transactions_2018-07.csv.gz \\
        --format handbook --out models/handbook
    verticals finance evaluate --model models/fraud --data held_out.parquet --json
    verticals finance score --model models/fraud --input new.csv --output scores.parquet --chunk-size 100000 \\
        --history data/tx.parquet --on-invalid quarantine
    verticals finance explain --model models/fraud --data data/tx.parquet --transaction-id T000012345 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Fraud detection on card transaction sequences.")

FORMAT_CHOICES = ("canonical", "tabformer", "handbook")
ModelOption = Annotated[Path, typer.Option("--model", help="Model directory written by `train`.")]
DomainOption = Annotated[
    Optional[str],
    typer.Option("--domain", help="With a suite model directory: the part to load (this app's name)."),
]
FormatOption = Annotated[
    str, typer.Option("--format", help="Input format: canonical, tabformer or handbook.")
]
ColumnsOption = Annotated[
    Optional[Path],
    typer.Option("--columns", help="JSON mapping canonical name -> source column (canonical format)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
HistoryOption = Annotated[
    Optional[str], typer.Option("--history", help="Earlier transactions (context only).")
]


def _check_format(format: str) -> None:
    if format not in FORMAT_CHOICES:
        raise typer.BadParameter(
            f"expected one of {', '.join(FORMAT_CHOICES)}; got {format!r}", param_hint="--format"
        )


def _read(sources: list[str], format: str, columns: Optional[Path]):
    """Read and validate one or more sources into one canonical frame (sorted by account, then time)."""
    import pandas as pd

    from apps.finance.adapters import read_source, validate

    frames = []
    for src in sources:
        frame, _ = validate(read_source(src, format=format, columns=columns))
        frames.append(frame)
    frame = frames[0] if len(frames) == 1 else pd.concat(frames)
    if len(frames) > 1:
        frame, _ = validate(frame.reset_index(drop=True), require_time_order=False)
    return frame.sort_values("timestamp", kind="stable")


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="Output file: .csv, .csv.gz or .parquet.")],
    accounts: Annotated[int, typer.Option("--accounts", help="Number of cards.")] = 1000,
    days: Annotated[int, typer.Option("--days", help="Days of activity.")] = 30,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
) -> None:
    """Generate synthetic card transactions with labelled fraud episodes."""
    from apps.finance.synthetic import generate as simulate
    from apps.finance.synthetic import write

    frame = simulate(accounts, days, seed)
    path = write(frame, out)
    typer.echo(
        f"wrote {len(frame):,} transactions ({int(frame['is_fraud'].sum())} fraud) of {accounts} accounts to {path}"
    )


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[
        list[str], typer.Option("--data", help="Labelled training source(s); repeat for several.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    format: FormatOption = "canonical",
    columns: ColumnsOption = None,
    val_data: Annotated[
        Optional[str],
        typer.Option("--val-data", help="Labelled validation source (default: latest 20% of --data)."),
    ] = None,
    epochs: Annotated[float, typer.Option(help="Task epochs.")] = 4.0,
    pretrain_epochs: Annotated[float, typer.Option(help="Masked-field pretraining epochs (0: skip).")] = 0.5,
    target_precision: Annotated[
        float, typer.Option(help="Threshold rule: validation precision to reach.")
    ] = 0.5,
    alert_budget: Annotated[
        Optional[float], typer.Option(help="Threshold rule: alerts per day (overrides --target-precision).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    register: Annotated[bool, typer.Option(help="Register the run in the database.")] = True,
) -> None:
    """Train the fraud model (masked-field pretraining, then the fraud head) and choose its threshold."""
    import torch

    from apps.finance.predictor import FraudDetector
    from core.repository import record_model_run
    from core.train import code_version

    _check_format(format)
    train_df = _read(data, format, columns)
    val_df = _read([val_data], format, columns) if val_data else None
    detector = FraudDetector(
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        batch_size=64,
        learning_rate=2e-3,
        target_precision=target_precision,
        alert_budget=alert_budget,
        seed=seed,
        device="cuda" if torch.cuda.is_available() else "cpu",
    ).fit(train_df, val_df)
    detector.save(out)
    metrics = {k: v for k, v in detector.metrics_.items() if isinstance(v, int | float)}
    if register:
        from core.db import SuiteSettings, migrated_session

        settings = ctx.find_object(SuiteSettings)
        if settings is not None:
            with migrated_session(settings.db_url) as session:
                record_model_run(
                    session,
                    model_dir=out.resolve(),
                    app="finance",
                    metrics=metrics,
                    data_fingerprint=detector.data_fingerprint_,
                    code_version=code_version(),
                )
    typer.echo(
        f"model written to {out}: validation AP {metrics.get('average_precision', float('nan')):.4f}, "
        f"threshold {detector.threshold_:.4f} ({detector.threshold_rule_})"
    )


@app.command()
def evaluate(
    model: ModelOption,
    data: Annotated[str, typer.Option("--data", help="Labelled source to evaluate on.")],
    history: HistoryOption = None,
    format: FormatOption = "canonical",
    columns: ColumnsOption = None,
    as_json: JsonOption = False,
    domain: DomainOption = None,
) -> None:
    """Average precision, ROC-AUC, recall at the stored threshold, precision@100 per day, alerts for 90% recall."""
    from apps.finance.metrics import fraud_metrics
    from apps.finance.predictor import FraudDetector
    from apps.finance.schema import LABEL_COLUMN
    from core.errors import InputValidationError
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    _check_format(format)
    detector = FraudDetector.load(model)
    frame = _read([data], format, columns)
    if LABEL_COLUMN not in frame.columns:
        raise InputValidationError(f"{data}: evaluation needs the label column {LABEL_COLUMN!r}")
    context = _read([history], format, columns) if history else None
    scores = detector.predict_proba(frame, history=context)
    days = frame["timestamp"].dt.floor("D").to_numpy()
    metrics = fraud_metrics(frame[LABEL_COLUMN].to_numpy(), scores, days, detector.threshold_)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    for name, value in metrics.items():
        typer.echo(f"{name:>28}  {value:.4f}" if isinstance(value, float) else f"{name:>28}  {value}")


@app.command()
def score(
    ctx: typer.Context,
    model: ModelOption,
    input: Annotated[
        str, typer.Option("--input", help="Source to score: file or URL::TABLE / URL::SELECT ...")
    ],
    output: Annotated[
        str, typer.Option("--output", help="Destination: .csv, .csv.gz, .parquet or URL::TABLE.")
    ],
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Rows per chunk.")] = 100_000,
    history: HistoryOption = None,
    format: FormatOption = "canonical",
    columns: ColumnsOption = None,
    on_invalid: Annotated[
        str,
        typer.Option(
            "--on-invalid", help="raise (stop at the first bad row) or quarantine (set bad rows aside)."
        ),
    ] = "raise",
    save_alerts: Annotated[
        bool, typer.Option(help="Store the alerts in the database for the dashboard.")
    ] = True,
    as_json: JsonOption = False,
    domain: DomainOption = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend", help="torch, or onnx (ONNX Runtime; exported once into <model>/onnx, same scores)."
        ),
    ] = "torch",
) -> None:
    """Score a source in chunks (resumable: rerun the same command after a crash), write scores and alerts."""
    from rich.console import Console

    from apps.finance import service
    from core.db import SuiteSettings, make_engine, make_session_factory, upgrade_database
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    _check_format(format)
    if on_invalid not in ("raise", "quarantine"):
        raise typer.BadParameter(
            f"expected raise or quarantine; got {on_invalid!r}", param_hint="--on-invalid"
        )
    if chunk_size <= 0:
        raise typer.BadParameter(
            f"must be a positive number of rows; got {chunk_size}", param_hint="--chunk-size"
        )
    if backend not in ("torch", "onnx"):
        raise typer.BadParameter(f"expected torch or onnx; got {backend!r}", param_hint="--backend")
    report = service.score(
        model,
        input,
        output,
        chunk_size,
        history,
        format=format,
        columns=columns,
        on_invalid=on_invalid,
        console=Console(stderr=True),
        progress=not as_json,
        backend=backend,
    )
    added = 0
    settings = ctx.find_object(SuiteSettings)
    if save_alerts and settings is not None and report.alerts:
        upgrade_database(settings.db_url)
        engine = make_engine(settings.db_url)
        try:
            with make_session_factory(engine)() as session, session.begin():
                added = service.persist_alerts(session, report, source=str(input))
        finally:
            engine.dispose()
    summary = {**report.as_dict(), "alerts_added_to_db": added}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"scored {report.rows:,} transactions in {report.seconds:.1f}s ({report.rows_per_second:,.0f}/s): "
        f"{report.alerts} alerts ({added} new in the database), {report.rejected} rejected; output {output}"
    )
    if report.quarantine:
        typer.echo(f"rejected rows written to {report.quarantine}", err=True)


@app.command()
def explain(
    model: ModelOption,
    data: Annotated[
        str, typer.Option("--data", help="Source holding the transaction and its account's history.")
    ],
    transaction_id: Annotated[str, typer.Option("--transaction-id", help="Transaction to explain.")],
    format: FormatOption = "canonical",
    columns: ColumnsOption = None,
    as_json: JsonOption = False,
    domain: DomainOption = None,
) -> None:
    """The past transactions that drove a score (attention) and the fields that moved it (occlusion)."""
    from apps.finance.predictor import FraudDetector
    from core.train import resolve_model_dir

    model = resolve_model_dir(model, domain)

    _check_format(format)
    detector = FraudDetector.load(model)
    result = detector.explain(_read([data], format, columns), transaction_id)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    flag = "ALERT" if result["is_alert"] else "no alert"
    typer.echo(
        f"{result['transaction_id']} (account {result['account_id']}): score {result['score']:.4f} "
        f"vs threshold {result['threshold']:.4f} -> {flag}"
    )
    typer.echo("past transactions with the most attention:")
    for item in result["top_transactions"]:
        typer.echo(
            f"  {item['transaction_id']}  {item['timestamp']}  {item['amount']:>10.2f}  {item['merchant_id']}"
            f"  weight {item['weight']:.3f}"
        )
    typer.echo("fields that moved the score (score - score without the field):")
    for item in result["field_effects"]:
        typer.echo(f"  {item['field']:>20}  {item['effect']:+.4f}")

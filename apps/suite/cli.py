"""`verticals suite ...`: train the suite model jointly on the three apps, and report its routing.

Usage:
    verticals suite train --finance data/tx.parquet --medical data/med --education data/edu/interactions.csv \\
        --out models/suite --epochs 3
    verticals suite routing --model models/suite
    verticals suite routing --model models/suite --json
    verticals finance score --model models/suite --domain finance --input new.csv --output scores.parquet

Each app's part (`models/suite/<app>`) is a normal model directory of that app; every app command taking
`--model` loads it with `--domain <app>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="The suite model: joint multi-domain training and routing.")


@app.command()
def train(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Suite directory to write (suite.json + one folder per app).")
    ],
    finance: Annotated[
        Optional[Path], typer.Option("--finance", help="Labelled transactions (CSV/Parquet).")
    ] = None,
    medical: Annotated[Optional[Path], typer.Option("--medical", help="Folder with cases.csv.")] = None,
    education: Annotated[
        Optional[Path], typer.Option("--education", help="Interactions CSV (canonical).")
    ] = None,
    epochs: Annotated[float, typer.Option(help="Task epochs (stage 2).")] = 3.0,
    pretrain_epochs: Annotated[float, typer.Option(help="Masked-field epochs (stage 1); 0 skips it.")] = 1.0,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    medical_preset: Annotated[
        str, typer.Option(help="Medical preset: small, cnn (CT stem, trained alone first) or tiny.")
    ] = "small",
    max_steps: Annotated[int, typer.Option(help="Cap on batches per app and stage (-1: none).")] = -1,
    finish_steps: Annotated[
        str,
        typer.Option(
            help="An app's last task steps, alone on its own parameters, taken out of its joint steps: N "
            "(every app) or APP=N[,APP=N] (e.g. medical=32); 0: none."
        ),
    ] = "0",
    loss_balance: Annotated[
        str, typer.Option(help="How joint steps add the app losses: sum or relative.")
    ] = "sum",
    interleave: Annotated[
        bool,
        typer.Option(
            "--interleave/--joint",
            help="One optimizer step per app batch, apps in turn (interleave), or one per round of a batch of "
            "every app with the losses added (joint).",
        ),
    ] = True,
    balance_scope: Annotated[
        str,
        typer.Option(
            help="Aux-free expert balancing: all (global mean), group (global plus within each expert group) "
            "or within (within each expert group only)."
        ),
    ] = "within",
    balance_mix: Annotated[
        str,
        typer.Option(
            help="Domain mix the expert balancing evens the load for: tokens (each app by its share of the "
            "data's tokens, the mix the suite serves) or batches (the training batches as they come)."
        ),
    ] = "tokens",
    balance_load: Annotated[
        str,
        typer.Option(
            help="Passes the expert balancing counts: serving (each training batch also run once as served, "
            "eval mode without dropout) or train (the training passes)."
        ),
    ] = "train",
    settle_steps: Annotated[
        int,
        typer.Option(
            help="After training, aux-free updates of each layer's expert bias on the served routing of the "
            "training data, router fixed (0: none)."
        ),
    ] = 300,
    settle_floor: Annotated[
        float,
        typer.Option(
            help="The settling only lifts experts below this share of their group's served load (0: the "
            "full balance rule instead)."
        ),
    ] = 0.08,
    settle_resamples: Annotated[
        int,
        typer.Option(
            help="The settle floor must hold on this many bootstrap resamples of the training examples (but "
            "for 5% of them), not only on the examples themselves (0: on the examples)."
        ),
    ] = 200,
    optimizer_state: Annotated[
        str,
        typer.Option(
            help="AdamW moments per app (per_app: each app moves the shared trunk as it would alone) or one "
            "state for all steps (shared)."
        ),
    ] = "per_app",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    register: Annotated[bool, typer.Option(help="Record the run in the database.")] = True,
) -> None:
    """Train one shared trunk on every given app (two stages), then write each app's part and suite.json."""
    import torch

    from apps.suite.train import SuiteSettings, parse_finish_steps, train_suite
    from core.errors import InputValidationError

    sources = {
        name: path
        for name, path in (("finance", finance), ("medical", medical), ("education", education))
        if path is not None
    }
    if not sources:
        raise typer.BadParameter(
            "give at least one of --finance, --medical, --education", param_hint="--finance"
        )
    try:
        finishing = parse_finish_steps(finish_steps)
    except InputValidationError as error:
        raise typer.BadParameter(str(error), param_hint="--finish-steps") from None
    settings = SuiteSettings(
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        learning_rate=learning_rate,
        seed=seed,
        max_steps=max_steps,
        finish_steps=finishing,
        loss_balance=loss_balance,
        balance_scope=balance_scope,
        balance_mix=balance_mix,
        balance_load=balance_load,
        settle_steps=settle_steps,
        settle_floor=settle_floor or None,
        settle_resamples=settle_resamples,
        optimizer_state=optimizer_state,
        interleave=interleave,
        medical_preset=medical_preset,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    summary = train_suite(sources, out, settings)
    for name in summary["domains"]:
        metric = summary["headline_metrics"][name]
        value = summary["metrics"][name].get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        typer.echo(f"{name}: {metric} {shown} -> {out / name}")
    typer.echo(f"suite written to {out} in {summary['train_seconds']:.0f} s")
    if register:
        _register(ctx, out, summary)


def _register(ctx: typer.Context, out: Path, summary: dict) -> None:
    import os

    from apps.suite.routing import routing_report
    from core.db import SuiteSettings, migrated_session
    from core.repository import record_model_run

    checks = routing_report(out)["checks"]
    metrics = {
        f"{name}_{metric}": float(summary["metrics"][name][metric])
        for name, metric in summary["headline_metrics"].items()
        if isinstance(summary["metrics"][name].get(metric), int | float)
    }
    metrics.update(
        on_group_min=float(checks["on_group_min"]),
        max_violation=float(checks["max_violation"]),
        low_use_experts=int(checks["low_use_count"]),
    )
    settings = ctx.find_object(SuiteSettings) or SuiteSettings.resolve(db=None, home=None, environ=os.environ)
    settings.home.mkdir(parents=True, exist_ok=True)
    with migrated_session(settings.db_url) as session:
        record_model_run(
            session,
            model_dir=out.resolve(),
            app="suite",
            metrics=metrics,
            data_fingerprint=summary["data_fingerprint"],
            code_version=summary["code_version"],
            domain=",".join(summary["domains"]),
        )


@app.command()
def routing(
    model: Annotated[Path, typer.Option("--model", help="Suite directory written by `suite train`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Share of each domain's routed mass per expert, mass on its group, load balance, unused experts."""
    from rich.console import Console
    from rich.table import Table

    from apps.suite.routing import routing_report

    report = routing_report(model)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    overall = report["all_layers"]
    table = Table(title=f"Share of each domain's routed mass per expert, all layers ({model})")
    table.add_column("expert")
    table.add_column("group")
    for domain in overall["mass_share"]:
        table.add_column(f"{domain} %", justify="right")
    table.add_column("load %", justify="right")
    total_load = sum(overall["load"]) or 1.0
    for e, group in enumerate(overall["expert_group"]):
        shares = [f"{100 * overall['mass_share'][d][e]:.1f}" for d in overall["mass_share"]]
        table.add_row(str(e), group, *shares, f"{100 * overall['load'][e] / total_load:.1f}")
    table.add_row(
        "own+general",
        "",
        *(f"{100 * overall['on_group_share'][d]:.1f}" for d in overall["mass_share"]),
        "",
        end_section=True,
    )
    console.print(table)
    for index, layer in enumerate(report["layers"]):
        on_group = ", ".join(f"{d} {100 * s:.1f}%" for d, s in layer["on_group_share"].items())
        low = ", ".join(
            f"{x['expert']} ({x['group']}, {100 * x['share_in_group']:.1f}%)"
            for x in layer["low_use_experts"]
        )
        console.print(
            f"layer {index}: own group + general: {on_group}; max violation {layer['max_violation']:.3f}; "
            f"experts below {100 * report['checks']['low_use_threshold']:.0f}% of their group: {low or 'none'}"
        )
    checks = report["checks"]
    console.print(
        f"lowest own+general share {100 * checks['on_group_min']:.1f}% (target >= {100 * checks['on_group_target']:.0f}%), "
        f"{checks['low_use_count']} low-use experts, max violation {checks['max_violation']:.3f}"
    )

"""The `verticals` command line: global options, suite commands and the apps' sub-commands.

Usage:
    verticals --help
    verticals --version
    verticals db upgrade
    verticals --db postgresql+psycopg://user:secret@host/verticals db upgrade
    verticals --home /tmp/vt runs list --app finance --json
    verticals ui --port 8502
    verticals demo --no-ui
    verticals finance --help            # once apps/finance/cli.py exists

Sub-apps (``apps/<app>/cli.py``, each exposing ``app: typer.Typer``) are registered when present. Their
commands find the resolved home folder and database URL on the context::

    settings: SuiteSettings = ctx.obj   # core.db.SuiteSettings

and must import heavy libraries (torch, transformers, pandas) inside command bodies, so that
``verticals --help`` stays fast.

Errors: a `core.errors.VerticalsError` from any command prints ``error: <message>`` on stderr and exits 1
(the traceback too when ``VERTICALS_DEBUG=1``); usage errors exit 2; anything else propagates.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from core.errors import VerticalsError

if TYPE_CHECKING:
    from rich.console import Console

    from core.db import SuiteSettings

APP_NAMES = ("finance", "medical", "education")
SUITE_COMMANDS = ("suite",)
"""Command groups over several apps (``apps/<name>/cli.py`` too, but no demo of their own)."""
STREAMLIT_SCRIPT = Path(__file__).resolve().parent / "streamlit_app.py"
DEBUG_ENV = "VERTICALS_DEBUG"


class SuiteGroup(TyperGroup):
    """The root command group: maps `VerticalsError` to a one-line message and exit code 1.

    The mapping lives on the group (not only around `main`) so that ``CliRunner`` tests see exactly what a
    user sees.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VerticalsError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="verticals",
    cls=SuiteGroup,
    no_args_is_help=True,
    add_completion=False,
    help="One shared model core with domain-expert routing, serving finance, medical and education apps.",
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
runs_app = typer.Typer(no_args_is_help=True, help="Registered model runs.")
app.add_typer(db_app, name="db")
app.add_typer(runs_app, name="runs")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as e:
        # Only a missing package on the path to `name` means "absent"; a broken import inside it must surface.
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return False
        raise


def _add_app_commands(root: typer.Typer) -> None:
    for name in (*APP_NAMES, *SUITE_COMMANDS):
        module_name = f"apps.{name}.cli"
        if _module_exists(module_name):
            root.add_typer(importlib.import_module(module_name).app, name=name)


def _version() -> str:
    try:
        return importlib.metadata.version("verticals")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"verticals {_version()}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL",
            help="Database URL (default: $VERTICALS_DB_URL, else sqlite:///<home>/verticals.db).",
        ),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            file_okay=False,
            help="Folder for models, data and the default database (default: $VERTICALS_HOME, else ~/.verticals).",
        ),
    ] = None,
) -> None:
    """Resolve the home folder and database URL once and hand them to every command on ``ctx.obj``."""
    from core.db import SuiteSettings

    ctx.obj = SuiteSettings.resolve(db=db, home=home, environ=os.environ)


def _settings(ctx: typer.Context) -> SuiteSettings:
    from core.db import SuiteSettings

    settings = ctx.find_object(SuiteSettings)
    return settings if settings is not None else SuiteSettings.resolve(db=None, home=None, environ=os.environ)


def _console() -> Console:
    from rich.console import Console

    return Console()


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to the newest revision."""
    from core.db import upgrade_database

    settings = _settings(ctx)
    revision = upgrade_database(settings.db_url)
    typer.echo(f"database {settings.masked_db_url} is at revision {revision} (newest)")


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    app_name: Annotated[str | None, typer.Option("--app", help="Only this app's runs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
) -> None:
    """List registered model runs, newest first."""
    from core.db import make_engine, make_session_factory, require_current_schema
    from core.repository import list_model_runs

    settings = _settings(ctx)
    engine = make_engine(settings.db_url)
    try:
        require_current_schema(engine)
        with make_session_factory(engine)() as session:
            runs = list_model_runs(session, app=app_name)
    finally:
        engine.dispose()

    if as_json:
        typer.echo(json.dumps([run.as_dict() for run in runs], indent=2))
        return
    console = _console()
    if not runs:
        console.print("No model runs registered yet: run `verticals demo` or `verticals <app> train`.")
        return
    from rich.table import Table

    table = Table(title=f"Model runs in {settings.masked_db_url}")
    for column in ("id", "app", "domain", "model dir", "metrics", "created (UTC)"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            str(run.id),
            run.app,
            run.domain or "",
            run.model_dir,
            run.metrics_summary(),
            run.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


def _launch_ui(settings: SuiteSettings, port: int, host: str) -> None:
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(STREAMLIT_SCRIPT),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--browser.gatherUsageStats",
        "false",
        "--server.showEmailPrompt",
        "false",
    ]
    # The Streamlit script is its own entry point: it reads the settings back from these variables.
    env = {**os.environ, **settings.to_environ()}
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise typer.Exit(completed.returncode)


PortOption = Annotated[int, typer.Option("--port", min=1, max=65535, help="Port of the Streamlit server.")]
HostOption = Annotated[str, typer.Option("--host", help="Address the Streamlit server listens on.")]


@app.command()
def ui(ctx: typer.Context, port: PortOption = 8501, host: HostOption = "localhost") -> None:
    """Start the Streamlit suite (migrates the database first)."""
    from core.db import upgrade_database

    settings = _settings(ctx)
    upgrade_database(settings.db_url)
    typer.echo(f"verticals UI on http://{host}:{port} (database {settings.masked_db_url})")
    _launch_ui(settings, port, host)


def _demo_hook(name: str) -> Any:
    module_name = f"apps.{name}.service"
    if not _module_exists(module_name):
        return None
    return getattr(importlib.import_module(module_name), "demo", None)


@app.command()
def demo(
    ctx: typer.Context,
    no_ui: Annotated[
        bool, typer.Option("--no-ui", help="Prepare everything but do not start the UI.")
    ] = False,
    port: PortOption = 8501,
    host: HostOption = "localhost",
) -> None:
    """Set up the home folder and database, run each app's demo, then start the UI.

    Each app that exposes ``demo(home, session_factory, console)`` in ``apps/<app>/service.py`` generates its
    data, trains and registers its model; a second run reuses what exists.
    """
    from core.db import make_engine, make_session_factory, upgrade_database

    settings = _settings(ctx)
    console = _console()
    settings.home.mkdir(parents=True, exist_ok=True)
    revision = upgrade_database(settings.db_url)
    console.print(f"home: {settings.home}")
    console.print(f"database: {settings.masked_db_url} (revision {revision})")
    engine = make_engine(settings.db_url)
    try:
        session_factory = make_session_factory(engine)
        for name in APP_NAMES:
            hook = _demo_hook(name)
            if hook is None:
                console.print(f"{name}: no demo yet (apps/{name}/service.py has no demo()), skipped")
                continue
            hook(settings.home, session_factory, console)
    finally:
        engine.dispose()
    if not no_ui:
        _launch_ui(settings, port, host)


_add_app_commands(app)
# `verticals compress` (apps/compress_cli.py imports torch and the apps inside the command body only).
app.command("compress")(importlib.import_module("apps.compress_cli").compress_command)


def main() -> None:
    """Console-script entry point (``verticals``)."""
    app(prog_name="verticals")


if __name__ == "__main__":
    main()

"""Tests of the root `verticals` command line: options, db/runs/ui/demo commands and the error mapping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apps import cli
from apps.cli import app
from core.db import head_revision, make_engine, make_session_factory, upgrade_database
from core.repository import record_model_run

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner() -> CliRunner:
    # Empty settings in the environment, so the developer's own VERTICALS_* never leak into a test.
    return CliRunner(env={"VERTICALS_HOME": None, "VERTICALS_DB_URL": None, "VERTICALS_DEBUG": None})


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def _add_run(url: str) -> None:
    upgrade_database(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        record_model_run(
            session,
            model_dir="/models/finance/1",
            app="finance",
            domain="card",
            metrics={"auc": 0.93},
            data_fingerprint="sha256:abc",
            code_version="0.1.0",
            created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        )
    engine.dispose()


def test_help_lists_suite_commands(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ui", "demo", "db", "runs", "--db", "--home", "--version"):
        assert command in result.stdout


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output


def test_version_prints_package_version(runner: CliRunner) -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"verticals {version('verticals')}"


def test_db_upgrade_creates_schema_and_prints_url(runner: CliRunner, tmp_path: Path, db_url: str) -> None:
    result = runner.invoke(app, ["--db", db_url, "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert db_url in result.stdout and head_revision() in result.stdout
    assert (tmp_path / "cli.db").is_file()


def test_db_upgrade_masks_password(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr("core.db.upgrade_database", lambda url: seen.append(url) or "0001")
    result = runner.invoke(app, ["--db", "postgresql+psycopg://alice:s3cret@db.example/v", "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert seen == ["postgresql+psycopg://alice:s3cret@db.example/v"]
    assert "s3cret" not in result.output and "alice:***@db.example" in result.stdout


def test_home_option_places_default_database(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["--home", str(tmp_path / "home"), "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "verticals.db").is_file()


def test_runs_list_json(runner: CliRunner, db_url: str) -> None:
    _add_run(db_url)
    result = runner.invoke(app, ["--db", db_url, "runs", "list", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)
    assert len(runs) == 1
    assert runs[0]["app"] == "finance" and runs[0]["domain"] == "card"
    assert runs[0]["metrics"] == {"auc": 0.93}
    assert runs[0]["created_at"] == "2025-01-02T03:04:05+00:00"
    filtered = runner.invoke(app, ["--db", db_url, "runs", "list", "--json", "--app", "medical"])
    assert json.loads(filtered.stdout) == []


def test_runs_list_table(runner: CliRunner, db_url: str) -> None:
    _add_run(db_url)
    result = runner.invoke(app, ["--db", db_url, "runs", "list"])
    assert result.exit_code == 0, result.output
    assert "finance" in result.stdout and "auc=0.93" in result.stdout


def test_verticals_error_exits_1_with_one_line(runner: CliRunner, db_url: str) -> None:
    # A database that was never migrated: runs list raises ConfigError naming the fix.
    result = runner.invoke(app, ["--db", db_url, "runs", "list"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "verticals db upgrade" in lines[0]
    assert "Traceback" not in result.output


def test_verticals_debug_shows_traceback(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--db", "not a url", "runs", "list"], env={"VERTICALS_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: database URL")


@pytest.mark.parametrize("args", [["runs", "list", "--bogus"], ["nosuchcommand"], ["ui", "--port", "0"]])
def test_usage_errors_exit_2(runner: CliRunner, args: list[str]) -> None:
    assert runner.invoke(app, args).exit_code == 2


def test_other_exceptions_propagate(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(url: str) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr("core.db.upgrade_database", boom)
    result = runner.invoke(app, ["db", "upgrade"])
    assert isinstance(result.exception, RuntimeError)


def test_ui_runs_streamlit_with_settings_in_environment(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str
) -> None:
    calls = []

    def fake_run(command: list[str], env: dict[str, str], check: bool) -> subprocess.CompletedProcess:
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    result = runner.invoke(
        app, ["--home", str(tmp_path), "--db", db_url, "ui", "--port", "8600", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 0, result.output
    ((command, env),) = calls
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(command[4]) == REPO_ROOT / "apps" / "streamlit_app.py"
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    assert env["VERTICALS_DB_URL"] == db_url
    assert env["VERTICALS_HOME"] == str(tmp_path.resolve())


@pytest.mark.slow  # the session's shared demo run: a few minutes on 2 cores
def test_demo_without_ui_prepares_home_twice(runner: CliRunner, demo_home) -> None:
    # The first run is the session's shared demo (tests/conftest.py); the second one reuses what exists.
    home = demo_home.home
    assert (home / "verticals.db").is_file()
    result = runner.invoke(app, ["--home", str(home), "demo", "--no-ui"])
    assert result.exit_code == 0, result.output
    assert demo_home.password not in result.stdout  # the demo account's password is shown once only
    for name in cli.APP_NAMES:
        if cli._demo_hook(name) is None:
            assert f"{name}: no demo yet" in result.stdout


def test_cli_import_and_help_stay_light() -> None:
    code = (
        "import sys\n"
        "import apps.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'streamlit') if m in sys.modules]\n"
        "assert not heavy, f'importing apps.cli imported {heavy}'\n"
        "sys.argv = ['verticals', '--help']\n"
        "apps.cli.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERTICALS_")}
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "Usage" in completed.stdout and "verticals" in completed.stdout


@pytest.mark.slow  # the session's shared demo run
def test_demo_diagnoser_tells_the_queued_cases_apart(demo_home) -> None:
    """The demo's review queue must not show one diagnosis with the same probabilities for every case (a
    model stuck at its class prior, as the plain-mean pooling over 512 CT tokens left it)."""
    from apps.medical import repository
    from core.db import make_engine, make_session_factory

    with make_session_factory(make_engine(demo_home.db_url))() as session:
        cases = repository.list_cases(session)
    assert len(cases) >= 6
    assert len({case.prediction for case in cases}) >= 2, [case.prediction for case in cases]
    spread = max(
        max(c.probabilities[label] for c in cases) - min(c.probabilities[label] for c in cases)
        for label in cases[0].probabilities
    )
    assert spread > 0.1, [case.probabilities for case in cases]

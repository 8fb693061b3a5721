"""Tests of core.db, core.orm and core.repository: URLs, engines, migrations and the model run registry."""

from __future__ import annotations

import importlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from core.db import (
    SuiteSettings,
    current_revision,
    default_home,
    head_revision,
    make_engine,
    make_session_factory,
    mask_url,
    require_current_schema,
    resolve_db_url,
    upgrade_database,
)
from core.errors import ConfigError, InputValidationError
from core.orm import ModelRun
from core.repository import latest_model_run, list_model_runs, record_model_run


def _record(session: Session, app: str = "finance", **overrides: object) -> ModelRun:
    fields: dict = {
        "model_dir": f"/models/{app}",
        "app": app,
        "metrics": {"auc": 0.91, "precision_at_100": 0.4},
        "data_fingerprint": "sha256:abc",
        "code_version": "0.1.0",
    }
    fields.update(overrides)
    return record_model_run(session, **fields)


# ---- locations ----------------------------------------------------------------------------------------


def test_default_home_prefers_environment(tmp_path: Path) -> None:
    assert default_home({"VERTICALS_HOME": str(tmp_path)}) == tmp_path.resolve()
    assert default_home({}) == (Path.home() / ".verticals").resolve()


def test_db_url_precedence_is_flag_then_env_then_home_file(tmp_path: Path) -> None:
    env = {"VERTICALS_DB_URL": "sqlite:///env.db", "VERTICALS_HOME": str(tmp_path)}
    assert resolve_db_url("sqlite:///flag.db", env) == "sqlite:///flag.db"
    assert resolve_db_url(None, env) == "sqlite:///env.db"
    assert (
        resolve_db_url(None, {"VERTICALS_HOME": str(tmp_path)})
        == f"sqlite:///{tmp_path.resolve()}/verticals.db"
    )
    assert resolve_db_url(None, {}, home=tmp_path) == f"sqlite:///{tmp_path}/verticals.db"


def test_settings_home_flag_moves_default_database(tmp_path: Path) -> None:
    settings = SuiteSettings.resolve(db=None, home=tmp_path / "h", environ={"VERTICALS_HOME": "/elsewhere"})
    assert settings.home == (tmp_path / "h").resolve()
    assert settings.db_url.endswith("/h/verticals.db")
    assert settings.to_environ() == {
        "VERTICALS_HOME": str(settings.home),
        "VERTICALS_DB_URL": settings.db_url,
    }


def test_mask_url_hides_password_only() -> None:
    masked = mask_url("postgresql+psycopg://alice:s%40cret@db.example:5432/verticals")
    assert masked == "postgresql+psycopg://alice:***@db.example:5432/verticals"
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_invalid_url_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="expected a SQLAlchemy URL"):
        make_engine("not a url")


def test_missing_driver_names_the_extra() -> None:
    with pytest.raises(ConfigError, match=r"verticals\[postgres\]"):
        make_engine("postgresql+nosuchdriver://u:p@localhost/db")


def test_postgres_url_is_passed_through_without_connecting() -> None:
    pytest.importorskip("psycopg")
    engine = make_engine("postgresql+psycopg://u:p@localhost:1/db")
    assert engine.dialect.name == "postgresql"
    assert engine.url.render_as_string(hide_password=False) == "postgresql+psycopg://u:p@localhost:1/db"


# ---- SQLite engine --------------------------------------------------------------------------------------


def test_sqlite_engine_creates_folder_and_enables_wal_and_foreign_keys(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "dir" / "v.db"
    engine = make_engine(f"sqlite:///{db_file}")
    try:
        assert db_file.parent.is_dir()
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_sqlite_savepoint_rollback_is_real() -> None:
    engine = make_engine("sqlite://")
    with engine.connect() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
        connection.commit()
        with connection.begin():
            nested = connection.begin_nested()
            connection.execute(text("INSERT INTO t VALUES (1)"))
            nested.rollback()
            connection.execute(text("INSERT INTO t VALUES (2)"))
        assert connection.execute(text("SELECT x FROM t")).scalars().all() == [2]
    engine.dispose()


# ---- migrations ---------------------------------------------------------------------------------------


def test_migrations_create_schema_on_empty_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    revision = upgrade_database(url)
    # The core revision plus one branch per app: the database is at every head.
    assert revision == head_revision() and revision is not None
    assert "0001" not in revision.split(",") or revision == "0001"
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        assert {"model_runs", "alembic_version"} <= set(inspector.get_table_names())
        columns = {c["name"]: c for c in inspector.get_columns("model_runs")}
        assert set(columns) == {
            "id",
            "model_dir",
            "app",
            "domain",
            "metrics",
            "data_fingerprint",
            "code_version",
            "created_at",
        }
        assert columns["domain"]["nullable"] is True
        assert all(not columns[name]["nullable"] for name in columns if name != "domain")
        assert "ix_model_runs_app_created_at" in {ix["name"] for ix in inspector.get_indexes("model_runs")}
        require_current_schema(engine)
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_keeps_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        _record(session)
    assert upgrade_database(url) == head_revision()
    with factory() as session:
        assert len(list_model_runs(session)) == 1
    engine.dispose()


def test_unmigrated_database_is_reported_with_the_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert current_revision(engine) is None
        with pytest.raises(ConfigError, match="verticals db upgrade"):
            require_current_schema(engine)
    finally:
        engine.dispose()


def test_orm_metadata_matches_migrations(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from core.db import Base

    # Every table of the suite: the migrations must create exactly what the ORM declares.
    for module in ("apps.finance.orm", "apps.medical.orm", "apps.education.orm"):
        importlib.import_module(module)
    url = f"sqlite:///{tmp_path / 'diff.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


# ---- repository ---------------------------------------------------------------------------------------


def test_record_and_list_model_runs(db_session: Session) -> None:
    run = _record(db_session, domain="card")
    assert run.id is not None
    assert run.created_at.tzinfo is not None
    runs = list_model_runs(db_session)
    assert [r.id for r in runs] == [run.id]
    assert runs[0].metrics == {"auc": 0.91, "precision_at_100": 0.4}
    assert runs[0].as_dict()["created_at"].endswith("+00:00")


def test_list_filters_by_app_and_orders_newest_first(db_session: Session) -> None:
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    old = _record(db_session, created_at=t0)
    new = _record(db_session, created_at=t0 + timedelta(days=1))
    other = _record(db_session, app="education", created_at=t0 + timedelta(days=2))
    assert [r.id for r in list_model_runs(db_session)] == [other.id, new.id, old.id]
    assert [r.id for r in list_model_runs(db_session, app="finance")] == [new.id, old.id]
    assert latest_model_run(db_session, "finance") is new
    assert latest_model_run(db_session, "medical") is None


def test_created_at_round_trips_as_aware_utc(db_session: Session) -> None:
    local = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    run = _record(db_session, created_at=local)
    db_session.expire_all()
    loaded = db_session.get(ModelRun, run.id)
    assert loaded.created_at == local
    assert loaded.created_at.utcoffset() == timedelta(0)


def test_naive_timestamp_is_rejected(db_session: Session) -> None:
    with pytest.raises(InputValidationError, match="timezone-aware"):
        _record(db_session, created_at=datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"auc": float("nan")}, r"metrics\['auc'\]"),
        ({"auc": object()}, r"metrics\['auc'\]"),
        ([1], "mapping"),
    ],
)
def test_invalid_metrics_are_rejected(db_session: Session, metrics: object, match: str) -> None:
    with pytest.raises(InputValidationError, match=match):
        _record(db_session, metrics=metrics)


def test_empty_app_name_is_rejected(db_session: Session) -> None:
    with pytest.raises(InputValidationError, match="app"):
        _record(db_session, app=" ")


def test_repository_does_not_commit(db_session: Session) -> None:
    _record(db_session)
    assert db_session.in_transaction()
    db_session.rollback()
    assert list_model_runs(db_session) == []

"""Persistence plumbing: the declarative `Base`, engine and session factories, URL resolution, migrations.

Nothing here opens a connection or reads the environment at import time: entry points (CLI commands,
the Streamlit script) resolve the URL with `resolve_db_url(flag, os.environ)` and build the engine.

Typical use from an entry point::

    settings = SuiteSettings.resolve(db=None, home=None, environ=os.environ)
    upgrade_database(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session, session.begin():
        record_model_run(session, ...)

Adding tables for an app:

1. Declare them in ``apps/<app>/orm.py`` as subclasses of `Base` (``Mapped[...]`` + ``mapped_column``,
   ``__tablename__`` plural snake_case, timestamps as `UTCDateTime`). Constraint names come from the
   naming convention on ``Base.metadata``, so SQLite batch migrations can find them.
2. Add a migration ``core/migrations/versions/000N_<app>_<what>.py`` whose ``down_revision`` is the
   current head, written by hand or drafted by autogenerate, which compares the database with the
   tables registered on ``Base.metadata`` (so import the app ORM modules first; the core never does)::

       import apps.finance.orm  # registers the finance tables
       from alembic import command
       command.revision(make_alembic_config(url), message="finance alerts", autogenerate=True)

   then review it and rename it to the ``000N_`` pattern. `upgrade_database` applies it everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from core.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

HOME_ENV = "VERTICALS_HOME"
DB_URL_ENV = "VERTICALS_DB_URL"
DEFAULT_DB_FILENAME = "verticals.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Deterministic constraint names: Alembic's SQLite batch mode recreates tables and must be able to name
# (and drop) every constraint; PostgreSQL gets the same names, so migrations are portable.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table in the suite (core tables in `core.orm`, app tables in `apps.<d>.orm`)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no timezone type and hands back naive datetimes; this type stores UTC and returns
    aware UTC datetimes everywhere, so comparisons and ISO output never mix naive and aware values.

    Raises:
        ConfigError: when a naive datetime is written (its zone would be a guess).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ConfigError(
                f"UTCDateTime: expected a timezone-aware datetime, got naive {value.isoformat()}; "
                "use datetime.now(timezone.utc)"
            )
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utc_now() -> datetime:
    """The current time as an aware UTC datetime (the default of every timestamp column)."""
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------------------
# Locations: home folder and database URL
# --------------------------------------------------------------------------------------------------


def default_home(environ: Mapping[str, str]) -> Path:
    """The suite's home folder: `VERTICALS_HOME` if set, else ``~/.verticals``.

    Args:
        environ: the environment mapping of the entry point (``os.environ`` there, a dict in tests).

    Returns:
        An absolute path (the folder is not created).
    """
    value = environ.get(HOME_ENV)
    home = Path(value) if value else Path.home() / ".verticals"
    return home.expanduser().resolve()


def resolve_db_url(cli_value: str | None, environ: Mapping[str, str], home: Path | None = None) -> str:
    """The database URL: the ``--db`` flag, else `VERTICALS_DB_URL`, else ``sqlite:///<home>/verticals.db``.

    Args:
        cli_value: value of the ``--db`` flag, None when not given.
        environ: the environment mapping of the entry point.
        home: the home folder for the default SQLite file; `default_home(environ)` when None.

    Returns:
        A SQLAlchemy URL string (not validated here; `make_engine` validates it).
    """
    if cli_value:
        return cli_value
    env_value = environ.get(DB_URL_ENV)
    if env_value:
        return env_value
    home = home if home is not None else default_home(environ)
    return f"sqlite:///{(home / DEFAULT_DB_FILENAME).as_posix()}"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for display and logs.

    Raises:
        ConfigError: when the string is not a SQLAlchemy URL.
    """
    return _parse_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class SuiteSettings:
    """Where the suite keeps its state: the home folder and the database URL.

    The root CLI stores one on the Typer context (``ctx.obj``) for every sub-command.

    Attributes:
        home: folder for models, generated data and the default SQLite database.
        db_url: SQLAlchemy URL of the database (may hold a password: display `masked_db_url`).
    """

    home: Path
    db_url: str

    @classmethod
    def resolve(cls, db: str | None, home: Path | None, environ: Mapping[str, str]) -> SuiteSettings:
        """Settings from flags (None when not given) with environment and default fallbacks."""
        home_path = home.expanduser().resolve() if home is not None else default_home(environ)
        return cls(home=home_path, db_url=resolve_db_url(db, environ, home=home_path))

    @property
    def masked_db_url(self) -> str:
        return mask_url(self.db_url)

    def to_environ(self) -> dict[str, str]:
        """The environment variables that make a child process (the Streamlit server) see these settings."""
        return {HOME_ENV: str(self.home), DB_URL_ENV: self.db_url}


# --------------------------------------------------------------------------------------------------
# Engines and sessions
# --------------------------------------------------------------------------------------------------


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as e:
        raise ConfigError(
            f"database URL: expected a SQLAlchemy URL such as 'sqlite:////path/verticals.db' or "
            f"'postgresql+psycopg://user:password@host/db', got {url!r}"
        ) from e


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, None for in-memory databases, URI filenames and other backends."""
    parsed = _parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver (its legacy mode skips BEGIN before SELECT/DDL/SAVEPOINT),
        # so transactions, savepoints and transactional DDL behave as on PostgreSQL.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets the Streamlit reader and a CLI writer work on the same file at once.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for a database URL.

    SQLite URLs get their parent folder created, foreign keys enforced and WAL journaling; every other URL
    (e.g. ``postgresql+psycopg://...``) is passed to SQLAlchemy unchanged. No connection is opened.

    Args:
        url: SQLAlchemy URL.
        **kwargs: passed to `sqlalchemy.create_engine` (e.g. ``echo=True``).

    Returns:
        The engine; the caller disposes of it.

    Raises:
        ConfigError: the URL cannot be parsed, or its driver is not installed.
    """
    parsed = _parse_url(url)
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as e:
        hint = (
            " (install it with: pip install 'verticals[postgres]')"
            if parsed.get_backend_name() == "postgresql"
            else ""
        )
        raise ConfigError(
            f"database URL {mask_url(url)}: the driver {parsed.drivername!r} is not available{hint}"
        ) from e
    if engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite":
        _configure_sqlite(engine)
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to an engine; callers own transactions (``with factory() as s, s.begin():``).

    ``expire_on_commit=False`` keeps loaded rows readable after the transaction ends (CLI output, UI tables).
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


# --------------------------------------------------------------------------------------------------
# Migrations (Alembic, imported lazily: it costs ~0.4 s and most commands never touch it)
# --------------------------------------------------------------------------------------------------


def make_alembic_config(url: str) -> Config:
    """An Alembic config for the packaged migrations; no ``alembic.ini`` and no particular CWD needed.

    Args:
        url: database URL the migrations run against (``env.py`` reads it from ``attributes["url"]``).
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # configparser interpolates '%', which URL-encoded passwords contain.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["url"] = url
    return config


def _join(revisions) -> str | None:
    return ",".join(sorted(revisions)) or None


def head_revision() -> str | None:
    """The newest migration revision(s) shipped with the package, comma-joined.

    Each app's tables are a branch of their own off the core revision (``branch_labels=("<app>",)``), so
    the apps can evolve their schemas independently; the database is current when it is at every head.
    """
    from alembic.script import ScriptDirectory

    return _join(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def current_revision(engine: Engine) -> str | None:
    """The migration revision(s) the database is at, comma-joined; None for a database never migrated.

    Raises:
        ConfigError: the database cannot be opened.
    """
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as connection:
            return _join(MigrationContext.configure(connection).get_current_heads())
    except OperationalError as e:
        raise ConfigError(f"database {mask_url(str(engine.url))}: cannot be opened ({e.orig})") from e


def upgrade_database(url: str, revision: str = "heads") -> str | None:
    """Run the migrations up to `revision` (idempotent: an up-to-date database is left unchanged).

    Args:
        url: database URL; a SQLite file and its folder are created when missing.
        revision: target revision, ``"heads"`` for the newest of every branch.

    Returns:
        The revision the database is at afterwards.

    Raises:
        ConfigError: the URL is invalid or the database cannot be opened.
    """
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = make_alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        return current_revision(engine)
    except OperationalError as e:
        raise ConfigError(f"database {mask_url(url)}: migration failed ({e.orig})") from e
    finally:
        engine.dispose()


@contextmanager
def migrated_session(url: str) -> Iterator[Session]:
    """A session on the database at `url`, migrated to the newest schema first, inside one transaction.

    For one-off writes from entry points (a CLI command registering a model run): committed on a normal
    exit, rolled back on an exception, and the engine is disposed either way.
    """
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def require_current_schema(engine: Engine) -> None:
    """Check that the database is migrated to the newest revision before reading or writing it.

    Raises:
        ConfigError: the database is not migrated (names the revisions and the command that fixes it).
    """
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise ConfigError(
            f"database {mask_url(str(engine.url))} is at schema revision {current or 'none'}, expected {head}; "
            "run `verticals db upgrade` (or `verticals demo`)"
        )

"""Where finance transactions are read from and written to: file and SQL source specs, raw readers, writers.

A source is given as one string (CLI flags, config files) or as a `FileSource` / `SqlSource`:

- a path ending in `.csv`, `.csv.gz` or `.parquet` (`.pq`);
- `URL::TABLE`: a SQLAlchemy URL, two colons, a table name (optionally `schema.table`), e.g.
  `sqlite:///bank.db::transactions` or `postgresql+psycopg://user@host/bank::public.card_tx`;
- `URL::QUERY`: the same with a query starting with `SELECT` or `WITH`, e.g.
  `sqlite:///bank.db::SELECT * FROM tx WHERE ts >= '2024-01-01' ORDER BY ts`.
  The URL ends at the first `::` outside square brackets (IPv6 hosts), so casts such as `amount::float`
  inside the query are safe.

Readers here only do IO: they return the source's columns and values as stored, indexed by the 1-based
data row number (header excluded; for SQL, the row of the result). Column presets live in
`apps.finance.formats`, the rules in `apps.finance.adapters`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from apps.finance.schema import SOURCE_ROW
from core.errors import AdapterError, ConfigError

logger = logging.getLogger(__name__)

FILE_SUFFIXES: dict[str, Literal["csv", "parquet"]] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File suffixes understood by `parse_source` and `write_table`, and the file type of each."""

_SQL_SPEC = re.compile(r"^(?P<url>[A-Za-z][A-Za-z0-9+.\-]*://(?:\[[^\]]*\]|[^\[])*?)::(?P<target>.+)$", re.S)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_QUERY_START = re.compile(r"^\s*(select|with)\b", re.I)


@dataclass(frozen=True)
class FileSource:
    """A CSV, CSV.gz or Parquet file.

    Attributes:
        path: The file.
        kind: `"csv"` (plain or gzip, by suffix) or `"parquet"`.
    """

    path: Path
    kind: Literal["csv", "parquet"]

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class SqlSource:
    """A table or a query of a database reached through a SQLAlchemy URL; exactly one of table/query.

    Attributes:
        url: SQLAlchemy URL, e.g. `sqlite:///bank.db`.
        table: Table name, optionally `schema.table` (letters, digits, `_`, `$`).
        query: A `SELECT`/`WITH` query.

    Raises:
        ConfigError: Both or neither of table/query given, or the table is not a plain name.
    """

    url: str
    table: str | None = None
    query: str | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise ConfigError(
                f"SqlSource needs exactly one of table= or query=; got table={self.table!r}, query={self.query!r}"
            )
        if self.table is not None and not _IDENTIFIER.match(self.table):
            raise ConfigError(
                f"SqlSource table {self.table!r} is not a table name; expected NAME or SCHEMA.NAME "
                "(letters, digits, _), or pass query='SELECT ...'"
            )

    def __str__(self) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            url = self.url
        return f"{url}::{self.table if self.table is not None else self.query}"


def parse_source(src: str | os.PathLike[str] | FileSource | SqlSource) -> FileSource | SqlSource:
    """Interpret a source specification (syntax in the module docstring).

    Args:
        src: A path, a `URL::TABLE` / `URL::QUERY` string, or an already parsed source.

    Returns:
        The `FileSource` or `SqlSource` it names.

    Raises:
        AdapterError: The file suffix is not supported, or the SQL target is neither a table name nor a query.
    """
    if isinstance(src, FileSource | SqlSource):
        return src
    text = os.fspath(src)
    match = _SQL_SPEC.match(text) if isinstance(src, str) else None
    if match:
        url, target = match.group("url"), match.group("target").strip()
        if _QUERY_START.match(target):
            return SqlSource(url, query=target)
        if _IDENTIFIER.match(target):
            return SqlSource(url, table=target)
        raise AdapterError(
            f"SQL source {text!r}: {target!r} is neither a table name nor a query; expected "
            "URL::TABLE (e.g. sqlite:///bank.db::transactions) or URL::SELECT ... / URL::WITH ..."
        )
    name = Path(text).name.lower()
    for suffix, kind in FILE_SUFFIXES.items():
        if name.endswith(suffix):
            return FileSource(Path(text), kind)
    raise AdapterError(
        f"cannot tell the type of source {text!r}; expected a file ending in "
        f"{', '.join(FILE_SUFFIXES)} or a SQL source URL::TABLE or URL::SELECT ..."
    )


def iter_raw(
    source: FileSource | SqlSource, chunksize: int | None = None, *, text_columns: Collection[str] = ()
) -> Iterator[pd.DataFrame]:
    """Yield a source's rows as stored, in frames of at most `chunksize` rows (one frame when None).

    CSV files are read with `read_csv(chunksize=)`, Parquet with `ParquetFile.iter_batches`, SQL with
    `read_sql(chunksize=)`; reading is lazy and the file or connection is closed when the iterator ends
    or is closed.

    Args:
        source: A parsed source.
        chunksize: Rows per frame, or None for one frame.
        text_columns: CSV columns to read as text rather than inferring numbers (ids keep leading
            zeros and 64-bit hashes stay exact).

    Yields:
        Frames indexed by the 1-based data row number (`SOURCE_ROW`), with `attrs["source"]` set.

    Raises:
        AdapterError: The source cannot be found or read; the message names it and the cause.
    """
    offset = 0
    for frame in _iter_unindexed(source, chunksize, text_columns):
        frame.index = pd.RangeIndex(offset + 1, offset + 1 + len(frame), name=SOURCE_ROW)
        frame.attrs["source"] = str(source)
        offset += len(frame)
        yield frame


def _iter_unindexed(
    source: FileSource | SqlSource, chunksize: int | None, text_columns: Collection[str]
) -> Iterator[pd.DataFrame]:
    if isinstance(source, SqlSource):
        yield from _iter_sql(source, chunksize)
        return
    if not source.path.is_file():
        raise AdapterError(f"source file {source.path} does not exist (or is not a file); check the path")
    try:
        if source.kind == "parquet":
            yield from _iter_parquet(source.path, chunksize)
        else:
            yield from _iter_csv(source.path, chunksize, text_columns)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"cannot read {source.kind.upper()} file {source.path}: {e}") from e


def _iter_csv(path: Path, chunksize: int | None, text_columns: Collection[str]) -> Iterator[pd.DataFrame]:
    header = pd.read_csv(path, nrows=0).columns
    # Only empty fields are missing: "NA" (Namibia) or "null" stay text, and a word in a numeric
    # column is reported by validation instead of turning into a silent NaN.
    options: dict[str, Any] = {
        "dtype": {c: "str" for c in header if c in text_columns},
        "keep_default_na": False,
        "na_values": [""],
    }
    if chunksize is None:
        yield pd.read_csv(path, **options)
        return
    with pd.read_csv(path, chunksize=chunksize, **options) as reader:
        yield from reader


def _iter_parquet(path: Path, chunksize: int | None) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if chunksize is None:
            yield pd.read_parquet(path)
            return
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunksize):
            yield batch.to_pandas()
    except pa.ArrowException as e:
        raise AdapterError(f"cannot read Parquet file {path}: {e}") from e


def _iter_sql(source: SqlSource, chunksize: int | None) -> Iterator[pd.DataFrame]:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(source.url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
        raise AdapterError(
            f"SQL source {source}: unusable SQLAlchemy URL ({e}); expected e.g. sqlite:///bank.db"
        ) from e
    try:
        with engine.connect() as conn:
            if source.table is not None:
                schema, _, table = source.table.rpartition(".")
                result = pd.read_sql_table(table, conn, schema=schema or None, chunksize=chunksize)
            else:
                result = pd.read_sql_query(sa.text(source.query), conn, chunksize=chunksize)
            if isinstance(result, pd.DataFrame):
                yield result
            else:
                yield from result
    except (sa.exc.SQLAlchemyError, ValueError) as e:
        raise AdapterError(f"cannot read SQL source {source}: {e}") from e
    finally:
        engine.dispose()


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], *, index: bool = False) -> Path:
    """Write a frame to CSV, CSV.gz or Parquet, chosen by the file suffix.

    Timestamps are written as ISO-8601 with their UTC offset, which the readers parse back unchanged.

    Args:
        df: The frame.
        path: Destination ending in `.csv`, `.csv.gz`, `.parquet` or `.pq`.
        index: Also write the index (as a column named after it).

    Returns:
        The path written.

    Raises:
        AdapterError: Unsupported suffix, or the file cannot be written.
    """
    target = parse_source(Path(path))
    if not isinstance(target, FileSource):  # a Path never parses as SQL
        raise AdapterError(f"cannot write to {path}; expected a file path")
    try:
        if target.kind == "parquet":
            df.to_parquet(target.path, index=index)
        else:
            df.to_csv(target.path, index=index)
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot write {target.path}: {e}") from e
    logger.info("wrote %d rows to %s", len(df), target.path)
    return target.path

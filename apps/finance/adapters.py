"""Read finance transaction sources, validate them against the canonical rules, quarantine bad rows.

This is the app's data entry point; it assembles `sources` (IO), `formats` (column presets) and
`validation` (rules), and re-exports what callers need. The three steps of every app:

1. `read_source(src, format, columns, chunksize)`: IO (`apps.finance.sources`: CSV, CSV.gz, Parquet,
   `URL::TABLE`, `URL::SELECT ...`) plus the format preset (`apps.finance.formats`: `canonical` with an
   optional column mapping, `tabformer`, `handbook`). Column names become canonical; values are as the
   source wrote them; the index is the 1-based source row.
2. `validate(df, on_invalid)` (`apps.finance.validation`): the rules of `apps.finance.schema`, then
   conversion to the typed canonical frame; bad rows raise `InputValidationError` (naming source, row,
   id, column, value and what was expected) or, with `on_invalid="quarantine"`, come back aside with a
   `reject_reason` for `write_quarantine`. `StreamValidator` carries duplicate-id and time-order checks across chunks;
   `parse_transaction` checks one transaction of the real-time path.
3. `apps.finance.encode` turns canonical frames into model batches.

Example:
    >>> valid, rejected = validate(read_source("tx.csv.gz", format="handbook"), on_invalid="quarantine")  # doctest: +SKIP
    >>> write_quarantine(rejected, "tx.rejected.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import overload

import pandas as pd

from apps.finance.formats import FORMATS, REFUND_COLUMN, load_column_mapping, resolve_preset
from apps.finance.schema import SOURCE_ROW
from apps.finance.sources import FileSource, SqlSource, iter_raw, parse_source, write_table
from apps.finance.validation import (
    ON_INVALID,
    REASON_SEPARATOR,
    StreamValidator,
    parse_transaction,
    sort_transactions,
    validate,
)
from core.errors import ConfigError

__all__ = [
    "FORMATS",
    "ON_INVALID",
    "REASON_SEPARATOR",
    "REFUND_COLUMN",
    "FileSource",
    "SqlSource",
    "StreamValidator",
    "load_column_mapping",
    "parse_source",
    "parse_transaction",
    "read_source",
    "sort_transactions",
    "validate",
    "write_quarantine",
    "write_table",
]

SourceSpec = str | os.PathLike[str] | FileSource | SqlSource
ColumnMapping = Mapping[str, str] | str | os.PathLike[str]


@overload
def read_source(
    src: SourceSpec, format: str = ..., columns: ColumnMapping | None = ..., chunksize: None = ...
) -> pd.DataFrame: ...


@overload
def read_source(
    src: SourceSpec, format: str = ..., columns: ColumnMapping | None = ..., *, chunksize: int
) -> Iterator[pd.DataFrame]: ...


def read_source(
    src: SourceSpec,
    format: str = "canonical",
    columns: ColumnMapping | None = None,
    chunksize: int | None = None,
) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """Read a transaction source into canonical column names (values not yet validated).

    Pass the result to `validate` (one frame) or to a `StreamValidator` (chunks).

    Args:
        src: A file path or SQL spec (syntax in `apps.finance.sources`), or a `FileSource`/`SqlSource`.
        format: `"canonical"`, `"tabformer"` or `"handbook"` (see `apps.finance.formats`).
        columns: For `"canonical"` only: a mapping canonical name -> source column, or the path of a
            JSON file holding one; canonical names that are not mapped are looked up as they are.
        chunksize: None reads everything into one frame; a positive int returns a lazy iterator of frames
            of at most that many rows (for streaming millions of rows in bounded memory).

    Returns:
        One frame, or an iterator of frames: the canonical columns the source provides, then its extra
        columns; index = 1-based source row (`SOURCE_ROW`); `attrs["source"]` names the source.

    Raises:
        ConfigError: Unknown format, bad column mapping, or a chunksize that is not a positive int.
        AdapterError: The source cannot be found or read (for an iterator: when it is consumed).
        InputValidationError: A required column is missing (the message lists found and expected columns).
    """
    preset = resolve_preset(format, columns)
    source = parse_source(src)
    if chunksize is None:
        return preset.apply(next(iter_raw(source, None, text_columns=preset.text_columns)))
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize <= 0:
        raise ConfigError(f"chunksize must be a positive number of rows or None; got {chunksize!r}")
    return (preset.apply(raw) for raw in iter_raw(source, chunksize, text_columns=preset.text_columns))


def write_quarantine(rejected: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write rejected rows (from `validate(..., on_invalid="quarantine")`) to a CSV side file.

    The file holds `source_row` (the 1-based row in the source), the rows as they were read and
    `reject_reason`.

    Args:
        rejected: The rejected frame.
        path: Destination ending in `.csv` or `.csv.gz`.

    Returns:
        The path written.

    Raises:
        ConfigError: The path is not a CSV path.
        AdapterError: The file cannot be written.
    """
    if not str(path).lower().endswith((".csv", ".csv.gz")):
        raise ConfigError(f"quarantine file {path} must end in .csv or .csv.gz")
    return write_table(rejected.rename_axis(SOURCE_ROW), path, index=True)

"""Read -> validate -> convert education sources (files, SQL) into the canonical interaction table.

Sources (`read_interactions(source, format=...)` dispatches on `FORMATS`):

- `canonical`: a CSV or Parquet file, or a SQL table/query (SQLAlchemy URL), with the canonical columns
  of `schema` (`user_id`, `order` and/or `timestamp`, `item_id`, `skill_id`, `correct`, optional
  `skill_name`, `attempt_count`, `response_time_ms`; other columns are kept).
- `pykt`: pyKT's `train_valid.csv` / `test.csv` / `*_sequences.csv` (`fold,uid[,questions],concepts,
  responses[,timestamps,usetimes,...]`, comma-separated lists inside quoted fields, `-1` padding,
  `_`-joined multi-concepts, `is_repeat` expansion rows merged back into one interaction).
- `dkvmn`: the DKVMN 3-line text format (count / skill ids / responses), with the multi-skill regrouping
  that removes its label leak (`regroup_multiskill`).
- `assistments`: the raw ASSISTments skill-builder export (`order_id, user_id, problem_id, skill_id,
  skill_name, correct, original, attempt_count, ms_first_response, ...`); rows sharing an `order_id`
  (one answer to a multi-skill problem) become one interaction with several skills.

Every reader validates row by row (missing user, item or skill; `correct` not 0/1; unparseable order or
timestamp; non-numeric attempt count or response time). With `on_invalid="raise"` (default) the first
bad row raises `InputValidationError` naming the source, row, column, value and what was expected; with
`on_invalid="quarantine"` bad rows come back in `InteractionLog.rejected` with a `reject_reason`, ready
for `write_quarantine`, and every source row is either accepted or rejected (nothing is lost).

Format layouts are turned into canonical column names by `apps.education.formats` (pure functions); the
canonical table then goes to `apps.education.encode` (vocabularies, per-student sequences, pyKT windows).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import sqlalchemy as sa

from apps.education.formats import (
    ASSISTMENTS_COLUMNS,
    ConflictPolicy,
    assistments_to_raw,
    estimate_multiskill_pairs,
    merge_multiskill_rows,
    parse_dkvmn,
    pykt_to_raw,
    regroup_multiskill,
)
from apps.education.schema import (
    CANONICAL_COLUMNS,
    INTERACTION_DTYPES,
    ORDER_COLUMNS,
    REJECT_REASON_COLUMN,
    REQUIRED_COLUMNS,
    InteractionLog,
    OnInvalid,
)
from core.errors import AdapterError, ConfigError, InputValidationError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
FORMATS: tuple[str, ...] = ("canonical", "pykt", "dkvmn", "assistments")

_TABLE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_FIX_HINT = "Fix the source, or pass on_invalid='quarantine' to set such rows aside."


class InteractionDataWarning(UserWarning):
    """A value was degraded to missing (e.g. a negative response time) but the row was kept."""


# ---------------------------------------------------------------------------------------------------
# Validation: raw rows (canonical column names, any dtype) -> canonical table + rejected rows
# ---------------------------------------------------------------------------------------------------


def _id_strings(column: pd.Series) -> pd.Series:
    """Ids as stripped strings; integral floats (an int column with NaN) lose their '.0'."""
    if pd.api.types.is_float_dtype(column):
        finite = column.dropna()
        if (finite == np.floor(finite)).all():
            column = column.astype("Int64")
    strings = column.astype("string").str.strip()
    return strings.mask(strings == "")


def _numbers(column: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(float values, mask of present-but-not-numeric cells)."""
    if pd.api.types.is_bool_dtype(column):
        column = column.astype("Int8")
    if pd.api.types.is_numeric_dtype(column):
        values = column.astype("float64")
        return values, pd.Series(False, index=column.index)
    text = column.astype("string").str.strip()
    present = text.notna() & (text != "")
    values = pd.to_numeric(text.mask(~present), errors="coerce").astype("float64")
    return values, present & values.isna()


def _timestamps(column: pd.Series, unit: str) -> tuple[pd.Series, pd.Series]:
    """(UTC timestamps, mask of missing-or-unparseable cells); numbers are epochs in `unit`."""
    if pd.api.types.is_datetime64_any_dtype(column):
        values = pd.to_datetime(column, utc=True)
        return values, values.isna()
    numbers, not_numeric = _numbers(column)
    if not not_numeric.any() and numbers.notna().any():
        values = pd.to_datetime(numbers, unit=unit, utc=True, errors="coerce")
        return values, values.isna()
    text = column.astype("string").str.strip()
    present = text.notna() & (text != "")
    with warnings.catch_warnings():
        # pandas warns when it falls back to per-element parsing; the retry below handles mixed formats.
        warnings.simplefilter("ignore", UserWarning)
        values = pd.to_datetime(text.mask(~present), utc=True, errors="coerce")
        retry = present & values.isna()
        if retry.any():
            values[retry] = pd.to_datetime(text[retry], utc=True, errors="coerce", format="mixed")
    return values, values.isna()


def _rule_message(
    source: str, raw: pd.DataFrame, rows: pd.Series, column: str, expected: str, label: str
) -> str:
    first = rows.index[rows.to_numpy()][0]
    value = raw.at[first, column] if column in raw.columns else None
    row = raw.at[first, "source_row"]
    user = raw.at[first, "user_id"] if "user_id" in raw.columns else None
    count = int(rows.sum())
    more = f" {count} rows break this rule." if count > 1 else ""
    return (
        f"{source}: row {row} (user_id={user!r}), column '{label}': got {value!r}; expected {expected}."
        f"{more} {_FIX_HINT}"
    )


def validate_interactions(
    raw: pd.DataFrame,
    *,
    source: str = "<frame>",
    on_invalid: OnInvalid = "raise",
    timestamp_unit: str = "s",
    original: Optional[pd.DataFrame] = None,
    column_labels: Optional[dict[str, str]] = None,
) -> InteractionLog:
    """Validate raw interaction rows and convert them to the canonical table (one output row per input row).

    Args:
        raw: Rows with canonical column names (`user_id`, `item_id`, `skill_id`, `correct`, and `order`
            and/or `timestamp`; optional `skill_name`, `attempt_count`, `response_time_ms`,
            `source_row`), values of any dtype (strings as read from CSV are fine). Other columns are
            kept as they are.
        source: Name of the source for messages.
        on_invalid: `"raise"` raises on the first bad row; `"quarantine"` returns bad rows in `rejected`.
        timestamp_unit: Unit of numeric timestamps (epochs), e.g. `"s"` or `"ms"`.
        original: The rows as they appear in the source (same index as `raw`), copied to `rejected`;
            defaults to `raw`.
        column_labels: Canonical column -> the source's own column name, for messages and reasons.

    Returns:
        The accepted rows as a canonical table (source order) and the rejected rows.

    Raises:
        InputValidationError: A required column is missing, or a row breaks a rule and
            `on_invalid="raise"`.
        ConfigError: `on_invalid` is not `"raise"` or `"quarantine"`.
    """
    if on_invalid not in ("raise", "quarantine"):
        raise ConfigError(f"on_invalid must be 'raise' or 'quarantine'; got {on_invalid!r}.")
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if not any(column in raw.columns for column in ORDER_COLUMNS):
        missing.append("order or timestamp")
    if missing:
        raise InputValidationError(
            f"{source}: missing column(s) {missing}; found {list(raw.columns)}. Expected the canonical "
            f"interaction columns {[*REQUIRED_COLUMNS, 'order|timestamp']} (or pick the matching format)."
        )
    raw = raw.reset_index(drop=True)
    original = raw if original is None else original.reset_index(drop=True)
    if "source_row" not in raw.columns:
        raw = raw.assign(source_row=np.arange(1, len(raw) + 1, dtype=np.int64))

    labels = column_labels or {}
    out: dict[str, Any] = {}
    rules: list[tuple[pd.Series, str, str]] = []  # (bad rows, column, what was expected)
    for column in ("user_id", "item_id", "skill_id"):
        out[column] = _id_strings(raw[column])
        rules.append((out[column].isna(), column, f"a non-empty {column}"))
    correct, _ = _numbers(raw["correct"])
    rules.append((~correct.isin([0.0, 1.0]), "correct", "0 or 1"))
    out["correct"] = correct.fillna(0).astype("int8")
    if "order" in raw.columns:
        order, _ = _numbers(raw["order"])
        bad_order = order.isna() | ~np.isfinite(order) | (order != np.floor(order))
        rules.append((bad_order, "order", "an integer position"))
        out["order"] = order.where(~bad_order, 0).astype("int64")
    else:
        out["order"] = raw["source_row"].astype("int64")
    if "timestamp" in raw.columns:
        timestamp, bad_time = _timestamps(raw["timestamp"], timestamp_unit)
        rules.append((bad_time, "timestamp", f"a date-time or an epoch number in '{timestamp_unit}'"))
        out["timestamp"] = timestamp
    else:
        out["timestamp"] = pd.Series(pd.NaT, index=raw.index, dtype=INTERACTION_DTYPES["timestamp"])
    out["skill_name"] = (
        _id_strings(raw["skill_name"]) if "skill_name" in raw.columns else pd.Series(pd.NA, index=raw.index)
    )
    if "attempt_count" in raw.columns:
        attempts, not_numeric = _numbers(raw["attempt_count"])
        bad_attempts = not_numeric | (attempts.notna() & ((attempts < 0) | (attempts != np.floor(attempts))))
        rules.append((bad_attempts, "attempt_count", "a non-negative integer or empty"))
        out["attempt_count"] = attempts.where(~bad_attempts)
    else:
        out["attempt_count"] = pd.Series(np.nan, index=raw.index)
    if "response_time_ms" in raw.columns:
        response_ms, not_numeric = _numbers(raw["response_time_ms"])
        rules.append((not_numeric, "response_time_ms", "a number of milliseconds or empty"))
        negative = response_ms < 0
        if negative.any():
            # ASSISTments logs hold a few negative first-response times (clock skew): the answer is valid,
            # the duration is not, so only the duration is dropped.
            warnings.warn(
                f"{source}: {int(negative.sum())} negative response_time_ms value(s) set to missing "
                f"(first at row {raw.loc[negative, 'source_row'].iloc[0]}).",
                InteractionDataWarning,
                stacklevel=2,
            )
        out["response_time_ms"] = response_ms.where(~negative)
    else:
        out["response_time_ms"] = pd.Series(np.nan, index=raw.index)
    out["source_row"] = raw["source_row"].astype("int64")

    bad = pd.Series(False, index=raw.index)
    for rows, _, _ in rules:
        bad |= rows
    if bad.any() and on_invalid == "raise":
        rows, column, expected = next(rule for rule in rules if rule[0].any())
        raise InputValidationError(
            _rule_message(source, raw, rows, column, expected, labels.get(column, column))
        )

    frame = pd.DataFrame(out)
    frame = frame.astype({name: dtype for name, dtype in INTERACTION_DTYPES.items() if name != "timestamp"})
    frame["timestamp"] = frame["timestamp"].astype(INTERACTION_DTYPES["timestamp"])
    extras = [column for column in raw.columns if column not in CANONICAL_COLUMNS]
    frame = pd.concat([frame[list(CANONICAL_COLUMNS)], raw[extras]], axis=1)

    rules = [(rows, labels.get(column, column), expected) for rows, column, expected in rules]
    rejected = _rejected_rows(original, raw["source_row"], rules, bad)
    if len(rejected):
        counts = {column: int(rows.sum()) for rows, column, _ in rules if rows.any()}
        logger.warning("%s: %d row(s) quarantined, bad cells per column: %s", source, len(rejected), counts)
    accepted = frame.loc[~bad].reset_index(drop=True)
    return InteractionLog(frame=accepted, rejected=rejected, source=source)


def _rejected_rows(
    original: pd.DataFrame, source_row: pd.Series, rules: list[tuple[pd.Series, str, str]], bad: pd.Series
) -> pd.DataFrame:
    rejected = original.loc[bad].copy()
    rejected["source_row"] = source_row[bad].to_numpy()
    reasons = pd.Series("", index=rejected.index, dtype="object")
    for rows, column, expected in rules:
        hit = rows[bad]
        if hit.any():
            reasons[hit] = reasons[hit] + f"{column}: expected {expected}; "
    rejected[REJECT_REASON_COLUMN] = reasons.str.rstrip("; ").astype("string")
    return rejected.reset_index(drop=True)


def _combine(log: InteractionLog, extra_rejected: pd.DataFrame) -> InteractionLog:
    if not len(extra_rejected):
        return log
    rejected = pd.concat([log.rejected, extra_rejected], ignore_index=True).sort_values("source_row")
    return InteractionLog(frame=log.frame, rejected=rejected.reset_index(drop=True), source=log.source)


def write_quarantine(rejected: pd.DataFrame, path: PathLike) -> Path:
    """Write rejected rows (with `source_row` and `reject_reason`) to a CSV or Parquet file.

    Args:
        rejected: `InteractionLog.rejected`.
        path: Output file; `.parquet` / `.pq` writes Parquet, anything else CSV. Parent folders are created.

    Returns:
        The path written.

    Raises:
        AdapterError: The file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".parquet", ".pq"):
            rejected.astype(
                {column: "string" for column in rejected.columns if rejected[column].dtype == object}
            ).to_parquet(path, index=False)
        else:
            rejected.to_csv(path, index=False)
    except OSError as error:
        raise AdapterError(f"cannot write the quarantine file {path}: {error}") from error
    logger.warning("wrote %d rejected row(s) to %s", len(rejected), path)
    return path


# ---------------------------------------------------------------------------------------------------
# Canonical CSV / Parquet / SQL
# ---------------------------------------------------------------------------------------------------


def _read_table(path: PathLike, *, encoding: str = "utf-8") -> pd.DataFrame:
    """A CSV (all cells as strings, only empty cells missing) or Parquet file as a DataFrame."""
    path = Path(path)
    kind = _TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise AdapterError(
            f"{path}: unsupported file type '{path.suffix}'; expected one of {sorted(_TABLE_SUFFIXES)}."
        )
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""], encoding=encoding)
    except FileNotFoundError as error:
        raise AdapterError(f"{path}: file not found.") from error
    except UnicodeDecodeError as error:
        raise AdapterError(
            f"{path}: not valid {encoding} text ({error.reason} at byte {error.start}); pass the file's "
            "encoding, e.g. encoding='latin-1' for older ASSISTments exports."
        ) from error
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise AdapterError(f"{path}: cannot read it as {kind}: {error}") from error


def read_canonical(
    path: PathLike, *, on_invalid: OnInvalid = "raise", timestamp_unit: str = "s", encoding: str = "utf-8"
) -> InteractionLog:
    """Read a canonical interaction CSV or Parquet file.

    Args:
        path: `.csv` (also `.tsv`/`.txt`/`.gz` read as CSV) or `.parquet` file with canonical columns.
        on_invalid: `"raise"` or `"quarantine"` (see `validate_interactions`).
        timestamp_unit: Unit of numeric (epoch) timestamps.
        encoding: Text encoding of a CSV file.

    Returns:
        The validated interactions and rejected rows.

    Raises:
        AdapterError: The file is missing or unreadable.
        InputValidationError: A column is missing or a row is invalid (with `on_invalid="raise"`).
    """
    raw = _read_table(path, encoding=encoding)
    log = validate_interactions(raw, source=str(path), on_invalid=on_invalid, timestamp_unit=timestamp_unit)
    logger.info("%s: %s", path, log.summary())
    return log


def read_sql_interactions(
    url: Union[str, sa.engine.Engine, sa.engine.Connection],
    *,
    table: Optional[str] = None,
    query: Optional[str] = None,
    on_invalid: OnInvalid = "raise",
    timestamp_unit: str = "s",
) -> InteractionLog:
    """Read canonical interactions from a SQL table or query.

    Args:
        url: A SQLAlchemy URL (an engine is created and disposed here) or an engine/connection the
            caller owns.
        table: Table name (optionally `schema.table`) to read entirely; give exactly one of `table` and
            `query`.
        query: A SELECT returning canonical columns.
        on_invalid: `"raise"` or `"quarantine"`; rows are numbered 1.. in result order.
        timestamp_unit: Unit of numeric (epoch) timestamps; naive date-times are taken as UTC.

    Returns:
        The validated interactions and rejected rows.

    Raises:
        ConfigError: Not exactly one of `table` / `query` was given.
        AdapterError: The database cannot be reached or the statement fails.
        InputValidationError: A column is missing or a row is invalid (with `on_invalid="raise"`).
    """
    if (table is None) == (query is None):
        raise ConfigError("read_sql_interactions: give exactly one of table=... or query=...")
    if table is not None:
        schema, _, name = table.rpartition(".")
        statement = sa.select(sa.text("*")).select_from(sa.table(name, schema=schema or None))
    else:
        statement = sa.text(query)
    owns_engine = isinstance(url, str)
    bind = sa.create_engine(url) if isinstance(url, str) else url
    label = url if isinstance(url, str) else repr(bind)
    source = f"{label} ({'table ' + table if table is not None else 'query'})"
    try:
        with (
            bind.connect()
            if isinstance(bind, sa.engine.Engine)
            else contextlib.nullcontext(bind) as connection
        ):
            raw = pd.read_sql(statement, connection)
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as error:
        raise AdapterError(f"{source}: cannot read interactions: {error}") from error
    finally:
        if owns_engine:
            bind.dispose()
    return validate_interactions(raw, source=source, on_invalid=on_invalid, timestamp_unit=timestamp_unit)


# ---------------------------------------------------------------------------------------------------
# pyKT sequence CSV
# ---------------------------------------------------------------------------------------------------


def read_pykt(path: PathLike, *, on_invalid: OnInvalid = "raise") -> InteractionLog:
    """Read a pyKT sequence CSV (`train_valid.csv`, `test.csv` or a `*_sequences.csv` chunk file).

    Sliding-window files (`*_window_sequences.csv`) repeat interactions and are not interaction logs;
    read the non-window file and use `make_windows(..., mode="sliding")` instead.

    Args:
        path: The CSV file.
        on_invalid: `"raise"` or `"quarantine"`; a rejected row keeps its CSV row number in `source_row`
            and its position in `order`.

    Returns:
        Canonical interactions (`timestamp` is NaT unless the file has `timestamps`; `fold` kept).

    Raises:
        AdapterError: The file is missing or unreadable.
        InputValidationError: Wrong columns, lists of unequal length, or an invalid value.
    """
    table = _read_table(path)
    raw = pykt_to_raw(table, source=str(path))
    log = validate_interactions(raw, source=str(path), on_invalid=on_invalid, timestamp_unit="ms")
    logger.info("%s: %s", path, log.summary())
    return log


# ---------------------------------------------------------------------------------------------------
# DKVMN 3-line format (regrouping in formats.py)
# ---------------------------------------------------------------------------------------------------


def read_dkvmn_skill_names(path: PathLike) -> dict[str, str]:
    """Read DKVMN's `skill_id<TAB>skill_name` mapping (e.g. `assist2009_updated_skill_mapping.txt`).

    Args:
        path: The mapping file; names may be double-quoted; surrounding spaces are stripped.

    Returns:
        skill id -> skill name.

    Raises:
        AdapterError: The file is missing or not two tab-separated columns.
    """
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype="string", quotechar='"', keep_default_na=False)
    except (OSError, pd.errors.ParserError) as error:
        raise AdapterError(f"{path}: cannot read the skill mapping: {error}") from error
    if table.shape[1] != 2:
        raise AdapterError(
            f"{path}: expected 2 tab-separated columns (skill_id, skill_name); got {table.shape[1]}."
        )
    return dict(zip(table[0].str.strip(), table[1].str.strip(), strict=True))


def read_dkvmn(
    path: PathLike,
    *,
    skill_names: Optional[dict[str, str]] = None,
    regroup: bool = True,
    multiskill_pairs: Optional[Collection[tuple[str, str]]] = None,
    conflict: ConflictPolicy = "first",
    user_prefix: Optional[str] = None,
    on_invalid: OnInvalid = "raise",
) -> InteractionLog:
    """Read a DKVMN 3-line file, regrouping expanded multi-skill items into one interaction each.

    What the format allows: it keeps only skill ids and responses (no problem ids, no timestamps), so a
    multi-skill problem survives only as consecutive rows of a skill pair that (almost) always share one
    response. The regrouping recovers items from that signature (`estimate_multiskill_pairs` on the
    training file, then `regroup_multiskill`). It cannot tell a real two-skill problem from two separate
    problems of such a pair answered back to back (both become one item), and the item id is the skill
    combination, not a problem id. Users are numbered per file (`<stem>:<n>`), so the same student has
    different ids in `train.csv` and `train1.csv`.

    Args:
        path: The 3-line file (e.g. `assist2009_updated_train.csv`).
        skill_names: skill id -> name (`read_dkvmn_skill_names`), fills `skill_name`.
        regroup: False keeps the leaky KC-level rows (only for reporting the naive number next to the
            de-duplicated one).
        multiskill_pairs: Pairs estimated on the training file; None estimates them from this file.
        conflict: See `regroup_multiskill`.
        user_prefix: Prefix of the generated user ids; default `"<file stem>:"`.
        on_invalid: `"raise"` or `"quarantine"` (applies to KC-level rows, before regrouping).

    Returns:
        Canonical interactions with `n_expanded_rows` (1 for single-skill items).

    Raises:
        AdapterError: The file is missing or unreadable.
        InputValidationError: The 3-line structure is broken or a value is invalid.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise AdapterError(f"{path}: cannot read it: {error}") from error
    prefix = f"{path.stem}:" if user_prefix is None else user_prefix
    raw = parse_dkvmn(lines, source=str(path), user_prefix=prefix)
    if skill_names is not None:
        raw["skill_name"] = raw["skill_id"].map(skill_names).astype("string")
    log = validate_interactions(raw, source=str(path), on_invalid=on_invalid)
    if regroup:
        pairs = estimate_multiskill_pairs(log.frame) if multiskill_pairs is None else multiskill_pairs
        log = InteractionLog(
            frame=regroup_multiskill(log.frame, pairs, conflict=conflict),
            rejected=log.rejected,
            source=log.source,
        )
    logger.info("%s: %s", path, log.summary())
    return log


# ---------------------------------------------------------------------------------------------------
# Raw ASSISTments skill-builder export
# ---------------------------------------------------------------------------------------------------


def read_assistments(
    path: PathLike, *, on_invalid: OnInvalid = "raise", encoding: str = "utf-8"
) -> InteractionLog:
    """Read a raw ASSISTments skill-builder export (CSV or Parquet).

    Rows sharing an `order_id` (one answer to a multi-skill problem, repeated per skill) become one
    interaction whose `skill_id` lists every skill; `order_id` orders the answers (it increases with time
    in ASSISTments). `ms_first_response` -> `response_time_ms` (negative values set to missing with an
    `InteractionDataWarning`); all other columns (`original`, `assignment_id`, ...) are kept.

    Args:
        path: The export file.
        on_invalid: `"raise"` or `"quarantine"`. Rows without a `skill_id` (common in the 2009 release)
            break the missing-skill rule; rows sharing an `order_id` that disagree on `problem_id` or
            `correct` are rejected together.
        encoding: Text encoding (older exports are `latin-1`).

    Returns:
        Canonical interactions, one per answer.

    Raises:
        AdapterError: The file is missing or unreadable.
        InputValidationError: A column is missing or a row is invalid (with `on_invalid="raise"`).
    """
    table = _read_table(path, encoding=encoding)
    raw = assistments_to_raw(table, source=str(path))
    labels = {canonical: name for name, canonical in ASSISTMENTS_COLUMNS.items()}
    log = validate_interactions(
        raw, source=str(path), on_invalid=on_invalid, original=table, column_labels=labels
    )
    frame, bad_rows = merge_multiskill_rows(log.frame, source=str(path))
    if len(bad_rows):
        first = int(bad_rows.min())
        message = (
            f"{path}: row {first}: rows sharing its order_id disagree on problem_id or correct; expected "
            f"one answer repeated once per skill. {len(bad_rows)} rows are affected. {_FIX_HINT}"
        )
        if on_invalid == "raise":
            raise InputValidationError(message)
        logger.warning(message)
        rows = table.iloc[np.sort(bad_rows.to_numpy()) - 1].copy()
        rows["source_row"] = np.sort(bad_rows.to_numpy())
        rows[REJECT_REASON_COLUMN] = pd.Series(
            "order_id: rows disagree on problem_id or correct", index=rows.index, dtype="string"
        )
        log = _combine(
            InteractionLog(frame=frame, rejected=log.rejected, source=log.source), rows.reset_index(drop=True)
        )
    else:
        log = InteractionLog(frame=frame, rejected=log.rejected, source=log.source)
    logger.info("%s: %s", path, log.summary())
    return log


def read_interactions(
    source: Union[PathLike, sa.engine.Engine],
    *,
    format: str = "canonical",
    on_invalid: OnInvalid = "raise",
    **options: Any,
) -> InteractionLog:
    """Read interactions from any supported source.

    Args:
        source: A file path, or for `canonical` also a SQLAlchemy URL/engine (then pass `table=` or
            `query=`).
        format: One of `FORMATS`.
        on_invalid: `"raise"` or `"quarantine"`.
        **options: Passed to the format's reader (`read_canonical`, `read_sql_interactions`,
            `read_pykt`, `read_dkvmn`, `read_assistments`).

    Returns:
        The validated interactions and rejected rows.

    Raises:
        ConfigError: Unknown format.
        AdapterError, InputValidationError: From the reader.
    """
    if format == "canonical":
        if isinstance(source, sa.engine.Engine) or "://" in str(source):
            return read_sql_interactions(source, on_invalid=on_invalid, **options)  # type: ignore[arg-type]
        return read_canonical(source, on_invalid=on_invalid, **options)
    if format == "pykt":
        return read_pykt(source, on_invalid=on_invalid, **options)  # type: ignore[arg-type]
    if format == "dkvmn":
        return read_dkvmn(source, on_invalid=on_invalid, **options)  # type: ignore[arg-type]
    if format == "assistments":
        return read_assistments(source, on_invalid=on_invalid, **options)  # type: ignore[arg-type]
    raise ConfigError(f"unknown interaction format {format!r}; expected one of {list(FORMATS)}.")

"""The canonical transaction rules: vectorised `validate`, `StreamValidator` for chunks, `parse_transaction`.

`validate` takes a frame with canonical column names (from `apps.finance.adapters.read_source` or built
in code), applies the rules of `apps.finance.schema` and converts the rows that pass into the typed
canonical frame; the others raise `InputValidationError` or, with `on_invalid="quarantine"`, come back
aside with a `reject_reason`. Work is vectorised: Python strings are built only for rejected rows.
`parse_transaction` applies the same rules and messages to one transaction of the real-time path.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from apps.finance.formats import to_text
from apps.finance.schema import (
    CANONICAL_COLUMNS,
    CONTEXT_COLUMNS,
    ID_COLUMNS,
    LABEL_COLUMN,
    REJECT_REASON_COLUMN,
    REQUIRED_COLUMNS,
    SOURCE_ROW,
    TEXT_DTYPE,
    TIMESTAMP_DTYPE,
    Transaction,
)
from core.errors import ConfigError, InputValidationError

logger = logging.getLogger(__name__)

ON_INVALID: tuple[str, ...] = ("raise", "quarantine")
"""Accepted values of `on_invalid`."""

REASON_SEPARATOR = " | "
"""Separator between several reasons of one row in `reject_reason`."""

_EXPECT_TIME = "expected ISO-8601 text (2024-01-31T13:45:00Z) or epoch seconds"
_RULES = {
    "missing_id": "missing value; expected a non-empty id",
    "missing_time": f"missing value; {_EXPECT_TIME}",
    "bad_time": f"cannot parse {{value}} as a time; {_EXPECT_TIME}",
    "missing_amount": "missing value; expected a number >= 0",
    "bad_amount": "cannot parse {value} as a number; expected a plain decimal number >= 0",
    "infinite_amount": "non-finite value {value}; expected a finite number >= 0",
    "negative_amount": "negative value {value}; expected a number >= 0 (flag refunds in a column of their own)",
    "missing_label": "missing value; expected 0 or 1 (drop the column for unlabelled data)",
    "bad_label": "value {value}; expected 0 or 1",
}
_EPOCH_TEXT = r"[+-]?\d+(\.\d*)?"


# ---------------------------------------------------------------------------------------------------------
# Parsing of raw values (vectorised; NaN/NaT where missing or unparseable, judged by the rules below)
# ---------------------------------------------------------------------------------------------------------


def _parse_timestamps(values: pd.Series) -> pd.Series:
    """Timestamps as UTC: ISO-8601 text (naive taken as UTC), epoch seconds (numbers or digits), datetimes."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC").dt.as_unit("us")
    if pd.api.types.is_datetime64_dtype(values.dtype):
        return values.dt.tz_localize("UTC").dt.as_unit("us")
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return pd.to_datetime(values, unit="s", utc=True, errors="coerce").dt.as_unit("us")
    if pd.api.types.infer_dtype(values, skipna=True) in ("datetime", "datetime64", "date"):
        return pd.to_datetime(values, utc=True, errors="coerce").dt.as_unit("us")
    text = to_text(values)
    is_epoch = text.str.fullmatch(_EPOCH_TEXT).fillna(False).astype(bool)
    parsed = pd.to_datetime(text.where(~is_epoch), format="ISO8601", utc=True, errors="coerce")
    parsed = parsed.astype(TIMESTAMP_DTYPE)
    if is_epoch.any():
        seconds = pd.to_numeric(text[is_epoch], errors="coerce")
        parsed[is_epoch] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce").astype(
            TIMESTAMP_DTYPE
        )
    return parsed


def _parse_numbers(values: pd.Series) -> pd.Series:
    """Numbers as float64; booleans are not accepted as numbers."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return pd.Series(np.nan, index=values.index)
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.astype("float64")
    return pd.to_numeric(to_text(values), errors="coerce").astype("float64")


def _is_absent(values: pd.Series) -> np.ndarray:
    absent = values.isna().to_numpy(dtype=bool)
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        absent = absent | (values.astype(TEXT_DTYPE).str.strip() == "").to_numpy(dtype=bool, na_value=False)
    return absent


def _micros(times: pd.Series) -> np.ndarray:
    """Microseconds since the epoch of a `TIMESTAMP_DTYPE` column (int64; NaT -> minimum int64)."""
    return times.dt.tz_localize(None).to_numpy().view("int64")


def _timestamp_text(micros: float) -> str:
    return pd.Timestamp(int(micros), unit="us", tz="UTC").isoformat()


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """How a rejected value is quoted: repr of the plain Python value (`'-3.5'` for text, `-3.5` for a number)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _reason(rule: str, value: Any = None) -> str:
    return _RULES[rule].format(value=_show(value))


class _Reasons:
    """Per-row rejection reasons, built only for the failing rows (no Python object per valid row)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.text = np.full(len(frame), "", dtype=object)
        self.counts: dict[str, int] = {}
        origins: Mapping[str, str] = frame.attrs.get("origins", {})
        self.label = {
            c: f"column {c!r}" + (f" (from {origins[c]})" if c in origins else "") for c in CANONICAL_COLUMNS
        }

    def add(self, mask: np.ndarray | pd.Series, column: str, why: str | Callable[[Any, int], str]) -> None:
        """Record a reason for every row where `mask` is True.

        `why` is a key of `_RULES`, or `why(raw_value, row_position) -> str` for reasons that quote more.
        """
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        positions = np.flatnonzero(mask)
        raw = self.frame[column].to_numpy()[positions]
        explain = (lambda v, _: _reason(why, v)) if isinstance(why, str) else why
        new = np.array(
            [f"{self.label[column]}: {explain(v, p)}" for v, p in zip(raw, positions, strict=True)],
            dtype=object,
        )
        old = self.text[positions]
        self.text[positions] = np.where(old == "", new, old + REASON_SEPARATOR + new)
        self.counts[column] = self.counts.get(column, 0) + len(positions)

    @property
    def bad(self) -> np.ndarray:
        return self.text != ""


def validate(
    df: pd.DataFrame,
    on_invalid: str = "raise",
    *,
    seen_ids: Collection[str] | None = None,
    last_timestamps: pd.Series | None = None,
    require_time_order: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check transactions against the canonical rules and convert them to the typed canonical frame.

    Rules, each naming column, row and value: a required column is missing (always raised, the whole
    source is unusable); `transaction_id`, `account_id` or `merchant_id` missing; `timestamp` missing or
    unparseable (ISO-8601 text, naive taken as UTC; numbers and digit-only text are epoch seconds;
    datetime columns); `amount` missing, unparseable, not finite or negative; `is_fraud` (when the
    column exists) missing or not 0/1 (booleans count as 0/1); `transaction_id` repeated within the input (the first occurrence is
    kept) or found in `seen_ids`; with `require_time_order`, a timestamp earlier than a previous valid
    transaction of the same account (in source order, or than `last_timestamps`), because a score may
    only use the account's past.

    Args:
        df: Frame with canonical column names (from `read_source`, or built in code); its index is quoted
            as the row number (`read_source` makes it the 1-based source row).
        on_invalid: `"raise"` raises on the first invalid row; `"quarantine"` returns invalid rows aside
            and logs a warning with counts per column.
        seen_ids: Transaction ids accepted earlier in the same stream (see `StreamValidator`).
        last_timestamps: Latest accepted timestamp per account from earlier chunks (index: account_id).
        require_time_order: Reject rows that go back in time within an account (default True). Pass False
            for a source in arbitrary order that the caller sorts itself (`sort_transactions`).

    Returns:
        `(valid, rejected)`. `valid`: the canonical columns with `schema.CANONICAL_DTYPES` (context
        columns added as missing when absent, `is_fraud` only when present), then the extra columns
        unchanged. `rejected`: the invalid rows as given plus `reject_reason`. Both keep the input index;
        together they hold every input row exactly once.

    Raises:
        InputValidationError: A required column is missing, or (with `on_invalid="raise"`) a row breaks a
            rule; the message names source, row, transaction id, column, value and what was expected.
        ConfigError: `on_invalid` is not one of `ON_INVALID`.
    """
    _check_on_invalid(on_invalid)
    source = str(df.attrs.get("source", "input"))
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputValidationError(
            f"{source}: missing required column(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
            f"(optional {[*CONTEXT_COLUMNS, LABEL_COLUMN]}); found {[str(c) for c in df.columns]}"
        )
    reasons = _Reasons(df)
    out: dict[str, pd.Series] = {}
    for column in ID_COLUMNS:
        out[column] = to_text(df[column])
        reasons.add(out[column].isna(), column, "missing_id")

    out["timestamp"] = _parse_timestamps(df["timestamp"])
    absent = _is_absent(df["timestamp"])
    reasons.add(absent, "timestamp", "missing_time")
    reasons.add(out["timestamp"].isna() & ~absent, "timestamp", "bad_time")

    amount = out["amount"] = _parse_numbers(df["amount"])
    absent = _is_absent(df["amount"])
    reasons.add(absent, "amount", "missing_amount")
    reasons.add(amount.isna() & ~absent, "amount", "bad_amount")
    reasons.add(np.isinf(amount), "amount", "infinite_amount")
    reasons.add(amount < 0, "amount", "negative_amount")

    for column in CONTEXT_COLUMNS:
        out[column] = (
            to_text(df[column]) if column in df else pd.Series(np.nan, index=df.index, dtype=TEXT_DTYPE)
        )
    if LABEL_COLUMN in df:
        raw_label = df[LABEL_COLUMN]
        label = _parse_numbers(
            raw_label.astype("int8") if pd.api.types.is_bool_dtype(raw_label.dtype) else raw_label
        )
        is_binary = label.isin([0.0, 1.0]).to_numpy()
        absent = _is_absent(df[LABEL_COLUMN])
        reasons.add(absent, LABEL_COLUMN, "missing_label")
        reasons.add(~is_binary & ~absent, LABEL_COLUMN, "bad_label")
        out[LABEL_COLUMN] = label.where(is_binary, 0).astype("int8")

    _check_unique_ids(out["transaction_id"], reasons, seen_ids)
    if require_time_order:
        _check_time_order(out["account_id"], out["timestamp"], reasons, last_timestamps)

    bad = reasons.bad
    if bad.any() and on_invalid == "raise":
        raise InputValidationError(_first_error(df, out["transaction_id"], reasons.text, source))
    canonical = pd.DataFrame({c: out[c] for c in CANONICAL_COLUMNS if c in out}, index=df.index)
    extras = df[[c for c in df.columns if c not in CANONICAL_COLUMNS]]
    valid = pd.concat([canonical, extras], axis=1)[~bad]
    rejected = df[bad].assign(**{REJECT_REASON_COLUMN: reasons.text[bad].astype(str)})
    valid.index.name = rejected.index.name = SOURCE_ROW
    valid.attrs, rejected.attrs = {"source": source}, {"source": source}
    if bad.any():
        logger.warning(
            "%s: quarantined %d of %d rows (%s)",
            source,
            int(bad.sum()),
            len(df),
            ", ".join(f"{column}: {count}" for column, count in reasons.counts.items()),
        )
    return valid, rejected


def _check_on_invalid(on_invalid: str) -> None:
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"on_invalid must be one of {list(ON_INVALID)}; got {on_invalid!r}")


def _check_unique_ids(ids: pd.Series, reasons: _Reasons, seen_ids: Collection[str] | None) -> None:
    present = ids.notna().to_numpy()
    repeated = ids.duplicated(keep="first").to_numpy() & present
    if repeated.any():
        first = ids[present & ~repeated]
        first_row = ids.map(pd.Series(first.index, index=first.to_numpy())).to_numpy()
        reasons.add(
            repeated,
            "transaction_id",
            lambda v, p: f"duplicate value {_show(v)} (first at row {first_row[p]}); expected unique ids",
        )
    if seen_ids:
        earlier = np.fromiter((i in seen_ids for i in ids.to_numpy()), dtype=bool, count=len(ids))
        reasons.add(
            earlier & present & ~repeated,
            "transaction_id",
            lambda v, _: f"value {_show(v)} was already seen earlier in the stream; expected unique ids",
        )


def _check_time_order(
    accounts: pd.Series, times: pd.Series, reasons: _Reasons, last_timestamps: pd.Series | None
) -> None:
    ok = ~reasons.bad
    account = accounts[ok].to_numpy()
    micros = pd.Series(_micros(times[ok]))
    previous = (
        micros.groupby(account).cummax().groupby(account).shift(1).to_numpy(dtype="float64", na_value=-np.inf)
    )
    if last_timestamps is not None and len(last_timestamps):
        carried = pd.Series(_micros(last_timestamps.astype(TIMESTAMP_DTYPE)), index=last_timestamps.index)
        earlier = pd.Series(account).map(carried).to_numpy(dtype="float64", na_value=-np.inf)
        previous = np.fmax(previous, earlier)
    back = micros.to_numpy() < previous
    if not back.any():
        return
    mask = np.zeros(len(accounts), dtype=bool)
    mask[np.flatnonzero(ok)[back]] = True
    previous_at = np.full(len(accounts), -np.inf)
    previous_at[np.flatnonzero(ok)] = previous
    reasons.add(
        mask,
        "timestamp",
        lambda v, p: (
            f"{_show(v)} is earlier than a previous transaction of account {accounts.iloc[p]!r} "
            f"({_timestamp_text(previous_at[p])}); expected non-decreasing times per account "
            "(sort the source by timestamp, or pass require_time_order=False)"
        ),
    )


def _first_error(df: pd.DataFrame, ids: pd.Series, text: np.ndarray, source: str) -> str:
    positions = np.flatnonzero(text != "")
    first = positions[0]
    transaction_id = ids.iloc[first]
    id_part = f" (transaction_id {transaction_id!r})" if isinstance(transaction_id, str) else ""
    rows = ", ".join(str(r) for r in df.index[positions[:5]]) + (", ..." if len(positions) > 5 else "")
    return (
        f"{source}: row {df.index[first]}{id_part}: {text[first]}. "
        f"{len(positions)} of {len(df)} rows are invalid (rows {rows}). "
        "Fix the source, or pass on_invalid='quarantine' to set invalid rows aside with a reason."
    )


class StreamValidator:
    """Validates the consecutive chunks of one stream, carrying the cross-chunk rules between them.

    It remembers every accepted `transaction_id` (about 100 bytes each: 10 million ids take ~1 GB) and
    the latest accepted timestamp of each account, so a duplicate id or a step back in time is caught
    across chunk boundaries as well as within a chunk.

    Args:
        on_invalid: As for `validate`.
        require_time_order: As for `validate`.
        seen_ids: Ids accepted before this stream started (e.g. by an interrupted run being resumed).

    Example:
        >>> checker = StreamValidator(on_invalid="quarantine")
        >>> for chunk in read_source("tx.csv.gz", chunksize=100_000):  # doctest: +SKIP
        ...     valid, rejected = checker.validate(chunk)
    """

    def __init__(
        self, on_invalid: str = "raise", *, require_time_order: bool = True, seen_ids: Iterable[str] = ()
    ) -> None:
        _check_on_invalid(on_invalid)
        self.on_invalid = on_invalid
        self.require_time_order = require_time_order
        self.seen_ids: set[str] = set(seen_ids)
        self.last_timestamps = pd.Series(dtype=TIMESTAMP_DTYPE)
        self.rows_valid = 0
        self.rows_rejected = 0

    def validate(self, chunk: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Validate the next chunk (see `validate`), then remember its accepted ids and latest times.

        Args:
            chunk: The next frame of the stream, in stream order.

        Returns:
            `(valid, rejected)` as from `validate`.

        Raises:
            InputValidationError: As from `validate`, including ids and times that clash with earlier chunks.
        """
        valid, rejected = validate(
            chunk,
            self.on_invalid,
            seen_ids=self.seen_ids,
            last_timestamps=self.last_timestamps,
            require_time_order=self.require_time_order,
        )
        self.seen_ids.update(valid["transaction_id"].to_numpy())
        if len(valid):
            latest = valid.groupby("account_id")["timestamp"].max()
            merged = pd.concat([self.last_timestamps, latest]) if len(self.last_timestamps) else latest
            self.last_timestamps = merged.groupby(level=0).max()
        self.rows_valid += len(valid)
        self.rows_rejected += len(rejected)
        return valid, rejected


def sort_transactions(df: pd.DataFrame) -> pd.DataFrame:
    """Return canonical transactions ordered by account, then time (ties keep source order).

    Args:
        df: A validated canonical frame.

    Returns:
        The same rows reordered; each keeps its index (source row number).
    """
    return df.sort_values(["account_id", "timestamp"], kind="stable")


def parse_transaction(record: Mapping[str, Any]) -> Transaction:
    """Validate one transaction of the real-time path: the rules and messages of `validate`, without pandas.

    The cross-row rules (unique id, time order) belong to the caller's per-account state.

    Args:
        record: Canonical field names to values (`timestamp` as ISO-8601 text, epoch seconds or a
            datetime); keys that are not canonical become `extras`.

    Returns:
        The validated `Transaction` (timestamp in UTC, microsecond resolution).

    Raises:
        InputValidationError: A required field is missing or fields break rules; the message names each
            field, its value and what was expected.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
        raise InputValidationError(
            f"transaction: missing required field(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
            f"(optional {[*CONTEXT_COLUMNS, LABEL_COLUMN]}); found {sorted(map(str, record))}"
        )
    problems: list[str] = []

    def fail(column: str, rule: str, value: Any = None) -> None:
        problems.append(f"column {column!r}: {_reason(rule, value)}")

    ids = {column: _scalar_text(record[column]) for column in ID_COLUMNS}
    for column, value in ids.items():
        if value is None:
            fail(column, "missing_id")
    raw = record["timestamp"]
    timestamp = None if _scalar_absent(raw) else _scalar_timestamp(raw)
    if _scalar_absent(raw):
        fail("timestamp", "missing_time")
    elif timestamp is None:
        fail("timestamp", "bad_time", raw)
    raw = record["amount"]
    amount = _scalar_number(raw)
    if _scalar_absent(raw):
        fail("amount", "missing_amount")
    elif amount is None or math.isnan(amount):
        fail("amount", "bad_amount", raw)
    elif math.isinf(amount):
        fail("amount", "infinite_amount", raw)
    elif amount < 0:
        fail("amount", "negative_amount", raw)
    label = None
    if LABEL_COLUMN in record:
        raw = record[LABEL_COLUMN]
        number = float(raw) if isinstance(raw, bool | np.bool_) else _scalar_number(raw)
        if _scalar_absent(raw):
            fail(LABEL_COLUMN, "missing_label")
        elif number not in (0.0, 1.0):
            fail(LABEL_COLUMN, "bad_label", raw)
        else:
            label = int(number)
    if problems:
        name = f" {ids['transaction_id']!r}" if ids["transaction_id"] else ""
        raise InputValidationError(f"transaction{name}: {REASON_SEPARATOR.join(problems)}")
    assert timestamp is not None and amount is not None  # every failure above was reported
    return Transaction(
        transaction_id=str(ids["transaction_id"]),
        account_id=str(ids["account_id"]),
        timestamp=timestamp,
        amount=amount,
        merchant_id=str(ids["merchant_id"]),
        merchant_category=_scalar_text(record.get("merchant_category")),
        channel=_scalar_text(record.get("channel")),
        country=_scalar_text(record.get("country")),
        is_fraud=label,
        extras={k: v for k, v in record.items() if k not in CANONICAL_COLUMNS},
    )


def _scalar_absent(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _scalar_text(value: Any) -> str | None:
    if _scalar_absent(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _scalar_number(value: Any) -> float | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | float | np.number):
        return float(value)
    if isinstance(value, str) and "_" not in value:
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _scalar_timestamp(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return (
            value.replace(tzinfo=dt.timezone.utc)
            if value.tzinfo is None
            else value.astimezone(dt.timezone.utc)
        )
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    if isinstance(value, str) and not re.fullmatch(_EPOCH_TEXT, value.strip()):
        text = value.strip()
        try:
            parsed = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
        except ValueError:
            return None
        return _scalar_timestamp(parsed)
    seconds = _scalar_number(value)
    if seconds is None or not math.isfinite(seconds):
        return None
    try:
        return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None

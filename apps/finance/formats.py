"""Format presets: how a source's own columns become canonical transaction columns (values still raw).

A preset renames or combines source columns into the canonical names of `apps.finance.schema`; it does
not judge values, so that `apps.finance.adapters.validate` reports every bad value with its source row.

- `canonical`: the canonical column names; a column mapping (canonical name -> source column, as a dict
  or a JSON file such as `{"account_id": "card_no", "timestamp": "ts", "amount": "amt"}`) renames any
  other schema. Canonical names that are not mapped are looked up as they are.
- `tabformer`: IBM TabFormer card transactions (`User, Card, Year, Month, Day, Time, Amount, Use Chip,
  Merchant Name, Merchant City, Merchant State, Zip, MCC, Errors?, Is Fraud?`).
  - `account_id = "User-Card"`; `transaction_id = "User-Card-ROW"` with ROW the 1-based data row, so ids
    are deterministic and do not depend on the chunk size.
  - `timestamp` from `Year-Month-Day` and `HH:MM`, taken as UTC (TabFormer gives no time zone).
  - `channel` from `Use Chip`: `swipe`, `chip`, `online`.
  - `merchant_id = Merchant Name` (a 64-bit hash, kept as text); `merchant_category = MCC`.
  - `country`: `"US"` for a US state or DC abbreviation (or a Zip without a state), the given value
    otherwise (TabFormer names foreign countries, e.g. `Mexico`), missing for online rows.
  - `is_fraud` from `Is Fraud?` (`Yes` -> 1, `No` -> 0).
  - **Refunds**: TabFormer signs refunds and reversals (`$-473.00`; 3% of rows, some labelled fraud).
    The preset keeps them as transactions with `amount = |value|` and a boolean extra column
    `is_refund`, so the canonical rule `amount >= 0` holds and the sign is not lost.
  - `Merchant City`, `Merchant State`, `Zip` and `Errors?` pass through as extras.
- `handbook`: the Fraud Detection Handbook simulator (`TRANSACTION_ID, TX_DATETIME, CUSTOMER_ID,
  TERMINAL_ID, TX_AMOUNT, TX_FRAUD`); `CUSTOMER_ID` is the account, `TERMINAL_ID` the merchant,
  `TX_FRAUD` optional. `TX_FRAUD_SCENARIO` is dropped (it is derived from the label, a leak), and so are
  `TX_TIME_SECONDS` / `TX_TIME_DAYS` (they restate `TX_DATETIME` relative to the simulation start).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apps.finance.schema import (
    CANONICAL_COLUMNS,
    CONTEXT_COLUMNS,
    ID_COLUMNS,
    LABEL_COLUMN,
    REQUIRED_COLUMNS,
    SOURCE_ROW,
    TEXT_DTYPE,
)
from core.errors import AdapterError, ConfigError, InputValidationError

FORMATS: tuple[str, ...] = ("canonical", "tabformer", "handbook")
"""Names of the format presets."""

REFUND_COLUMN = "is_refund"
"""Extra column added by the `tabformer` preset: True where the source amount was negative."""

_US_STATE_CODES = (
    "AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC ND "
    "OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC"
)
_US_STATES = _US_STATE_CODES.split()


@dataclass(frozen=True)
class Preset:
    """How one source format maps to canonical columns.

    Attributes:
        name: Format name (one of `FORMATS`).
        required: Source columns that must be present.
        text_columns: Source columns to read as text (ids, codes).
        convert: Raw source frame -> frame with canonical names (values untouched where possible) and
            the extra columns.
        origins: Canonical column -> the source column(s) it comes from, quoted in error messages.
    """

    name: str
    required: tuple[str, ...]
    text_columns: tuple[str, ...]
    convert: Callable[[pd.DataFrame], pd.DataFrame]
    origins: Mapping[str, str] = field(default_factory=dict)

    def apply(self, raw: pd.DataFrame) -> pd.DataFrame:
        """Convert one raw frame (from `apps.finance.sources.iter_raw`) to canonical column names.

        Args:
            raw: Source columns as stored, indexed by source row.

        Returns:
            Canonical columns (those the source provides) then the extras; same index; `attrs` keeps
            `source` and gains `origins`.

        Raises:
            InputValidationError: A required column is missing; the message lists found and expected columns.
        """
        missing = [c for c in self.required if c not in raw.columns]
        if missing:
            hint = (
                'map your names with a column mapping JSON ({"amount": "<your column>"}) or pick the matching format'
                if self.name == "canonical"
                else "check that the source really is in this format"
            )
            raise InputValidationError(
                f"{raw.attrs.get('source', 'input')}: missing required column(s) {missing} for format "
                f"{self.name!r}; expected {list(self.required)}; found {[str(c) for c in raw.columns]}; {hint}"
            )
        attrs = dict(raw.attrs)
        frame = self.convert(raw)
        frame.index.name = SOURCE_ROW
        frame.attrs = {**attrs, "origins": dict(self.origins)}
        return frame


def to_text(values: pd.Series) -> pd.Series:
    """Text form of a column (`TEXT_DTYPE`): integral floats lose their `.0`, blank text becomes missing.

    Args:
        values: Any column.

    Returns:
        The column as text, missing where the input is missing or blank.
    """
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if bool(np.isfinite(finite).all()) and bool((finite == np.floor(finite)).all()):
            values = values.astype("Int64")  # ids read as floats because of a gap: 596.0 -> "596"
    text = values.astype(TEXT_DTYPE)
    if pd.api.types.is_numeric_dtype(values.dtype):
        return text
    text = text.str.strip()
    return text.where(text != "")


def load_column_mapping(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a column mapping JSON file: an object from canonical name to the source's column name.

    Args:
        path: e.g. `mapping.json` holding `{"account_id": "card_no", "timestamp": "ts", "amount": "amt"}`.

    Returns:
        The checked mapping.

    Raises:
        AdapterError: The file cannot be read.
        ConfigError: It is not valid JSON, not an object of strings, or names a non-canonical column.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise AdapterError(f"cannot read column mapping {path}: {e}") from e
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f'column mapping {path} is not valid JSON ({e}); expected an object such as {{"amount": "amt"}}'
        ) from e
    return check_column_mapping(mapping, where=str(path))


def check_column_mapping(mapping: Any, where: str = "columns") -> dict[str, str]:
    """Check a column mapping: canonical names as keys, distinct non-empty source column names as values.

    Args:
        mapping: The candidate mapping.
        where: Where it came from, for messages.

    Returns:
        The mapping as a plain dict.

    Raises:
        ConfigError: Wrong shape, a key that is not a canonical column, or a source column used twice.
    """
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()
    ):
        raise ConfigError(
            f"column mapping {where} must map canonical names to source column names (non-empty strings); "
            f"got {mapping!r}"
        )
    unknown = sorted(set(mapping) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ConfigError(
            f"column mapping {where}: unknown canonical column(s) {unknown}; expected keys among {list(CANONICAL_COLUMNS)}"
        )
    targets = list(mapping.values())
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise ConfigError(
            f"column mapping {where}: source column(s) {repeated} mapped more than once; map each to one canonical name"
        )
    return dict(mapping)


def canonical_preset(mapping: Mapping[str, str] | None = None) -> Preset:
    """The `canonical` preset, optionally renaming source columns through a column mapping.

    Args:
        mapping: Canonical name -> source column name (checked with `check_column_mapping`).

    Returns:
        The preset.
    """
    mapping = check_column_mapping(mapping or {})
    rename = {source: canonical for canonical, source in mapping.items()}

    def convert(raw: pd.DataFrame) -> pd.DataFrame:
        # A source column already named like a canonical column that the mapping fills from elsewhere
        # would give two columns of one name.
        shadowed = [c for c in raw.columns if c in mapping and mapping[c] != c and c not in rename]
        if shadowed:
            raise InputValidationError(
                f"{raw.attrs.get('source', 'input')}: column(s) {shadowed} exist in the source but the column "
                f"mapping fills them from {[mapping[c] for c in shadowed]}; rename or drop the source column(s)"
            )
        return raw.rename(columns=rename)

    return Preset(
        name="canonical",
        required=tuple(mapping.get(c, c) for c in REQUIRED_COLUMNS),
        text_columns=tuple(mapping.get(c, c) for c in (*ID_COLUMNS, *CONTEXT_COLUMNS)),
        convert=convert,
        origins={c: s for c, s in mapping.items() if s != c},
    )


def _tabformer(raw: pd.DataFrame) -> pd.DataFrame:
    account = to_text(raw["User"]) + "-" + to_text(raw["Card"])
    amount = to_text(raw["Amount"]).str.replace("$", "", regex=False)
    is_refund = amount.str.startswith("-").fillna(False).astype(bool)
    row = pd.Series(raw.index.astype(str), index=raw.index)
    out = pd.DataFrame(
        {
            "transaction_id": account + "-" + row,
            "account_id": account,
            "timestamp": (
                to_text(raw["Year"])
                + "-"
                + to_text(raw["Month"]).str.zfill(2)
                + "-"
                + to_text(raw["Day"]).str.zfill(2)
                + "T"
                + to_text(raw["Time"]).str.zfill(5)
            ),
            "amount": amount.str.removeprefix("-"),
            "merchant_id": raw["Merchant Name"],
        },
        index=raw.index,
    )
    if "MCC" in raw:
        out["merchant_category"] = raw["MCC"]
    if "Use Chip" in raw:
        out["channel"] = to_text(raw["Use Chip"]).str.lower().str.removesuffix(" transaction")
    if "Merchant State" in raw:
        state = to_text(raw["Merchant State"])
        country = state.mask(state.isin(_US_STATES), "US")
        if "Zip" in raw:
            country = country.mask(state.isna() & raw["Zip"].notna(), "US")
        out["country"] = country
    if "Is Fraud?" in raw:
        out[LABEL_COLUMN] = to_text(raw["Is Fraud?"]).replace({"Yes": "1", "No": "0"})
    consumed = {
        "User",
        "Card",
        "Year",
        "Month",
        "Day",
        "Time",
        "Amount",
        "Use Chip",
        "Merchant Name",
        "MCC",
        "Is Fraud?",
    }
    extras = raw[[c for c in raw.columns if c not in consumed]]
    return pd.concat([out, extras], axis=1).assign(**{REFUND_COLUMN: is_refund})


_HANDBOOK_NAMES = {
    "TRANSACTION_ID": "transaction_id",
    "TX_DATETIME": "timestamp",
    "CUSTOMER_ID": "account_id",
    "TERMINAL_ID": "merchant_id",
    "TX_AMOUNT": "amount",
    "TX_FRAUD": LABEL_COLUMN,
}


def _handbook(raw: pd.DataFrame) -> pd.DataFrame:
    dropped = [c for c in ("TX_FRAUD_SCENARIO", "TX_TIME_SECONDS", "TX_TIME_DAYS") if c in raw]
    return raw.drop(columns=dropped).rename(columns=_HANDBOOK_NAMES)


_TABFORMER_REQUIRED = ("User", "Card", "Year", "Month", "Day", "Time", "Amount", "Merchant Name")
TABFORMER = Preset(
    name="tabformer",
    required=_TABFORMER_REQUIRED,
    text_columns=(*_TABFORMER_REQUIRED, "MCC", "Use Chip", "Merchant State", "Is Fraud?"),
    convert=_tabformer,
    origins={
        "transaction_id": "User, Card and the row number",
        "account_id": "User, Card",
        "timestamp": "Year, Month, Day, Time",
        "amount": "Amount",
        "merchant_id": "Merchant Name",
        "merchant_category": "MCC",
        "channel": "Use Chip",
        "country": "Merchant State, Zip",
        LABEL_COLUMN: "Is Fraud?",
    },
)
"""The IBM TabFormer preset."""

HANDBOOK = Preset(
    name="handbook",
    required=("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT"),
    text_columns=("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID"),
    convert=_handbook,
    origins={canonical: source for source, canonical in _HANDBOOK_NAMES.items()},
)
"""The Fraud Detection Handbook simulator preset."""


def resolve_preset(format: str, columns: Mapping[str, str] | str | os.PathLike[str] | None = None) -> Preset:
    """Pick the preset for a format name and an optional column mapping.

    Args:
        format: One of `FORMATS`.
        columns: For `"canonical"` only: a mapping canonical name -> source column, or a JSON file path.

    Returns:
        The preset.

    Raises:
        ConfigError: Unknown format, a mapping with a non-canonical format, or a bad mapping.
        AdapterError: The mapping file cannot be read.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; expected one of {list(FORMATS)}")
    if columns is not None and format != "canonical":
        raise ConfigError(
            f"a column mapping applies to format 'canonical' only; got format {format!r} with columns={columns!r}"
        )
    if format == "tabformer":
        return TABFORMER
    if format == "handbook":
        return HANDBOOK
    if columns is None or isinstance(columns, Mapping):
        return canonical_preset(columns)
    return canonical_preset(load_column_mapping(columns))

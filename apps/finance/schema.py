"""The canonical finance transaction: column names, dtypes and units, and a one-transaction record.

Bulk data (training sets, batch scoring) travels as a pandas DataFrame in *canonical form*, one row per
transaction; only the real-time path builds a `Transaction` object per transaction.

Canonical form (what `apps.finance.adapters.validate` returns):

| column | dtype | meaning |
|---|---|---|
| `transaction_id` | `TEXT_DTYPE` | unique id of the transaction; never missing, never repeated |
| `account_id` | `TEXT_DTYPE` | card or customer account: **the sequence key**; never missing |
| `timestamp` | `datetime64[us, UTC]` | when the transaction happened; ISO-8601 text (with or without a UTC offset) or epoch seconds in the source; text without an offset is taken as UTC |
| `amount` | `float64` | transaction value in major currency units of the source (dollars, euros; no conversion); finite and >= 0 |
| `merchant_id` | `TEXT_DTYPE` | merchant or terminal id; never missing |
| `merchant_category` | `TEXT_DTYPE` | merchant category, usually an ISO 18245 MCC such as `"5411"`; may be missing |
| `channel` | `TEXT_DTYPE` | how the card was used, preferably one of `CHANNELS`; may be missing |
| `country` | `TEXT_DTYPE` | where the transaction took place (merchant country), preferably ISO 3166-1 alpha-2 (`"US"`); may be missing |
| `is_fraud` | `int8` | label: 1 = fraud, 0 = genuine; present only when the source is labelled |

- Text columns use `TEXT_DTYPE`, pandas' string dtype whose missing value is NaN (the default string dtype
  of pandas >= 3), so comparisons on missing values give False instead of `pd.NA`.
- The three context columns are always present after validation; a source without them gets them
  filled with missing values (the encoder maps missing to an "unknown" token).
- Extra source columns are kept unchanged after the canonical ones (pass-through).
- The frame index is the 1-based data row number in the source (header excluded), named
  `SOURCE_ROW`, so every error and every quarantined row points back to the source.
- Row order is the source order. A score for a transaction may use only the same account's earlier
  transactions, so within one account timestamps must not go backwards (validated by default).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = ("transaction_id", "account_id", "timestamp", "amount", "merchant_id")
"""Columns every source must provide."""

CONTEXT_COLUMNS: tuple[str, ...] = ("merchant_category", "channel", "country")
"""Optional descriptive columns; filled with missing values when the source lacks them."""

LABEL_COLUMN = "is_fraud"
"""Optional label column (0/1)."""

CANONICAL_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, *CONTEXT_COLUMNS, LABEL_COLUMN)
"""Every canonical column, in canonical order."""

ID_COLUMNS: tuple[str, ...] = ("transaction_id", "account_id", "merchant_id")
"""Identifier columns: text, stripped of surrounding blanks, never missing."""

TEXT_DTYPE = pd.StringDtype(na_value=np.nan)
"""dtype of every text column: the string dtype with NaN as its missing value."""

TIMESTAMP_DTYPE = pd.DatetimeTZDtype(unit="us", tz="UTC")
"""dtype of `timestamp`: timezone-aware UTC with microsecond resolution."""

CANONICAL_DTYPES: dict[str, Any] = {
    "transaction_id": TEXT_DTYPE,
    "account_id": TEXT_DTYPE,
    "timestamp": TIMESTAMP_DTYPE,
    "amount": np.dtype("float64"),
    "merchant_id": TEXT_DTYPE,
    "merchant_category": TEXT_DTYPE,
    "channel": TEXT_DTYPE,
    "country": TEXT_DTYPE,
    LABEL_COLUMN: np.dtype("int8"),
}
"""dtype of each canonical column after validation."""

SOURCE_ROW = "source_row"
"""Name of the index: the 1-based data row number in the source (header excluded)."""

REJECT_REASON_COLUMN = "reject_reason"
"""Column added to quarantined rows: why each row was rejected ("; "-joined when several)."""

SCENARIO_COLUMN = "scenario"
"""Column of synthetic data naming the episode that generated each row; NEVER a model feature."""

NON_FEATURE_COLUMNS: tuple[str, ...] = (LABEL_COLUMN, SCENARIO_COLUMN, REJECT_REASON_COLUMN)
"""Columns that carry the label or are derived from it; encoders must never read them as inputs."""

CHANNELS: tuple[str, ...] = ("chip", "contactless", "swipe", "online")
"""Preferred channel vocabulary (other values are accepted and kept)."""


@dataclass(frozen=True, slots=True)
class Transaction:
    """One validated transaction, for the real-time path (bulk data stays in DataFrames).

    Build it with `apps.finance.adapters.parse_transaction`, which applies the same rules as
    `validate`; the fields mean exactly what the canonical columns of the same names mean.

    Attributes:
        transaction_id: Unique id of the transaction.
        account_id: Card or customer account, the sequence key.
        timestamp: When it happened, timezone-aware UTC.
        amount: Value in major currency units, finite and >= 0.
        merchant_id: Merchant or terminal id.
        merchant_category: Merchant category (usually an MCC), or None.
        channel: How the card was used (see `CHANNELS`), or None.
        country: Where it took place (ISO 3166-1 alpha-2 preferred), or None.
        is_fraud: Label 0/1, or None when unknown.
        extras: Any further source fields, passed through unchanged.
    """

    transaction_id: str
    account_id: str
    timestamp: dt.datetime
    amount: float
    merchant_id: str
    merchant_category: str | None = None
    channel: str | None = None
    country: str | None = None
    is_fraud: int | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the canonical fields followed by the extras, as one flat dict (a row of a frame)."""
        row: dict[str, Any] = {name: getattr(self, name) for name in CANONICAL_COLUMNS}
        if row[LABEL_COLUMN] is None:
            del row[LABEL_COLUMN]
        row.update(self.extras)
        return row

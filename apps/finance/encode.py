"""Canonical transactions -> per-account token windows for the core model, with causal, delayed-label features.

Every transaction becomes one token: four categorical ids (merchant, category, channel, country; 0 pad,
1 unknown, vocabularies built on training data), the numeric fields of `config.NUMERIC_FIELDS`
(standardised with training statistics), the time since the account's previous transaction and a domain
id (its channel, for the MoE router). Features use only what is known when the transaction happens:

- `amount_vs_account`: log-amount minus the mean log-amount of the account's *earlier* transactions (a
  geometric running mean, the robust stand-in for a running median that can be updated in O(1));
- `merchant_risk_*`: the smoothed fraud rate of the merchant over 1, 7 and 30 days and all time, counted
  ONLY over labelled transactions older than the label delay (default 7 days) at the transaction's time,
  so a label is used only once it would be known; `merchant_log_count_*` the matching volumes (the
  handbook's delayed terminal features);
- `account_log_count_*` and `amount_vs_account_*`: how many earlier transactions the account made in the
  last 1, 7 and 30 days, and the log-amount minus their mean log-amount (the handbook's customer spending
  features); the state keeps each account's last 30 days of (time, log-amount) for them.

Windows: an account's transactions are numbered i = 0, 1, ...; window w covers tokens
[w*S, w*S + K) with S = K/2. Transaction i is scored in window 0 when i < K, else in window i//S - 1,
where it sits at position >= S: so every score sees between S and K-1 earlier transactions of its
account (all of them at the start) and nothing later. The batch job, training and the real-time scorer
all use this same rule, so a transaction gets the same score whichever path scores it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from apps.finance.config import ACCOUNT_WINDOWS_DAYS, CATEGORICAL_FIELDS, DOMAINS, NUMERIC_FIELDS
from apps.finance.labels import LabelStore
from apps.finance.schema import LABEL_COLUMN, Transaction
from core.data import IGNORE_INDEX
from core.errors import InputValidationError

CATEGORICAL_COLUMNS: dict[str, str] = {
    "merchant": "merchant_id",
    "category": "merchant_category",
    "channel": "channel",
    "country": "country",
}
"""Token field -> canonical column."""

PAD_ID = 0
UNKNOWN_ID = 1
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US = 1_000_000
_DAY = 86_400
_PERIODIC = {"hour_sin", "hour_cos", "weekday_sin", "weekday_cos"}
_WINDOW_SECONDS = np.array([int(days * _DAY) for days in ACCOUNT_WINDOWS_DAYS], np.int64)
_RECENT_SECONDS = int(_WINDOW_SECONDS.max())
_DOMAIN_INDEX = {name: i for i, name in enumerate(DOMAINS)}


# ---------------------------------------------------------------------- tokens
@dataclass
class Tokens:
    """Encoded transactions, one row each (N tokens).

    Attributes:
        ids: (N, 4) int64 vocabulary ids of `CATEGORICAL_FIELDS`.
        numeric: (N, F) float32 standardised numeric fields (0 where missing).
        numeric_mask: (N, F) bool, True where the numeric value is present.
        time_delta: (N,) float32 seconds since the account's previous transaction (0 for its first).
        domain: (N,) int64 domain id (channel).
        label: (N,) int64 is_fraud, or -100 when unknown.
    """

    ids: np.ndarray
    numeric: np.ndarray
    numeric_mask: np.ndarray
    time_delta: np.ndarray
    domain: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def take(self, index: Any) -> Tokens:
        return Tokens(*(getattr(self, name)[index] for name in _TOKEN_FIELDS))

    @staticmethod
    def concat(parts: Iterable[Tokens]) -> Tokens:
        parts = list(parts)
        return Tokens(*(np.concatenate([getattr(p, name) for p in parts]) for name in _TOKEN_FIELDS))

    @staticmethod
    def empty() -> Tokens:
        return Tokens(
            np.zeros((0, len(CATEGORICAL_FIELDS)), np.int64),
            np.zeros((0, len(NUMERIC_FIELDS)), np.float32),
            np.zeros((0, len(NUMERIC_FIELDS)), bool),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )

    def example(self, start: int, stop: int, with_labels: bool) -> dict[str, Any]:
        """One core example (see `core.data`) from tokens [start, stop)."""
        out: dict[str, Any] = {
            "categorical": {name: self.ids[start:stop, j] for j, name in enumerate(CATEGORICAL_FIELDS)},
            "numeric": self.numeric[start:stop],
            "numeric_mask": self.numeric_mask[start:stop],
            "time_delta": self.time_delta[start:stop],
            "domain_ids": self.domain[start:stop],
        }
        if with_labels:
            out["token_labels"] = self.label[start:stop].copy()
        return out


_TOKEN_FIELDS = ("ids", "numeric", "numeric_mask", "time_delta", "domain", "label")


# ---------------------------------------------------------------------- per-account state
@dataclass
class AccountHistory:
    """What the encoder keeps per account between chunks (and in the real-time scorer).

    Attributes:
        count: transactions seen so far (the index of the next one).
        log_amount_sum: sum of their log1p(amount).
        last_us: timestamp of the latest one (epoch microseconds), or None.
        tail: its last K-1 tokens (the context of the next windows).
        recent_seconds, recent_log: (n,) epoch seconds and log1p(amount) of its transactions of the last
            `max(ACCOUNT_WINDOWS_DAYS)` days before the latest one (the spending-window features).
    """

    count: int = 0
    log_amount_sum: float = 0.0
    last_us: int | None = None
    tail: Tokens = field(default_factory=Tokens.empty)
    recent_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    recent_log: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class EncodingState:
    """All state the encoder carries across chunks: per-account histories and the delayed-label store."""

    labels: LabelStore
    accounts: dict[str, AccountHistory] = field(default_factory=dict)


# ---------------------------------------------------------------------- encoder
@dataclass
class FeatureEncoder:
    """Vocabularies and numeric statistics learned on training data; turns frames into token windows.

    Attributes:
        vocabularies: field -> {value: id} (ids from 2; 0 pad, 1 unknown).
        numeric_mean, numeric_std: standardisation of each raw numeric field.
        fraud_rate: training fraud rate (prior of the smoothed merchant risk).
        history_window: K.
        label_delay_days: delay before a label may be used in features.
    """

    vocabularies: dict[str, dict[str, int]]
    numeric_mean: list[float]
    numeric_std: list[float]
    fraud_rate: float
    history_window: int
    label_delay_days: float

    # ------------------------------------------------------------------ fitting and storage
    @classmethod
    def fit(
        cls,
        df: pd.DataFrame,
        history_window: int,
        label_delay_days: float,
        max_vocabulary: int,
        history: pd.DataFrame | None = None,
    ) -> FeatureEncoder:
        """Build vocabularies and statistics from a labelled canonical training frame.

        `history` (earlier transactions) only gives context to the statistics (running amounts, known
        labels); vocabularies come from `df` alone.
        """
        if history_window < 4 or history_window % 2:
            raise InputValidationError(f"history_window must be an even number >= 4; got {history_window}")
        if LABEL_COLUMN not in df.columns:
            raise InputValidationError(f"training data needs the label column {LABEL_COLUMN!r}")
        vocabularies = {}
        for name, column in CATEGORICAL_COLUMNS.items():
            counts = df[column].dropna().astype(str).value_counts(sort=True)
            values = counts.index[:max_vocabulary]
            vocabularies[name] = {value: i + 2 for i, value in enumerate(sorted(values))}
        n = len(NUMERIC_FIELDS)
        encoder = cls(
            vocabularies,
            [0.0] * n,
            [1.0] * n,
            float(df[LABEL_COLUMN].mean()),
            history_window,
            label_delay_days,
        )
        state = encoder.new_state()
        if history is not None and len(history):
            encoder._raw_numeric(history, state, update=True)
        raw, present = encoder._raw_numeric(df, state, update=True)
        for j, name in enumerate(NUMERIC_FIELDS):
            if name in _PERIODIC or not present[:, j].any():
                continue
            values = raw[present[:, j], j]
            encoder.numeric_mean[j] = float(values.mean())
            # A (nearly) constant feature is only centred: dividing by a tiny spread would blow up
            # any later value that differs.
            spread = float(values.std())
            encoder.numeric_std[j] = spread if spread > 1e-3 else 1.0
        return encoder

    def to_meta(self) -> dict[str, Any]:
        return {
            "vocabularies": self.vocabularies,
            "numeric_fields": list(NUMERIC_FIELDS),
            "numeric_mean": self.numeric_mean,
            "numeric_std": self.numeric_std,
            "fraud_rate": self.fraud_rate,
            "history_window": self.history_window,
            "label_delay_days": self.label_delay_days,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> FeatureEncoder:
        if list(meta["numeric_fields"]) != list(NUMERIC_FIELDS):
            raise InputValidationError(
                f"model directory numeric fields {meta['numeric_fields']} differ from this code's {list(NUMERIC_FIELDS)}"
            )
        return cls(
            {k: dict(v) for k, v in meta["vocabularies"].items()},
            list(meta["numeric_mean"]),
            list(meta["numeric_std"]),
            float(meta["fraud_rate"]),
            int(meta["history_window"]),
            float(meta["label_delay_days"]),
        )

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {name: len(vocab) + 2 for name, vocab in self.vocabularies.items()}

    def new_state(self) -> EncodingState:
        return EncodingState(LabelStore(int(self.label_delay_days * _DAY)))

    # ------------------------------------------------------------------ features
    def _raw_numeric(
        self, df: pd.DataFrame, state: EncodingState, update: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw numeric features (N, F) and mask of a time-ordered frame, rows in frame order."""
        tokens, _ = self._featurize(df, state, update=update, standardise=False)
        return tokens.numeric.astype(np.float64), tokens.numeric_mask

    def _featurize(
        self, df: pd.DataFrame, state: EncodingState, *, update: bool = True, standardise: bool = True
    ) -> tuple[Tokens, np.ndarray]:
        """Tokens of every row (in frame order) and their account index; updates `state` when asked.

        Rows of one account must be in time order (validated frames are).
        """
        n = len(df)
        us = _micros(df["timestamp"])
        seconds = us // _US
        amount = df["amount"].to_numpy(np.float64)
        log_amount = np.log1p(amount)
        merchants = df["merchant_id"].to_numpy(dtype=object)
        if update and LABEL_COLUMN in df.columns:
            labelled = df[LABEL_COLUMN].notna().to_numpy()
            state.labels.add(
                df["transaction_id"].to_numpy(dtype=object)[labelled],
                merchants[labelled],
                seconds[labelled],
                df[LABEL_COLUMN].to_numpy()[labelled].astype(np.int64),
            )
        risk, risk_present = state.labels.risk_features(merchants, seconds, self.fraud_rate)

        # Per-account running values: earlier rows of this frame plus the carried history.
        accounts = df["account_id"].to_numpy(dtype=object)
        codes, uniques = pd.factorize(accounts)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        within = np.arange(n) - group_start
        carried_count = np.zeros(len(uniques), np.int64)
        carried_sum = np.zeros(len(uniques))
        carried_last = np.full(len(uniques), -1, np.int64)
        for k, account in enumerate(uniques):
            history = state.accounts.get(account)
            if history is not None:
                carried_count[k] = history.count
                carried_sum[k] = history.log_amount_sum
                carried_last[k] = -1 if history.last_us is None else history.last_us
        sorted_log = log_amount[order]
        cum = np.cumsum(sorted_log)
        before_in_frame = cum - sorted_log - np.where(group_start > 0, cum[group_start - 1], 0.0)
        prev_count = carried_count[sorted_codes] + within
        prev_sum = carried_sum[sorted_codes] + before_in_frame
        sorted_us = us[order]
        prev_us = np.where(within > 0, np.r_[0, sorted_us[:-1]], carried_last[sorted_codes])
        delta_sorted = np.where(prev_us >= 0, (sorted_us - prev_us) / _US, 0.0)
        vs_account = np.zeros(n)
        vs_account[order] = np.where(prev_count > 0, sorted_log - prev_sum / np.maximum(prev_count, 1), 0.0)
        carried = [state.accounts.get(account) for account in uniques]
        window_count, window_sum, recent = _account_windows(
            sorted_codes,
            seconds[order],
            sorted_log,
            [np.zeros(0, np.int64) if h is None else h.recent_seconds for h in carried],
            [np.zeros(0) if h is None else h.recent_log for h in carried],
        )
        spending = np.empty((n, 2 * len(_WINDOW_SECONDS)))
        spending[order] = _spending(sorted_log, window_count, window_sum)
        account_index = np.empty(n, np.int64)
        account_index[order] = prev_count
        time_delta = np.empty(n)
        time_delta[order] = np.maximum(delta_sorted, 0.0)

        numeric, present = self._numeric(
            log_amount, seconds, vs_account, account_index > 0, risk, risk_present, spending, standardise
        )

        ids = np.column_stack(
            [_lookup(df[column], self.vocabularies[name]) for name, column in CATEGORICAL_COLUMNS.items()]
        )
        channel = df["channel"].to_numpy(dtype=object)
        domain = np.fromiter(
            (_DOMAIN_INDEX.get(c, 0) if isinstance(c, str) else 0 for c in channel), np.int64, n
        )
        label = (
            df[LABEL_COLUMN].fillna(IGNORE_INDEX).to_numpy().astype(np.int64)
            if LABEL_COLUMN in df.columns
            else np.full(n, IGNORE_INDEX, np.int64)
        )
        tokens = Tokens(
            ids, numeric.astype(np.float32), present, time_delta.astype(np.float32), domain, label
        )
        if update:
            last_sorted = np.r_[starts[1:], n] - 1
            for k, account in enumerate(uniques):
                history = state.accounts.setdefault(account, AccountHistory())
                history.count = int(prev_count[last_sorted[k]] + 1)
                history.log_amount_sum = float(prev_sum[last_sorted[k]] + sorted_log[last_sorted[k]])
                history.last_us = int(sorted_us[last_sorted[k]])
                history.recent_seconds, history.recent_log = recent[k]
        return tokens, account_index

    def _numeric(
        self,
        log_amount: np.ndarray,
        seconds: np.ndarray,
        vs_account: np.ndarray,
        has_past: np.ndarray,
        risk: np.ndarray,
        risk_present: np.ndarray,
        spending: np.ndarray,
        standardise: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The numeric fields (N, F) and their mask, shared by the batch and the real-time paths.

        `spending` is `_spending`'s (N, 2W): log1p(window counts), then amount vs window mean (NaN: none).
        """
        second_of_day = (seconds % _DAY) / _DAY
        weekday = ((seconds // _DAY + 3) % 7) / 7.0  # 1970-01-01 was a Thursday; Monday = 0
        numeric = np.column_stack(
            [
                log_amount,
                np.sin(2 * math.pi * second_of_day),
                np.cos(2 * math.pi * second_of_day),
                np.sin(2 * math.pi * weekday),
                np.cos(2 * math.pi * weekday),
                vs_account,
                risk,
                spending,
            ]
        )
        present = np.ones_like(numeric, dtype=bool)
        present[:, 5] = has_past
        present[:, 6 : 6 + risk.shape[1]] = risk_present
        present[:, 6 + risk.shape[1] :] = ~np.isnan(spending)
        if standardise:
            numeric = (numeric - np.asarray(self.numeric_mean)) / np.asarray(self.numeric_std)
        return np.where(present, numeric, 0.0), present

    # ------------------------------------------------------------------ windows
    def encode(
        self, df: pd.DataFrame, state: EncodingState | None = None, *, with_labels: bool = False
    ) -> Windows:
        """Encode a frame into windows; each row is scored exactly once (see the module docstring).

        Args:
            df: Canonical transactions, in time order within each account (validated frames are).
            state: Carried state from earlier chunks of the same stream (updated in place); None for a
                fresh one.
            with_labels: Put `token_labels` (is_fraud at scored positions, -100 elsewhere) in the examples.

        Returns:
            `Windows`: examples plus, for each example, the frame rows it scores and their positions.
        """
        state = state if state is not None else self.new_state()
        tokens, account_index = self._featurize(df, state, update=True)
        half = self.history_window // 2
        examples, rows, positions = [], [], []
        codes, uniques = pd.factorize(df["account_id"].to_numpy(dtype=object))
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1], True])
        for k in range(len(bounds) - 1):
            frame_rows = order[bounds[k] : bounds[k + 1]]
            account = uniques[codes[frame_rows[0]]]
            tail = state.accounts[account].tail
            sequence = (
                Tokens.concat([tail, tokens.take(frame_rows)]) if len(tail) else tokens.take(frame_rows)
            )
            first = int(account_index[frame_rows[0]])
            offset = first - len(tail)  # account index of sequence[0]
            stop_index = first + len(frame_rows)
            i = first
            while i < stop_index:
                window = 0 if i < self.history_window else i // half - 1
                start = window * half
                scored_stop = min(start + self.history_window, stop_index)
                example = sequence.example(start - offset, scored_stop - offset, with_labels)
                scored = np.arange(i, scored_stop)
                if with_labels:
                    example["token_labels"][: i - start] = IGNORE_INDEX
                examples.append(example)
                rows.append(frame_rows[scored - first])
                positions.append(scored - start)
                i = scored_stop
            state.accounts[account].tail = sequence.take(
                slice(max(0, len(sequence) - self.history_window + 1), None)
            )
        return Windows(examples, rows, positions)

    def encode_one(self, tx: Transaction, state: EncodingState) -> tuple[dict[str, Any], int]:
        """Encode one validated transaction against its account's state (real-time path, no pandas).

        Same features and window rule as `encode`, so the score equals the batch score; the state is
        updated (account history, and the label store when the transaction carries a label).

        Returns:
            (example, position): the account's context window ending at this transaction, and its position.
        """
        micros = timestamp_micros(tx.timestamp)
        second = micros // _US
        merchant = np.array([tx.merchant_id], dtype=object)
        if tx.is_fraud is not None:
            state.labels.append(tx.transaction_id, tx.merchant_id, second, int(tx.is_fraud))
        risk, risk_present = state.labels.risk_features(merchant, np.array([second]), self.fraud_rate)
        history = state.accounts.get(tx.account_id)
        if history is None:
            history = state.accounts[tx.account_id] = AccountHistory()
        log_amount = np.log1p(np.array([tx.amount], dtype=np.float64))
        count = history.count
        vs_account = log_amount - history.log_amount_sum / count if count else np.zeros(1)
        recent_seconds, recent_log = history.recent_seconds, history.recent_log
        inside = recent_seconds[None, :] > second - _WINDOW_SECONDS[:, None]  # (W, n)
        spending = _spending(
            log_amount, inside.sum(1)[None, :], (inside * recent_log[None, :]).sum(1)[None, :]
        )
        numeric, present = self._numeric(
            log_amount,
            np.array([second]),
            vs_account,
            np.array([count > 0]),
            risk,
            risk_present,
            spending,
            True,
        )
        values = (tx.merchant_id, tx.merchant_category, tx.channel, tx.country)
        ids = np.array(
            [
                [
                    vocab.get(v, UNKNOWN_ID) if v is not None else UNKNOWN_ID
                    for vocab, v in zip(
                        (self.vocabularies[name] for name in CATEGORICAL_FIELDS), values, strict=True
                    )
                ]
            ],
            dtype=np.int64,
        )
        delta = (micros - history.last_us) / _US if history.last_us is not None else 0.0
        token = Tokens(
            ids,
            numeric.astype(np.float32),
            present,
            np.array([max(delta, 0.0)], np.float32),
            np.array([_DOMAIN_INDEX.get(tx.channel, 0) if tx.channel else 0], np.int64),
            np.array([IGNORE_INDEX if tx.is_fraud is None else int(tx.is_fraud)], np.int64),
        )
        tail = history.tail
        sequence = Tokens.concat([tail, token]) if len(tail) else token
        half = self.history_window // 2
        window = 0 if count < self.history_window else count // half - 1
        offset = count - len(tail)
        start = window * half
        example = sequence.example(start - offset, count + 1 - offset, with_labels=False)
        history.count = count + 1
        history.log_amount_sum += float(log_amount[0])
        history.last_us = micros
        history.tail = sequence.take(slice(max(0, len(sequence) - self.history_window + 1), None))
        keep = recent_seconds > second - _RECENT_SECONDS
        history.recent_seconds = np.append(recent_seconds[keep], second)
        history.recent_log = np.append(recent_log[keep], log_amount[0])
        return example, count - start


@dataclass
class Windows:
    """Examples of one encoded frame.

    Attributes:
        examples: core examples (see `core.data`), one per window.
        rows: per example, (n,) positions in the frame of the transactions it scores.
        positions: per example, (n,) token positions of those transactions within the example.
    """

    examples: list[dict[str, Any]]
    rows: list[np.ndarray]
    positions: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.examples)


def _account_windows(
    sorted_codes: np.ndarray,
    sorted_seconds: np.ndarray,
    sorted_log: np.ndarray,
    carried_seconds: list[np.ndarray],
    carried_log: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Per-account spending windows over a frame plus each account's carried recent transactions.

    Args:
        sorted_codes: (N,) account codes 0..U-1 of the frame rows, ascending (time order within a code).
        sorted_seconds, sorted_log: (N,) epoch seconds and log1p(amount) of those rows.
        carried_seconds, carried_log: per account code, its recent transactions from earlier chunks.

    Returns:
        (counts, sums, recent): counts (N, W) of the account's earlier transactions with time in
        (t - w, t] for each window w of `ACCOUNT_WINDOWS_DAYS`, sums (N, W) of their log-amounts, and per
        account code the (seconds, log-amounts) to carry: its transactions of the last longest window.
    """
    lengths = np.array([len(c) for c in carried_seconds], np.int64)
    codes = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), sorted_codes]).astype(np.int64)
    seconds = np.concatenate([*carried_seconds, sorted_seconds]).astype(np.int64)
    logs = np.concatenate([*carried_log, sorted_log]).astype(np.float64)
    order = np.argsort(codes, kind="stable")  # carried rows first within each account, then the frame's
    codes, seconds, logs = codes[order], seconds[order], logs[order]
    rows = np.flatnonzero(order >= lengths.sum())  # (N,) positions of the frame rows, in sorted order
    base = int(seconds.min()) - _RECENT_SECONDS - 1 if len(seconds) else 0
    key = (codes << 40) | (seconds - base)  # (account, time) in one sortable integer
    cum = np.concatenate([[0.0], np.cumsum(logs)])
    lower = np.searchsorted(  # (W, N) first position of the same account with time > t - w
        key,
        (codes[rows] << 40)[None, :] | (seconds[rows][None, :] - _WINDOW_SECONDS[:, None] - base),
        "right",
    )
    counts = (rows[None, :] - lower).T  # (N, W)
    sums = (cum[rows][None, :] - cum[lower]).T  # (N, W)
    bounds = np.searchsorted(codes, np.arange(len(lengths) + 1))
    recent = []
    for k in range(len(lengths)):
        start, stop = int(bounds[k]), int(bounds[k + 1])
        if stop > start:
            start += int(np.searchsorted(seconds[start:stop], seconds[stop - 1] - _RECENT_SECONDS, "right"))
        recent.append((seconds[start:stop].copy(), logs[start:stop].copy()))
    return counts, sums, recent


def _spending(log_amount: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """(N, 2W): log1p(window counts), then log-amount minus the window mean (NaN where the window is empty)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        versus = np.where(counts > 0, log_amount[:, None] - sums / counts, np.nan)
    return np.concatenate([np.log1p(counts), versus], axis=1)


def timestamp_micros(when: dt.datetime) -> int:
    """Epoch microseconds of a timezone-aware datetime (exact integer arithmetic)."""
    return (when - _EPOCH) // dt.timedelta(microseconds=1)


def _micros(timestamps: pd.Series) -> np.ndarray:
    """Epoch microseconds of a UTC timestamp column."""
    values = timestamps
    if not isinstance(values.dtype, pd.DatetimeTZDtype):
        values = pd.to_datetime(values, utc=True)
    return values.dt.tz_convert("UTC").astype("datetime64[us, UTC]").astype("int64").to_numpy()


def _lookup(values: pd.Series, vocabulary: Mapping[str, int]) -> np.ndarray:
    """Vocabulary ids of a text column (missing and unseen values -> UNKNOWN_ID)."""
    mapped = values.map(vocabulary)
    return mapped.fillna(UNKNOWN_ID).to_numpy().astype(np.int64)

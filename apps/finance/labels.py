"""Delayed fraud labels per merchant: how many (fraudulent) transactions a merchant had before a given time."""

from __future__ import annotations

import bisect

import numpy as np
import pandas as pd

RISK_WINDOWS_DAYS: tuple[float | None, ...] = (1.0, 7.0, 30.0, None)
"""Windows of the merchant risk features (None: all time), each ending at `t - delay`."""
COUNT_WINDOWS_DAYS: tuple[float, ...] = (1.0, 7.0, 30.0)
"""Windows (among `RISK_WINDOWS_DAYS`) whose labelled-transaction volume is a feature as well."""
RISK_PRIOR_WEIGHT = 1.0
"""Pseudo-count of the global fraud rate in the smoothed merchant rate."""
_EPOCH_2000 = 946_684_800
_SMALL_ADD = 8
_DAY = 86_400


class LabelStore:
    """Fraud labels per merchant, queried as "how many (fraud) transactions before time t".

    Times are whole seconds. `add` takes frames (batch path: sorted arrays, vectorised queries);
    `append` takes one transaction (real-time path: per-merchant lists, O(log n) queries). Both answer
    the same counts. A transaction id is counted once however often it is added.

    Args:
        delay_seconds: Label delay; `risk_counts` only counts transactions older than `t - delay`.
    """

    def __init__(self, delay_seconds: int) -> None:
        self.delay_seconds = int(delay_seconds)
        self._codes: dict[str, int] = {}
        self._ids: set[str] = set()
        self._keys = np.zeros(0, np.int64)
        self._labels = np.zeros(0, np.int64)
        self._cum = np.zeros(1, np.int64)
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def _code(self, merchant: str) -> int:
        code = self._codes.get(merchant)
        if code is None:
            code = self._codes[merchant] = len(self._codes)
        return code

    def add(
        self, transaction_ids: np.ndarray, merchants: np.ndarray, seconds: np.ndarray, labels: np.ndarray
    ) -> None:
        """Add labelled transactions (arrays of equal length; labels 0/1)."""
        if len(transaction_ids) <= _SMALL_ADD:
            # Real-time sized: per-merchant lists avoid re-sorting the whole store on every transaction.
            for tid, merchant, second, label in zip(transaction_ids, merchants, seconds, labels, strict=True):
                self.append(tid, merchant, int(second), int(label))
            return
        fresh = np.fromiter((t not in self._ids for t in transaction_ids), bool, len(transaction_ids))
        if not fresh.any():
            return
        self._ids.update(np.asarray(transaction_ids)[fresh].tolist())
        inverse, uniques = pd.factorize(np.asarray(merchants, dtype=object)[fresh], use_na_sentinel=False)
        codes = np.fromiter((self._code(m) for m in uniques), np.int64, len(uniques))[inverse]
        rel = np.clip(np.asarray(seconds, np.int64)[fresh] - _EPOCH_2000, 0, 2**32 - 1)
        self._parts.append(((codes << 32) | rel, np.asarray(labels, np.int64)[fresh]))

    def append(self, transaction_id: str, merchant: str, second: int, label: int) -> None:
        """Add one labelled transaction of the real-time stream (in time order per merchant)."""
        if transaction_id in self._ids:
            return
        self._ids.add(transaction_id)
        secs, cum = self._pending.setdefault(self._code(merchant), ([], [0]))
        position = bisect.bisect_right(secs, second)
        secs.insert(position, second)
        cum.insert(position + 1, cum[position])
        for k in range(position + 1, len(cum)):
            cum[k] += int(label)

    def _merge(self) -> None:
        if not self._parts:
            return
        keys = np.concatenate([self._keys, *(k for k, _ in self._parts)])
        labels = np.concatenate([self._labels, *(v for _, v in self._parts)])
        order = np.argsort(keys, kind="stable")
        self._keys, self._labels = keys[order], labels[order]
        self._cum = np.concatenate([[0], np.cumsum(self._labels)])
        self._parts = []

    def counts(self, merchants: np.ndarray, before_seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(transactions, frauds) of each merchant strictly before each time (arrays (N,) int64)."""
        self._merge()
        inverse, uniques = pd.factorize(np.asarray(merchants, dtype=object), use_na_sentinel=False)
        codes = np.fromiter((self._codes.get(m, -1) for m in uniques), np.int64, len(uniques))[inverse]
        known = codes >= 0
        base = np.where(known, codes, 0) << 32
        rel = np.clip(np.asarray(before_seconds, np.int64) - _EPOCH_2000, 0, 2**32 - 1)
        lo = np.searchsorted(self._keys, base, "left")
        hi = np.searchsorted(self._keys, base | rel, "left")
        n = np.where(known, hi - lo, 0)
        f = np.where(known, self._cum[hi] - self._cum[lo], 0)
        if self._pending:
            for i in np.flatnonzero(known):
                entry = self._pending.get(int(codes[i]))
                if entry is not None:
                    k = bisect.bisect_left(entry[0], int(before_seconds[i]))
                    n[i] += k
                    f[i] += entry[1][k]
        return n, f

    def risk_features(
        self, merchants: np.ndarray, seconds: np.ndarray, prior: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw merchant features from labels known at each time, and their presence mask.

        Columns: the smoothed log fraud rate over each of `RISK_WINDOWS_DAYS` (present when the window
        holds a labelled transaction), then log1p(labelled transactions) over each of
        `COUNT_WINDOWS_DAYS` (always present). Every window ends at `t - delay`.

        Returns:
            (N, len(RISK_WINDOWS_DAYS) + len(COUNT_WINDOWS_DAYS)) values and the same-shaped bool mask.
        """
        cutoff = np.asarray(seconds, np.int64) - self.delay_seconds
        windows = [days for days in RISK_WINDOWS_DAYS if days is not None]
        # One counts() query for every window start and the cutoff: (1 + windows) x N.
        starts = np.concatenate([cutoff, *(cutoff - int(days * _DAY) for days in windows)])
        n_at, f_at = self.counts(np.tile(np.asarray(merchants, dtype=object), 1 + len(windows)), starts)
        n_at, f_at = n_at.reshape(1 + len(windows), -1), f_at.reshape(1 + len(windows), -1)
        n_all, f_all = n_at[0], f_at[0]
        values, present, volumes = [], [], {}
        for days in RISK_WINDOWS_DAYS:
            if days is None:
                n, f = n_all, f_all
            else:
                k = 1 + windows.index(days)
                n, f = n_all - n_at[k], f_all - f_at[k]
                volumes[days] = n
            values.append(np.log((f + RISK_PRIOR_WEIGHT * prior) / (n + RISK_PRIOR_WEIGHT)))
            present.append(n > 0)
        for days in COUNT_WINDOWS_DAYS:
            values.append(np.log1p(volumes[days]))
            present.append(np.ones(len(cutoff), bool))
        return np.stack(values, 1), np.stack(present, 1)

"""Canonical interactions -> vocabulary indices -> per-student sequences -> pyKT-protocol windows.

`build_vocabularies` (training data) and `to_sequences` map ids to indices and pack each student's answers
sorted by time; `make_windows` cuts them into model-sized windows the way pyKT trains (`"chunks"`) and
evaluates (`"sliding"`). The tensors for `core` are built from `SequenceWindows`. `practice_features`
computes DKT-forget-style features of each answer's skills from the earlier answers of its window.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd

from apps.education.schema import (
    PAD_INDEX,
    SKILL_SEPARATOR,
    OnUnknown,
    SequenceWindows,
    StudentSequences,
    Vocabulary,
    split_skills,
)
from core.errors import ConfigError

logger = logging.getLogger(__name__)

WindowMode = Literal["sliding", "chunks"]

PYKT_MAXLEN = 200
"""pyKT's sequence length: longer sequences are cut (training) or slid over (evaluation)."""

PYKT_MIN_LENGTH = 3
"""pyKT drops sequences (and trailing training chunks) shorter than this."""


def build_vocabularies(frame: pd.DataFrame, *, min_count: int = 1) -> tuple[Vocabulary, Vocabulary]:
    """Build the item and skill vocabularies from training interactions.

    Args:
        frame: Canonical interactions (training data only).
        min_count: Ids seen fewer times map to the unknown index.

    Returns:
        (item vocabulary, skill vocabulary); multi-skill cells are split into their skills.
    """
    items = Vocabulary.build(frame["item_id"], name="item_id", min_count=min_count)
    skills = Vocabulary.build(split_skills(frame["skill_id"]), name="skill_id", min_count=min_count)
    return items, skills


def to_sequences(
    frame: pd.DataFrame,
    item_vocab: Vocabulary,
    skill_vocab: Vocabulary,
    *,
    on_unknown: OnUnknown = "raise",
) -> StudentSequences:
    """Map ids through the vocabularies and pack each student's answers, sorted by time.

    Students keep their order of first appearance; within a student answers are sorted by
    (`timestamp`, `order`) with a stable sort (NaT sorts first, so untimed sources sort by `order`).

    Args:
        frame: Canonical interactions.
        item_vocab: Item vocabulary (from training).
        skill_vocab: Skill vocabulary (from training).
        on_unknown: `"raise"` (default): an id missing from a vocabulary raises, naming the row;
            `"unknown"`: map it to the unknown index.

    Returns:
        The packed sequences (see `StudentSequences` for shapes).

    Raises:
        InputValidationError: An unknown id with `on_unknown="raise"`.
    """
    codes, user_ids = pd.factorize(frame["user_id"], sort=False)
    timestamp = frame["timestamp"]
    time_ns = timestamp.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    no_time = timestamp.isna().to_numpy()
    time_ns = np.where(no_time, np.iinfo(np.int64).min, time_ns)
    order = np.lexsort((np.arange(len(frame)), frame["order"].to_numpy(), time_ns, codes))
    sorted_frame = frame.iloc[order]
    codes = codes[order]
    rows = sorted_frame["source_row"].to_numpy()

    items = item_vocab.encode(sorted_frame["item_id"], on_unknown=on_unknown, row_labels=rows)
    skills = _encode_skills(sorted_frame["skill_id"], skill_vocab, on_unknown=on_unknown, rows=rows)

    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=len(user_ids)), out=offsets[1:])
    first = np.zeros(len(codes), dtype=bool)
    first[offsets[:-1][np.diff(offsets) > 0]] = True
    times = time_ns[order].astype(np.float64)
    elapsed = np.diff(times, prepend=times[:1]) / 1e9
    elapsed[first] = 0.0
    elapsed[no_time[order]] = np.nan
    return StudentSequences(
        user_ids=np.asarray(user_ids.astype(str), dtype=object),
        offsets=offsets,
        items=items,
        skills=skills,
        correct=sorted_frame["correct"].to_numpy(dtype=np.int8),
        elapsed_s=elapsed.astype(np.float32),
        response_time_ms=sorted_frame["response_time_ms"].to_numpy(dtype=np.float32, na_value=np.nan),
        source_row=rows.astype(np.int64),
    )


def _encode_skills(
    skill_ids: pd.Series, vocab: Vocabulary, *, on_unknown: OnUnknown, rows: np.ndarray
) -> np.ndarray:
    """Skill cells -> (N, K) indices, K = most skills on one item, padded with PAD_INDEX."""
    if not skill_ids.str.contains(SKILL_SEPARATOR, regex=False).any():
        return vocab.encode(skill_ids, on_unknown=on_unknown, row_labels=rows)[:, None]
    parts = split_skills(skill_ids.reset_index(drop=True))
    owner = parts.index.to_numpy()
    slot = parts.groupby(level=0).cumcount().to_numpy()
    encoded = vocab.encode(parts, on_unknown=on_unknown, row_labels=rows[owner])
    out = np.full((len(skill_ids), int(slot.max()) + 1), PAD_INDEX, dtype=np.int64)
    out[owner, slot] = encoded
    return out


def make_windows(
    sequences: StudentSequences,
    *,
    maxlen: int = PYKT_MAXLEN,
    mode: WindowMode = "sliding",
    min_length: int = PYKT_MIN_LENGTH,
) -> SequenceWindows:
    """Cut per-student sequences into windows of at most `maxlen` answers, following pyKT.

    Students with fewer than `min_length` answers are dropped (pyKT drops them when preprocessing).

    - `mode="sliding"` (pyKT's reported evaluation, `generate_window_sequences`): a student with at most
      `maxlen` answers is one window scoring positions 1..n-1. A longer student gets the window
      [0, maxlen) scoring positions 1..maxlen-1, then for every later answer j (maxlen <= j < n) the
      window [j-maxlen+1, j+1) that scores only its last slot, so answer j is predicted from the previous
      `maxlen - 1` answers. Every answer after a student's first is scored exactly once.
    - `mode="chunks"` (pyKT's training/validation, `generate_sequences`): consecutive non-overlapping
      windows of `maxlen`; a trailing chunk shorter than `min_length` is dropped; every chunk scores its
      slots 1.. (the first slot of a chunk has no history inside the window, as in pyKT).

    Windows are padded to `min(maxlen, longest window)` slots.

    Args:
        sequences: Output of `to_sequences`.
        maxlen: Window length (pyKT: 200).
        mode: `"sliding"` or `"chunks"`.
        min_length: Shortest student / chunk kept (pyKT: 3).

    Returns:
        The windows (see `SequenceWindows` for shapes and masks).

    Raises:
        ConfigError: `mode` is unknown or `maxlen < 2`.
    """
    if mode not in ("sliding", "chunks"):
        raise ConfigError(f"mode must be 'sliding' or 'chunks'; got {mode!r}.")
    if maxlen < 2:
        raise ConfigError(f"maxlen must be at least 2 (one history answer and one target); got {maxlen}.")
    lengths = sequences.lengths
    kept = np.flatnonzero(lengths >= min_length)
    if len(kept) < len(lengths):
        logger.info(
            "make_windows: dropped %d student(s) shorter than %d", len(lengths) - len(kept), min_length
        )
    n = lengths[kept]
    if mode == "sliding":
        n_windows = np.where(n > maxlen, n - maxlen + 1, 1)
    else:
        n_windows = n // maxlen + (n % maxlen >= min_length)
    student = np.repeat(kept, n_windows)
    n_of_window = np.repeat(n, n_windows)
    k = np.arange(len(student)) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    if mode == "sliding":
        start = k
        length = np.minimum(n_of_window, maxlen)
        target_from = np.where(k == 0, 1, maxlen - 1)
    else:
        start = k * maxlen
        length = np.minimum(n_of_window - start, maxlen)
        target_from = np.ones_like(k)
    width = int(length.max()) if len(length) else 0
    slot = np.arange(width)[None, :]  # (1, L)
    valid = slot < length[:, None]  # (W, L)
    position = np.where(valid, start[:, None] + slot, -1)  # (W, L)
    flat = np.where(valid, sequences.offsets[student][:, None] + position, 0)  # (W, L)
    items = np.where(valid, sequences.items[flat], PAD_INDEX)
    skills = np.where(valid[..., None], sequences.skills[flat], PAD_INDEX)  # (W, L, K)
    correct = np.where(valid, sequences.correct[flat], 0).astype(np.int8)
    elapsed = np.where(valid, sequences.elapsed_s[flat], np.nan).astype(np.float32)
    return SequenceWindows(
        student=student.astype(np.int64),
        position=position.astype(np.int64),
        items=items.astype(np.int64),
        skills=skills.astype(np.int64),
        correct=correct,
        elapsed_s=elapsed,
        attention_mask=valid,
        target_mask=valid & (slot >= target_from[:, None]),
    )


def _practice_buckets(
    attempts: np.ndarray,
    corrects: np.ndarray,
    last: np.ndarray,
    valid: np.ndarray,
    at: np.ndarray,
    correct: np.ndarray,
) -> np.ndarray:
    """Per-query per-skill practice counts -> bucket ids (Q, len(PRACTICE_FIELDS)), all >= 1.

    Args: `attempts`, `corrects` (Q, K) earlier answers on each of the query item's skills and how many
    were correct; `last` (Q, K) slot of the latest of them (-1: never); `valid` (Q, K) real skills;
    `at` (Q,) the query's slot; `correct` the window's responses by slot. A multi-skill item pools its
    skills: mean attempts, success rate over all of them, and the latest attempt on any of them.
    """
    n_skills = np.maximum(valid.sum(axis=1), 1)
    total = np.where(valid, attempts, 0).sum(axis=1)
    right = np.where(valid, corrects, 0).sum(axis=1)
    latest = np.where(valid, last, -1).max(axis=1, initial=-1)  # (Q,)
    seen = latest >= 0
    attempts_b = 1 + np.minimum(np.floor(np.log2(1.0 + total / n_skills)), 8)
    rate = (right + 1.0) / (total + 2.0)  # Laplace-smoothed past success rate
    success_b = np.where(total > 0, 2 + np.minimum(np.floor(rate * 10), 9), 1)
    gap = np.maximum(at - latest, 1)
    gap_b = np.where(seen, 2 + np.minimum(np.floor(np.log2(gap)), 7), 1)
    last_b = np.where(seen, 2 + np.append(correct, 0)[np.maximum(latest, 0)], 1)  # append: empty windows
    return np.stack([attempts_b, success_b, gap_b, last_b], axis=-1).astype(np.int64)


def practice_features(
    skills: np.ndarray, correct: np.ndarray, query_skills: np.ndarray | None = None
) -> np.ndarray:
    """DKT-forget-style practice features (Nagatani et al. 2019) from one window's answers.

    For the answer at slot t, from slots < t only (its own response never enters): how often the
    student practised its skills (log2 buckets), the smoothed past success rate on them (tenths), the
    slots since the latest attempt on them (log2 buckets, the "repeated gap") and whether that latest
    attempt was correct. Bucket ids follow `apps.education.config.PRACTICE_BUCKETS` (0 is padding;
    1 means "never practised").

    Args:
        skills: (n, K) skill indices of the window's answers (PAD_INDEX fills unused columns).
        correct: (n,) responses 0/1.
        query_skills: (Q, K') skill sets of items to score after the whole window (slot n), e.g. every
            known item for a recommendation; None scores the window's own answers.

    Returns:
        (n, F) bucket ids for the window's answers, or (Q, F) for `query_skills`.
    """
    n = len(correct)
    correct = np.asarray(correct, dtype=np.int64)
    real = skills != PAD_INDEX  # (n, K)
    uniq, inverse = np.unique(skills[real], return_inverse=True)
    column = np.zeros(skills.shape, dtype=np.int64)
    column[real] = inverse
    hits = np.zeros((n, len(uniq)), dtype=np.int64)  # (n, U): slot t practised skill u
    hits[np.nonzero(real)[0], column[real]] = 1
    zero = np.zeros((1, len(uniq)), dtype=np.int64)
    attempts = np.concatenate([zero, np.cumsum(hits, axis=0)])  # (n + 1, U): answers on u before slot t
    corrects = np.concatenate([zero, np.cumsum(hits * correct[:, None], axis=0)])  # (n + 1, U)
    slot = np.where(hits > 0, np.arange(n)[:, None], -1)
    last = np.concatenate([zero - 1, np.maximum.accumulate(slot, axis=0)])  # (n + 1, U) latest slot < t
    if query_skills is None:
        rows = np.broadcast_to(np.arange(n)[:, None], skills.shape)  # (n, K): features before slot t
        return _practice_buckets(
            attempts[rows, column], corrects[rows, column], last[rows, column], real, np.arange(n), correct
        )
    known = np.isin(query_skills, uniq) & (query_skills != PAD_INDEX)  # (Q, K')
    col = np.clip(np.searchsorted(uniq, query_skills), 0, max(len(uniq) - 1, 0))
    if len(uniq) == 0:
        final = np.zeros(query_skills.shape, dtype=np.int64)
        return _practice_buckets(final, final, final - 1, known, np.full(len(query_skills), n), correct)
    return _practice_buckets(
        np.where(known, attempts[n, col], 0),
        np.where(known, corrects[n, col], 0),
        np.where(known, last[n, col], -1),
        known,
        np.full(len(query_skills), n),
        correct,
    )


def to_examples(
    windows: SequenceWindows,
    *,
    score_first: bool = False,
    skill_domain: np.ndarray | None = None,
    practice: bool = False,
    practice_tokens: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Turn windows into `core` examples for the causal next-step model.

    Each example is a start token followed by the window's answers (T = answers + 1 tokens). Token j
    (j >= 1) carries answer j-1: its item, first skill, the skill x response interaction token and the
    response; token 0 is the start token (`START_INDEX` in every field). The state after token j predicts
    answer j: `next_item_ids[j]` is the item of answer j and `next_labels[j]` its response, so the
    prediction for an answer is made from the answers before it only (the causal attention never lets
    token j see token j+1, which is where answer j's response enters). A multi-skill item is one answer,
    hence one prediction (its first skill is the token's skill; the item token identifies it).

    Args:
        windows: Output of `make_windows`.
        score_first: Also score the first answer of a window that starts at a student's first answer
            (predicted from the start token alone); pyKT's protocol does not score it.
        skill_domain: Domain id per skill vocabulary index (`clusters.domain_of_skill_index`); when
            given, each token gets its skill's domain in `domain_ids` (the start token domain 0).

    Returns:
        One example per window (see `core.data`): `categorical` {item, skill, interaction, response} of
        shape (T,), `time_delta` (T,) seconds, `next_item_ids` (T,), `next_labels` (T,) float (-1 ignored),
        and `domain_ids` (T,) when `skill_domain` is given.
        practice: Add `next_features` (T, F): the practice features (`practice_features`) of the answer
            each state predicts, from the window's earlier answers (0 on the last token, which predicts
            nothing).
        practice_tokens: Add the practice features of each token's own answer (from the answers before it)
            as categorical fields `PRACTICE_FIELDS` (the start token: START_INDEX).
    """
    from apps.education.config import PRACTICE_FIELDS, START_INDEX

    lengths = windows.attention_mask.sum(axis=1)
    targets = windows.target_mask | (score_first & (windows.position == 0))
    examples = []
    for w, n in enumerate(lengths.tolist()):
        items = windows.items[w, :n]
        skills = windows.skills[w, :n, 0]
        correct = windows.correct[w, :n].astype(np.int64)
        elapsed = np.nan_to_num(windows.elapsed_s[w, :n], nan=0.0)
        start = np.array([START_INDEX], dtype=np.int64)
        labels = np.where(targets[w, :n], correct, -1).astype(np.float32)
        example = {
            "categorical": {
                "item": np.concatenate([start, items]),
                "skill": np.concatenate([start, skills]),
                "interaction": np.concatenate([start, 2 * skills + correct]),
                "response": np.concatenate([start, 2 + correct]),
            },
            "time_delta": np.concatenate([[0.0], elapsed]).astype(np.float32),
            "next_item_ids": np.concatenate([items, [PAD_INDEX]]).astype(np.int64),
            "next_labels": np.concatenate([labels, [-1.0]]).astype(np.float32),
        }
        if practice or practice_tokens:
            buckets = practice_features(windows.skills[w, :n], correct)  # (n, F)
            if practice:
                example["next_features"] = np.concatenate([buckets, np.zeros((1, buckets.shape[1]))]).astype(
                    np.int64
                )
            if practice_tokens:
                for f, name in enumerate(PRACTICE_FIELDS):
                    example["categorical"][name] = np.concatenate([start, buckets[:, f]])
        if skill_domain is not None:
            example["domain_ids"] = np.concatenate([[0], skill_domain[skills]]).astype(np.int64)
        examples.append(example)
    return examples

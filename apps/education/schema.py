"""Canonical education records: the interaction table, its dtypes, id vocabularies and sequence arrays.

The canonical interaction table
-------------------------------
Every adapter returns a pandas DataFrame with these columns, in this order, with these dtypes
(`INTERACTION_DTYPES`); one row is one answer of one student to one item (question):

| column | dtype | meaning |
|---|---|---|
| `user_id` | `string` | student id, never empty |
| `order` | `int64` | position of the answer in its source log; sorts answers when timestamps are absent or tie |
| `timestamp` | `datetime64[ns, UTC]` | when the answer was given; `NaT` for sources without time (pyKT, DKVMN) |
| `item_id` | `string` | question id, never empty; sources without question ids use the skill id(s) |
| `skill_id` | `string` | the skill (knowledge component) id(s) of the item; several skills are joined with `SKILL_SEPARATOR` (`"4|5"`) |
| `correct` | `int8` | 1 = correct on the first attempt, 0 = wrong |
| `skill_name` | `string` | human-readable skill name(s), joined like `skill_id`; `<NA>` when unknown |
| `attempt_count` | `Int32` | attempts the student needed; `<NA>` when unknown |
| `response_time_ms` | `float64` | milliseconds to the first response; `NaN` when unknown |
| `source_row` | `int64` | 1-based record number in the source (data rows, header excluded), for error messages |

Columns a source carries beyond these (`fold`, `original`, ...) are kept after them unchanged.
The table keeps source order; `adapters.to_sequences` sorts each student's answers by
(`timestamp`, `order`) with a stable sort, so equal keys keep their source order.

Multi-skill items are ONE row whose `skill_id` lists every skill (`"4|5"`), never one row per skill:
expanding a multi-skill answer into several rows that share one response lets a sequence model see the
answer before it predicts it (label leakage). `"|"` separates skills rather than pyKT's `"_"` because real
skill ids (Junyi exercise slugs such as `adding_fractions`) contain underscores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd

from core.errors import ConfigError, InputValidationError

logger = logging.getLogger(__name__)

SKILL_SEPARATOR = "|"
"""Joins the skill ids (and names) of a multi-skill item inside one `skill_id` / `skill_name` cell."""

PAD_INDEX = 0
"""Vocabulary index of padding positions."""

UNKNOWN_INDEX = 1
"""Vocabulary index of ids not seen when the vocabulary was built (only when asked for)."""

REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "skill_id", "correct")
"""Columns every raw interaction source must provide (plus `order` or `timestamp`)."""

ORDER_COLUMNS: tuple[str, ...] = ("timestamp", "order")
"""At least one of these must be present to order a student's answers."""

OPTIONAL_COLUMNS: tuple[str, ...] = ("skill_name", "attempt_count", "response_time_ms")

INTERACTION_DTYPES: dict[str, str] = {
    "user_id": "string",
    "order": "int64",
    "timestamp": "datetime64[ns, UTC]",
    "item_id": "string",
    "skill_id": "string",
    "correct": "int8",
    "skill_name": "string",
    "attempt_count": "Int32",
    "response_time_ms": "float64",
    "source_row": "int64",
}
"""Column -> pandas dtype of the canonical interaction table, in canonical column order."""

CANONICAL_COLUMNS: tuple[str, ...] = tuple(INTERACTION_DTYPES)

REJECT_REASON_COLUMN = "reject_reason"
"""Column of a rejected (quarantine) frame that says why each row was set aside."""

OnInvalid = Literal["raise", "quarantine"]
OnUnknown = Literal["raise", "unknown"]


@dataclass(frozen=True)
class Interaction:
    """One answer, for callers that build interactions in code (a new student's first answers).

    Attributes:
        user_id: Student id.
        item_id: Question id.
        skill_id: Skill id, or several joined with `SKILL_SEPARATOR`.
        correct: 1 if answered correctly on the first attempt, else 0.
        order: Position in the student's log; used when `timestamp` is None or ties.
        timestamp: When the answer was given (timezone-aware, or naive meaning UTC).
        skill_name: Human-readable skill name(s).
        attempt_count: Attempts needed.
        response_time_ms: Milliseconds to the first response.
    """

    user_id: str
    item_id: str
    skill_id: str
    correct: int
    order: int = 0
    timestamp: Optional[datetime] = None
    skill_name: Optional[str] = None
    attempt_count: Optional[int] = None
    response_time_ms: Optional[float] = None


def interactions_to_frame(records: Iterable[Interaction]) -> pd.DataFrame:
    """Turn `Interaction` records into a raw frame for `adapters.validate_interactions`.

    Args:
        records: The interactions, in any order.

    Returns:
        A raw DataFrame with one column per `Interaction` field (not yet validated or typed).
    """
    rows = [record.__dict__ for record in records]
    frame = pd.DataFrame(rows, columns=list(Interaction.__dataclass_fields__))
    if frame["timestamp"].isna().all():
        frame = frame.drop(columns="timestamp")
    return frame


def empty_interactions() -> pd.DataFrame:
    """An empty canonical interaction table with the canonical dtypes."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in INTERACTION_DTYPES.items()})


@dataclass(frozen=True)
class InteractionLog:
    """What an adapter read: the accepted canonical interactions and the rows it set aside.

    Attributes:
        frame: Canonical interaction table (see the module docstring for columns and dtypes).
        rejected: Source rows that broke a rule, as read (strings) plus `source_row` and
            `reject_reason`; empty unless the adapter ran with `on_invalid="quarantine"`.
        source: Where the data came from (path, URL or `"<frame>"`), used in messages.
    """

    frame: pd.DataFrame
    rejected: pd.DataFrame
    source: str

    @property
    def n_students(self) -> int:
        """Number of distinct `user_id`s."""
        return int(self.frame["user_id"].nunique())

    @property
    def n_interactions(self) -> int:
        """Number of accepted interactions (rows of `frame`)."""
        return len(self.frame)

    @property
    def skills(self) -> list[str]:
        """Sorted distinct skill ids, multi-skill cells split into their skills."""
        return sorted(set(split_skills(self.frame["skill_id"]).unique()))

    def summary(self) -> dict[str, Any]:
        """Counts for logs and reports: students, interactions, skills, items, rejected rows."""
        return {
            "source": self.source,
            "students": self.n_students,
            "interactions": self.n_interactions,
            "skills": len(self.skills),
            "items": int(self.frame["item_id"].nunique()),
            "multi_skill_interactions": int(
                self.frame["skill_id"].str.contains(SKILL_SEPARATOR, regex=False).sum()
            ),
            "rejected_rows": len(self.rejected),
        }


def split_skills(skill_ids: pd.Series) -> pd.Series:
    """Split `SKILL_SEPARATOR`-joined skill cells into one row per skill.

    Args:
        skill_ids: A `skill_id` (or `skill_name`) column.

    Returns:
        A string Series with one skill per row; its index repeats the index of the cell it came from.
    """
    return skill_ids.astype("string").str.split(SKILL_SEPARATOR, regex=False).explode().astype("string")


def join_skills(skills: Sequence[str]) -> str:
    """Join several skill ids into one `skill_id` cell."""
    return SKILL_SEPARATOR.join(skills)


@dataclass(frozen=True)
class Vocabulary:
    """Maps ids (items or skills) to contiguous indices: 0 = padding, 1 = unknown, 2.. = known ids.

    Built once from training data and saved in the model directory (`to_dict` is JSON-serialisable),
    so prediction maps ids exactly as training did.

    Attributes:
        name: What the ids are (`"item_id"`, `"skill_id"`); used in error messages.
        tokens: Known ids; `tokens[i]` has index `i + 2`.
    """

    name: str
    tokens: tuple[str, ...]
    _index: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = pd.Index(self.tokens, dtype="string")
        if not index.is_unique:
            duplicated = index[index.duplicated()].unique().tolist()[:5]
            raise ConfigError(
                f"Vocabulary '{self.name}': ids must be unique; got duplicates {duplicated}. "
                "Build it with Vocabulary.build, which de-duplicates."
            )
        object.__setattr__(self, "_index", index)

    @classmethod
    def build(cls, values: Iterable[str] | pd.Series, *, name: str, min_count: int = 1) -> Vocabulary:
        """Build a vocabulary from observed ids.

        Args:
            values: Observed ids (a column; repeats count towards `min_count`). Multi-skill cells must
                be split first (`split_skills`).
            name: What the ids are, for messages.
            min_count: Ids seen fewer times are left out (they will map to the unknown index).

        Returns:
            A vocabulary whose tokens are sorted, so the same ids give the same indices in any data order.
        """
        counts = pd.Series(values, dtype="string").dropna().value_counts()
        kept = counts[counts >= min_count].index
        return cls(name=name, tokens=tuple(sorted(str(token) for token in kept)))

    def __len__(self) -> int:
        """Number of indices including padding and unknown (the embedding table size)."""
        return len(self.tokens) + 2

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def encode(
        self,
        values: Sequence[str] | pd.Series | np.ndarray,
        *,
        on_unknown: OnUnknown = "raise",
        row_labels: Optional[Sequence[Any] | np.ndarray] = None,
    ) -> np.ndarray:
        """Map ids to indices.

        Args:
            values: Ids to map, shape (N,).
            on_unknown: `"raise"` (default) raises on an id not in the vocabulary; `"unknown"` maps it to
                `UNKNOWN_INDEX`.
            row_labels: For messages, one label per value naming where it came from (e.g. `source_row`).

        Returns:
            int64 indices, shape (N,), each >= 2 for known ids (or `UNKNOWN_INDEX`).

        Raises:
            InputValidationError: An id is not in the vocabulary and `on_unknown="raise"`.
            ConfigError: `on_unknown` is not one of the allowed values.
        """
        if on_unknown not in ("raise", "unknown"):
            raise ConfigError(f"on_unknown must be 'raise' or 'unknown'; got {on_unknown!r}.")
        array = np.asarray(values, dtype=object)
        positions = self._index.get_indexer(pd.Index(array, dtype="string"))
        unknown = positions < 0
        if unknown.any() and on_unknown == "raise":
            first = int(np.flatnonzero(unknown)[0])
            where = f"row {row_labels[first]}" if row_labels is not None else f"position {first}"
            unseen = pd.unique(array[unknown])
            raise InputValidationError(
                f"column '{self.name}': {int(unknown.sum())} value(s) are not in the model's vocabulary "
                f"({len(unseen)} distinct, e.g. {[str(v) for v in unseen[:5]]}); first at {where}: "
                f"got {array[first]!r}; expected an id seen in training. Retrain with these ids, or pass "
                "on_unknown='unknown' to map unseen ids to the unknown bucket."
            )
        return np.where(unknown, UNKNOWN_INDEX, positions + 2).astype(np.int64)

    def decode(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Map indices back to ids (`"<pad>"` for 0, `"<unk>"` for 1)."""
        table = ["<pad>", "<unk>", *self.tokens]
        return [table[int(i)] for i in np.asarray(indices).ravel()]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form for `app.json`."""
        return {
            "name": self.name,
            "pad_index": PAD_INDEX,
            "unknown_index": UNKNOWN_INDEX,
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        """Rebuild a vocabulary saved by `to_dict`.

        Raises:
            ConfigError: A key is missing or the pad/unknown indices differ from this code's.
        """
        missing = [key for key in ("name", "pad_index", "unknown_index", "tokens") if key not in data]
        if missing:
            raise ConfigError(
                f"vocabulary: missing key(s) {missing}; expected the output of Vocabulary.to_dict."
            )
        if (data["pad_index"], data["unknown_index"]) != (PAD_INDEX, UNKNOWN_INDEX):
            raise ConfigError(
                f"vocabulary '{data['name']}': pad/unknown indices {data['pad_index']}/{data['unknown_index']} "
                f"differ from this code's {PAD_INDEX}/{UNKNOWN_INDEX}; the model directory is from an "
                "incompatible version."
            )
        return cls(name=str(data["name"]), tokens=tuple(str(token) for token in data["tokens"]))


@dataclass(frozen=True)
class StudentSequences:
    """Every student's answers as packed index arrays, sorted by time within each student.

    Student `s` owns the flat positions `offsets[s]:offsets[s + 1]`. N = total answers, S = students,
    K = most skills on one item.

    Attributes:
        user_ids: Student ids, shape (S,), in order of first appearance in the table.
        offsets: int64, shape (S + 1,); `offsets[0] == 0`, `offsets[-1] == N`.
        items: Item vocabulary indices, int64, shape (N,).
        skills: Skill vocabulary indices, int64, shape (N, K); a single-skill item fills column 0 and
            pads the rest with `PAD_INDEX`.
        correct: Responses 0/1, int8, shape (N,).
        elapsed_s: Seconds since the student's previous answer, float32, shape (N,); 0 for a student's
            first answer, NaN when the source has no timestamps.
        response_time_ms: float32, shape (N,); NaN when unknown.
        source_row: `source_row` of each answer, int64, shape (N,), for messages.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    skills: np.ndarray
    correct: np.ndarray
    elapsed_s: np.ndarray
    response_time_ms: np.ndarray
    source_row: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Answers per student, int64, shape (S,)."""
        return np.diff(self.offsets)

    @property
    def n_interactions(self) -> int:
        """Total answers N."""
        return int(self.offsets[-1])

    def student(self, index: int) -> dict[str, np.ndarray]:
        """One student's arrays (views), keyed like the attributes (`items`, `skills`, `correct`, ...)."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        names = ("items", "skills", "correct", "elapsed_s", "response_time_ms", "source_row")
        return {name: getattr(self, name)[lo:hi] for name in names}


@dataclass(frozen=True)
class SequenceWindows:
    """Fixed-length windows over `StudentSequences`, ready for batching (W windows of length L).

    Attributes:
        student: Index into the `StudentSequences` each window comes from, int64, shape (W,).
        position: Index of each slot within its student's full sequence, int64, shape (W, L); -1 on padding.
        items: int64, shape (W, L); `PAD_INDEX` on padding.
        skills: int64, shape (W, L, K); `PAD_INDEX` on padding.
        correct: int8, shape (W, L); 0 on padding (use the masks).
        elapsed_s: float32, shape (W, L); NaN on padding.
        attention_mask: bool, shape (W, L); True where the slot holds an answer.
        target_mask: bool, shape (W, L); True where the slot's response is predicted and scored. The
            prediction for slot t may use slots < t of the same window only.
    """

    student: np.ndarray
    position: np.ndarray
    items: np.ndarray
    skills: np.ndarray
    correct: np.ndarray
    elapsed_s: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.student)

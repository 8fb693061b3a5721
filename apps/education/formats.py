"""Format conversions: how pyKT, DKVMN and ASSISTments layouts become canonical interaction rows.

Functions here are pure (no IO): they rename, explode or regroup a source's own layout into rows with the
canonical column names of `apps.education.schema`, with values still as the source wrote them, so that
`apps.education.adapters.validate_interactions` reports every bad value with its source row. The readers
in `adapters` do the IO and call these.

- pyKT (`pykt_to_raw`): `fold,uid[,questions],concepts,responses[,timestamps,usetimes,is_repeat,...]`, one
  student (or one 200-long chunk) per row, comma-separated lists inside quoted fields, `-1` padding.
- DKVMN (`parse_dkvmn`): 3 lines per student (count / skill ids / responses). Multi-skill problems are
  expanded into consecutive rows sharing one response: `estimate_multiskill_pairs` finds the pairs that
  carry that signature and `regroup_multiskill` merges them back into one interaction per item, so a
  model never predicts a response already visible in its input.
- ASSISTments skill builder (`assistments_to_raw`, `merge_multiskill_rows`): rows sharing an `order_id`
  are one answer to a multi-skill problem and become one interaction listing every skill.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Collection, Iterable
from typing import Any, Literal

import numpy as np
import pandas as pd

from apps.education.schema import SKILL_SEPARATOR
from core.errors import ConfigError, InputValidationError

logger = logging.getLogger(__name__)

ConflictPolicy = Literal["split", "first"]


_PYKT_LISTS = ("questions", "concepts", "responses", "timestamps", "usetimes", "is_repeat")


def pykt_to_raw(table: pd.DataFrame, *, source: str = "<pykt>") -> pd.DataFrame:
    """Explode pyKT sequence rows into raw interaction rows (pure conversion, no validation of values).

    Padding positions (`-1` in both the response and the concept/question list) are dropped. Rows with
    `is_repeat == 1` (pyKT's expansion of a multi-concept question) are merged back into the question
    they repeat, so a multi-concept question is one interaction (`skill_id` `"3|7"`). pyKT's `_`-joined
    concepts become `|`-joined. Without a `questions` column, `item_id` is the concept id.

    Args:
        table: pyKT CSV as strings (`uid`, `responses`, `concepts` and/or `questions` required; `fold`
            kept as an int column; `timestamps` (ms epochs) -> `timestamp`; `usetimes` kept as `usetime`).
        source: Name for messages.

    Returns:
        Raw rows: `user_id, order, item_id, skill_id, correct[, timestamp, usetime, fold], source_row`.
        `order` counts a student's answers across all of its rows (chunked files repeat the uid).

    Raises:
        InputValidationError: A required column is missing, or a row's lists differ in length.
    """
    if (
        "uid" not in table.columns
        or "responses" not in table.columns
        or not ({"concepts", "questions"} & set(table.columns))
    ):
        raise InputValidationError(
            f"{source}: expected pyKT columns 'uid', 'responses' and 'concepts' or 'questions'; "
            f"found {list(table.columns)}."
        )
    lists = [column for column in _PYKT_LISTS if column in table.columns]
    tokens: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    for column in lists:
        cells = table[column].fillna("").astype(str).tolist()
        split = [cell.split(",") if cell else [] for cell in cells]
        lengths[column] = np.fromiter((len(parts) for parts in split), dtype=np.int64, count=len(split))
        tokens[column] = np.array(list(itertools.chain.from_iterable(split)), dtype=object)
    reference = lengths["responses"]
    for column in lists:
        mismatch = np.flatnonzero(lengths[column] != reference)
        if len(mismatch):
            row = int(mismatch[0])
            raise InputValidationError(
                f"{source}: row {row + 1} (uid={table['uid'].iloc[row]!r}): '{column}' has "
                f"{lengths[column][row]} entries but 'responses' has {reference[row]}; expected lists of "
                "equal length. This row cannot be read; repair or remove it."
            )
    row_of = np.repeat(np.arange(len(table)), reference)
    responses = tokens["responses"]
    item_source = tokens["questions"] if "questions" in tokens else tokens["concepts"]
    keep = ~((responses == "-1") & (item_source == "-1"))
    raw = pd.DataFrame({"user_id": table["uid"].to_numpy()[row_of]})
    if "concepts" in tokens:
        raw["skill_id"] = pd.Series(tokens["concepts"], dtype="string").str.replace("_", SKILL_SEPARATOR)
    else:
        raw["skill_id"] = pd.Series(tokens["questions"], dtype="string")
    raw["item_id"] = pd.Series(item_source, dtype="string")
    if "concepts" in tokens and "questions" not in tokens:
        raw["item_id"] = raw["skill_id"]
    raw["correct"] = responses
    if "timestamps" in tokens:
        raw["timestamp"] = tokens["timestamps"]
    if "usetimes" in tokens:
        raw["usetime"] = pd.to_numeric(pd.Series(tokens["usetimes"]), errors="coerce")
    if "fold" in table.columns:
        raw["fold"] = pd.to_numeric(table["fold"], errors="coerce").astype("Int64").to_numpy()[row_of]
    raw["source_row"] = row_of + 1
    if "is_repeat" in tokens:
        raw["_repeat"] = tokens["is_repeat"] == "1"
    raw = raw.loc[keep].reset_index(drop=True)
    if "_repeat" in raw.columns:
        raw = _merge_pykt_repeats(raw)
    raw.insert(1, "order", raw.groupby("user_id", sort=False).cumcount().astype("int64"))
    return raw


def _merge_pykt_repeats(raw: pd.DataFrame) -> pd.DataFrame:
    """Fold `is_repeat` rows into the preceding question (pyKT expands one question per concept)."""
    question = (~raw["_repeat"]).cumsum()
    multi = question.duplicated(keep=False)
    if not multi.any():
        return raw.drop(columns="_repeat")
    joined = raw.loc[multi].groupby(question[multi], sort=False)["skill_id"].agg(SKILL_SEPARATOR.join)
    merged = raw.loc[multi & ~raw["_repeat"]].copy()
    merged["skill_id"] = joined.to_numpy()
    out = pd.concat([raw.loc[~multi], merged]).sort_index()
    return out.drop(columns="_repeat").reset_index(drop=True)


def parse_dkvmn(lines: Iterable[str], *, source: str = "<dkvmn>", user_prefix: str = "") -> pd.DataFrame:
    """Parse DKVMN 3-line records (count / skill ids / responses) into raw KC-level rows.

    A trailing comma on a list line (seen in other DKVMN-preprocessed datasets) is ignored.

    Args:
        lines: The file's lines.
        source: Name for messages.
        user_prefix: Prepended to the 1-based student number to form `user_id` (the format has no ids).

    Returns:
        Raw rows `user_id, order, item_id, skill_id, correct, source_row`; `item_id` = `skill_id` (the
        format has no problem ids); `source_row` = line number of the student's count line.

    Raises:
        InputValidationError: The line count is not a multiple of 3, a count is not an integer, or a
            list's length differs from its count.
    """
    text = [line.strip().rstrip(",") for line in lines]
    while text and not text[-1]:
        text.pop()
    if len(text) % 3:
        raise InputValidationError(
            f"{source}: {len(text)} non-empty lines; expected 3 lines per student (count, skill ids, "
            "responses). The file is truncated or not in the DKVMN format."
        )
    users: list[str] = []
    counts: list[int] = []
    skills: list[str] = []
    responses: list[str] = []
    rows: list[int] = []
    for student, start in enumerate(range(0, len(text), 3), start=1):
        count_line, skill_line, response_line = text[start : start + 3]
        if not count_line.isdigit():
            raise InputValidationError(
                f"{source}: line {start + 1}: got {count_line!r}; expected the student's number of "
                "interactions (an integer). The 3-line records are out of step."
            )
        count = int(count_line)
        student_skills = skill_line.split(",") if skill_line else []
        student_responses = response_line.split(",") if response_line else []
        if len(student_skills) != count or len(student_responses) != count:
            raise InputValidationError(
                f"{source}: lines {start + 1}-{start + 3}: count says {count} interactions but there are "
                f"{len(student_skills)} skill ids and {len(student_responses)} responses; expected equal."
            )
        users.append(f"{user_prefix}{student}")
        counts.append(count)
        skills.extend(student_skills)
        responses.extend(student_responses)
        rows.append(start + 1)
    raw = pd.DataFrame(
        {
            "user_id": pd.Series(np.repeat(np.array(users, dtype=object), counts), dtype="string"),
            "skill_id": pd.Series(skills, dtype="string").str.strip(),
            "correct": pd.Series(responses, dtype="string").str.strip(),
            "source_row": np.repeat(np.array(rows, dtype=np.int64), counts),
        }
    )
    raw.insert(1, "order", raw.groupby("user_id", sort=False).cumcount().astype("int64"))
    raw.insert(2, "item_id", raw["skill_id"])
    return raw


def estimate_multiskill_pairs(
    frame: pd.DataFrame, *, min_count: int = 50, min_agreement: float = 0.97
) -> frozenset[tuple[str, str]]:
    """Find the skill pairs that are really one multi-skill item expanded into consecutive rows.

    Over every transition between consecutive rows of one student with different skills, a pair
    (previous skill, next skill) counts as a multi-skill expansion when it occurs at least `min_count`
    times and both rows carry the same response in at least `min_agreement` of them (the expansion
    copies one response; genuinely separate items agree far less often). Estimate the pairs on training
    data and pass them unchanged to the test split.

    Args:
        frame: Canonical KC-level rows (one skill per row), in each student's order.
        min_count: Minimum occurrences of a pair.
        min_agreement: Minimum share of identical responses.

    Returns:
        The ordered pairs `(previous_skill, next_skill)`.
    """
    ordered = frame.sort_values(["user_id", "order"], kind="stable")
    same_user = ordered["user_id"].eq(ordered["user_id"].shift())
    previous = ordered["skill_id"].shift()
    transitions = same_user & previous.ne(ordered["skill_id"])
    pairs = pd.DataFrame(
        {
            "a": previous[transitions],
            "b": ordered["skill_id"][transitions],
            "same": ordered["correct"][transitions].eq(ordered["correct"].shift()[transitions]),
        }
    )
    stats = pairs.groupby(["a", "b"], sort=True)["same"].agg(["size", "mean"])
    chosen = stats[(stats["size"] >= min_count) & (stats["mean"] >= min_agreement)]
    logger.info(
        "multi-skill pairs: %d of %d pairs (count >= %d, agreement >= %.2f) cover %d transitions",
        len(chosen),
        len(stats),
        min_count,
        min_agreement,
        int(chosen["size"].sum()),
    )
    return frozenset((str(a), str(b)) for a, b in chosen.index)


def _natural_key(token: str) -> tuple[int, Any]:
    return (0, int(token)) if token.isdigit() else (1, token)


def regroup_multiskill(
    frame: pd.DataFrame, pairs: Collection[tuple[str, str]], *, conflict: ConflictPolicy = "first"
) -> pd.DataFrame:
    """Merge expanded multi-skill rows back into one interaction per item (the leak guard).

    Row t joins the group of row t-1 (same student) when `(skill[t-1], skill[t])` is in `pairs` and
    skill[t] is not already in the group (so `4,5,4,5` is two items {4,5}, not one). The group becomes one
    interaction: `skill_id` = its skills sorted and `|`-joined (`item_id` the same, since the format has
    no problem ids), `correct`/`order`/`source_row` from its first row, and `n_expanded_rows` = its size.
    The model then predicts the item once, before any of its rows' responses is visible.

    Args:
        frame: Canonical KC-level rows (one skill per row).
        pairs: Multi-skill pairs from `estimate_multiskill_pairs` (estimated on training data).
        conflict: What to do when a listed pair's two responses differ. `"first"` (default) merges anyway
            and keeps the first response: the grouping then never looks at a response, so the sequence
            structure cannot hint at a label (on assist2009 train this drops 29 of 224,218 responses).
            `"split"` (the literal rule in the dataset's SOURCE.md) keeps the two rows as two interactions
            and loses nothing, but then "4 then 5 as separate items" tells a model that the second
            response differs from the first - a small structural leak.

    Returns:
        Canonical rows in each student's order, with the extra column `n_expanded_rows`.

    Raises:
        ConfigError: `conflict` is not `"split"` or `"first"`.
    """
    if conflict not in ("split", "first"):
        raise ConfigError(f"conflict must be 'split' or 'first'; got {conflict!r}.")
    ordered = frame.sort_values(["user_id", "order"], kind="stable").reset_index(drop=True)
    skill = ordered["skill_id"].astype(str).to_numpy()
    user = ordered["user_id"].to_numpy()
    correct = ordered["correct"].to_numpy()
    n = len(ordered)
    candidate = np.zeros(n, dtype=bool)
    if n > 1:
        codes, uniques = pd.factorize(ordered["skill_id"].astype(str))
        code_of = {token: i for i, token in enumerate(uniques)}
        width = len(uniques)
        pair_codes = [code_of[a] * width + code_of[b] for a, b in pairs if a in code_of and b in code_of]
        candidate[1:] = (user[1:] == user[:-1]) & np.isin(codes[:-1] * width + codes[1:], pair_codes)
        if conflict == "split":
            candidate[1:] &= correct[1:] == correct[:-1]
    # A group may not hold a skill twice: walk only the joined rows (about 15%) in Python.
    joins = candidate.copy()
    members: set[str] = set()
    for t in np.flatnonzero(candidate):
        if not candidate[t - 1]:
            members = {skill[t - 1]}
        if skill[t] in members:
            joins[t] = False
            members = {skill[t]}
        else:
            members.add(skill[t])
    starts = np.flatnonzero(~joins)
    sizes = np.diff(np.append(starts, n))
    n_conflicts = int((joins[1:] & (correct[1:] != correct[:-1])).sum()) if n > 1 else 0
    if n_conflicts:
        logger.warning(
            "regroup_multiskill: %d merged row(s) had a different response; kept the first", n_conflicts
        )
    out = ordered.iloc[starts].copy()
    out["n_expanded_rows"] = sizes.astype("int64")
    multi = np.flatnonzero(sizes > 1)
    if len(multi):
        names = ordered["skill_name"].fillna("").astype(str).to_numpy()
        has_names = ordered["skill_name"].notna().any()
        joined_ids, joined_names = [], []
        for start, size in zip(starts[multi], sizes[multi], strict=True):
            members_order = sorted(range(start, start + size), key=lambda i: _natural_key(skill[i]))
            joined_ids.append(SKILL_SEPARATOR.join(skill[i] for i in members_order))
            joined_names.append(SKILL_SEPARATOR.join(names[i] for i in members_order))
        columns = [out.columns.get_loc("skill_id"), out.columns.get_loc("item_id")]
        out.iloc[multi, columns[0]] = joined_ids
        out.iloc[multi, columns[1]] = joined_ids
        if has_names:
            out.iloc[multi, out.columns.get_loc("skill_name")] = joined_names
    logger.info("regroup_multiskill: %d rows -> %d interactions", n, len(out))
    return out.reset_index(drop=True)


ASSISTMENTS_COLUMNS: dict[str, str] = {
    "order_id": "order",
    "problem_id": "item_id",
    "ms_first_response": "response_time_ms",
}
"""ASSISTments column -> canonical column (`user_id`, `skill_id`, `skill_name`, `correct`,
`attempt_count` keep their names)."""


_MULTI_ID = re.compile(r"^\d+(_\d+)+$")


def assistments_to_raw(table: pd.DataFrame, *, source: str = "<assistments>") -> pd.DataFrame:
    """Rename ASSISTments columns to canonical names (pure; one row per source row, values untouched).

    Args:
        table: The export as read (strings).
        source: Name for messages.

    Returns:
        Raw rows with canonical names; `_`-joined skill ids (`"10_13"`, some releases) become `"10|13"`.

    Raises:
        InputValidationError: A required ASSISTments column is missing.
    """
    needed = ["order_id", "user_id", "problem_id", "skill_id", "correct"]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise InputValidationError(
            f"{source}: missing ASSISTments column(s) {missing}; found {list(table.columns)}. Expected the "
            "skill-builder export (order_id, user_id, problem_id, skill_id, skill_name, correct, ...)."
        )
    raw = table.rename(columns=ASSISTMENTS_COLUMNS)
    skill = raw["skill_id"].astype("string").str.strip()
    raw["skill_id"] = skill.where(
        ~skill.str.fullmatch(_MULTI_ID).fillna(False), skill.str.replace("_", SKILL_SEPARATOR)
    )
    return raw


def merge_multiskill_rows(frame: pd.DataFrame, *, source: str = "<frame>") -> tuple[pd.DataFrame, pd.Series]:
    """Merge canonical rows that share `(user_id, order)` into one interaction with several skills.

    ASSISTments repeats an answer once per skill of its problem (same `order_id`); exact repeats of a
    skill are dropped. The merged row keeps the first row's values, `skill_id`/`skill_name` list every
    distinct skill in row order.

    Args:
        frame: Canonical rows.
        source: Name for messages.

    Returns:
        (merged canonical rows in source order, `source_row`s of rows whose group disagrees on `item_id`
        or `correct`; those groups are removed from the output).
    """
    key = ["user_id", "order"]
    shared = frame.duplicated(key, keep=False)
    if not shared.any():
        return frame, pd.Series([], dtype="int64")
    multi = frame.loc[shared].drop_duplicates([*key, "skill_id"])
    grouped = multi.groupby(key, sort=False)
    disagree = (grouped["item_id"].transform("nunique") > 1) | (grouped["correct"].transform("nunique") > 1)
    bad_rows = frame.loc[shared].merge(multi.loc[disagree, key].drop_duplicates(), on=key)["source_row"]
    multi = multi.loc[~disagree]
    grouped = multi.groupby(key, sort=False)
    merged = grouped.first().reset_index()
    merged["skill_id"] = grouped["skill_id"].agg(SKILL_SEPARATOR.join).to_numpy()
    if multi["skill_name"].notna().any():
        merged["skill_name"] = (
            grouped["skill_name"].agg(lambda s: SKILL_SEPARATOR.join(s.fillna("").astype(str))).to_numpy()
        )
    merged["source_row"] = grouped["source_row"].min().to_numpy()
    out = pd.concat([frame.loc[~shared], merged[frame.columns]], ignore_index=True)
    out = out.astype(frame.dtypes.to_dict()).sort_values("source_row", kind="stable").reset_index(drop=True)
    logger.info("%s: merged %d multi-skill rows into %d interactions", source, int(shared.sum()), len(merged))
    return out, bad_rows.astype("int64")

"""Batched recommendation ranking: arrays in, ranked item indices out, for one student or thousands.

`service.recommend` (one student, with reasons for the tutor) and the simulated-learner benchmark (a
cohort stepped together) share this code, so the benchmark measures the recommender the product runs.

The rule, per student:

1. Eligible items: predicted success inside the target band, on a skill whose prerequisites are all
   mastered (the prerequisite frontier), not the item just answered. A prerequisite counts as mastered
   when its predicted mastery reaches the prerequisite threshold (`PREREQUISITE_THRESHOLD`, a margin above
   the mastery threshold because predicted mastery is an estimate) or when the student has demonstrated
   it: at least `required` of their last `window` answers on it correct (`mastery_evidence`, the N-of-M
   rule of mastery-learning tutors such as ASSISTments' skill builders).
2. Tiers: gap skills (below the mastery threshold, and a target skill or a prerequisite of one, directly
   or not) not yet demonstrated, then the other skills tied to the targets, then demonstrated skills
   (reinforcement), then the rest.
3. Within a tier, skills practised fewer times among the last answers first (interleaved rather than
   blocked practice), then the most urgent gap (`gap_scores`) or, outside the gaps, the least mastered
   skill, then the item whose predicted success is closest to the band's centre.
4. At most `per_skill` items per skill.

Why the evidence rule: a knowledge tracer trained on ordinary practice logs credits a run of correct
answers on one skill slowly (on the simulated learners of `bench/education_recommend_bench.py` the
predicted mastery of a skill practised 6-10 times in a session lags the true success rate by about 0.06),
so without it the recommender keeps a student on skills they have already learnt and keeps the skills
that depend on them locked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

from core.errors import ConfigError, InputValidationError

if TYPE_CHECKING:
    from apps.education.graph import PrerequisiteGraph
    from apps.education.predictor import KnowledgeTracer


@dataclass(frozen=True)
class SkillIndex:
    """The model's skills and items as arrays, with the prerequisite graph over them (build once, reuse).

    Attributes:
        skills: Skill ids (K,), the model's skill vocabulary order (`StudentState.mastery.index`).
        items: Item ids (I,), the model's item vocabulary order (`StudentState.item_p.index`).
        item_skill: Index into `skills` of each item's skill, -1 when unknown, int64 (I,).
        prerequisites: Direct prerequisites of each skill as indices into `skills`, padded with K (a
            column that always reads as mastered), int64 (K, P).
        ancestors: `ancestors[t, s]` is True when s is a prerequisite of t, directly or not, bool (K, K).
    """

    skills: pd.Index
    items: pd.Index
    item_skill: np.ndarray
    prerequisites: np.ndarray
    ancestors: np.ndarray

    @classmethod
    def build(cls, tracer: KnowledgeTracer, graph: Optional[PrerequisiteGraph] = None) -> SkillIndex:
        """Index a fitted tracer's vocabularies and, when given, a prerequisite graph (skills of the graph
        that the model never saw are ignored)."""
        skills = pd.Index(tracer.skill_vocab_.tokens, name="skill_id")
        items = pd.Index(tracer.item_vocab_.tokens, name="item_id")
        item_skill = np.where(tracer.item_skill_[2:] >= 2, tracer.item_skill_[2:] - 2, -1).astype(np.int64)
        k = len(skills)
        lists: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * k
        ancestors = np.zeros((k, k), dtype=bool)
        if graph is not None:
            for row, skill in enumerate(skills):
                if skill not in graph:
                    continue
                direct = skills.get_indexer(graph.prerequisites(skill))
                lists[row] = direct[direct >= 0]
                every = skills.get_indexer(graph.ancestors(skill))
                ancestors[row, every[every >= 0]] = True
        width = max([len(p) for p in lists] + [1])
        prerequisites = np.full((k, width), k, dtype=np.int64)
        for row, direct in enumerate(lists):
            prerequisites[row, : len(direct)] = direct
        return cls(skills, items, item_skill, prerequisites, ancestors)

    def ready(
        self, mastery: np.ndarray, threshold: float, demonstrated: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """(S, K) True where every prerequisite of the skill has mastery >= threshold or, when given,
        was demonstrated (`demonstrated`, (S, K) bool, see `mastery_evidence`)."""
        qualified = mastery >= threshold
        if demonstrated is not None:
            qualified = qualified | demonstrated
        padded = np.concatenate([qualified, np.ones((len(mastery), 1), dtype=bool)], axis=1)  # (S, K + 1)
        return padded[:, self.prerequisites].all(axis=2)

    def relevant(self, targets: np.ndarray) -> np.ndarray:
        """(S, K) True for each target skill and every prerequisite of one, directly or not."""
        return targets | ((targets.astype(np.int32) @ self.ancestors.astype(np.int32)) > 0)


def gap_scores(
    mastery: np.ndarray,
    targets: np.ndarray,
    index: SkillIndex,
    *,
    threshold: float,
    attention: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Urgency of each knowledge gap, `(threshold - mastery) * (1 + 4 * attention)`, NaN for non-gaps.

    Args:
        mastery: Predicted mastery (S, K).
        targets: Target skills (S, K) bool.
        index: The skill index.
        threshold: Mastery below which a skill is a gap.
        attention: Share of the latest state's attention on recent errors tied to each skill (S, K).

    Returns:
        float64 (S, K).
    """
    gap = index.relevant(targets) & (mastery < threshold)
    weight = 1.0 + 4.0 * (attention if attention is not None else 0.0)
    return np.where(gap, (threshold - mastery) * weight, np.nan)


def rank_items(
    item_p: np.ndarray,
    mastery: np.ndarray,
    index: SkillIndex,
    *,
    gaps: np.ndarray,
    band: tuple[float, float],
    prerequisite_threshold: float,
    k: int,
    last_item: Optional[np.ndarray] = None,
    relevant: Optional[np.ndarray] = None,
    recent: Optional[np.ndarray] = None,
    demonstrated: Optional[np.ndarray] = None,
    per_skill: int = 2,
) -> np.ndarray:
    """The best `k` eligible items per student (see the module docstring for the rule).

    Args:
        item_p: Predicted success of every item (S, I), columns `index.items`.
        mastery: Predicted mastery (S, K), columns `index.skills`.
        index: The skill index.
        gaps: Gap urgency (S, K), NaN where the skill is no gap (`gap_scores`).
        band: (low, high) predicted success.
        prerequisite_threshold: Predicted mastery every prerequisite of a recommended skill needs.
        k: Items per student.
        last_item: Index of each student's last answered item, -1 for none (S,).
        relevant: Skills tied to the student's targets (S, K) bool (`SkillIndex.relevant`); None puts
            every non-gap skill in one tier.
        recent: How often each skill was practised among the student's last answers (S, K) int.
        demonstrated: Skills the student has shown they master from their own answers (S, K) bool
            (`mastery_evidence`): they count as mastered prerequisites and rank after the other skills
            tied to the targets. None: predicted mastery alone decides.
        per_skill: Most items of one skill among the k.

    Returns:
        int64 (S, k) item indices, best first, padded with -1 where fewer items are eligible.

    Raises:
        ConfigError: `k < 1` or an invalid band.
        InputValidationError: Arrays whose shapes disagree with the index.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1; got {k}.")
    if not 0.0 <= band[0] < band[1] <= 1.0:
        raise ConfigError(f"band: expected 0 <= low < high <= 1; got {band}.")
    n_students, n_items = item_p.shape
    if n_items != len(index.items) or mastery.shape != (n_students, len(index.skills)):
        raise InputValidationError(
            f"rank_items: expected item_p (S, {len(index.items)}) and mastery (S, {len(index.skills)}); "
            f"got {item_p.shape} and {mastery.shape}."
        )
    if demonstrated is not None and demonstrated.shape != mastery.shape:
        raise InputValidationError(
            f"rank_items: expected demonstrated of shape {mastery.shape} like mastery; got {demonstrated.shape}."
        )
    skill = np.where(index.item_skill >= 0, index.item_skill, 0)  # (I,)
    eligible = (item_p >= band[0]) & (item_p <= band[1]) & (index.item_skill >= 0)[None, :]
    eligible &= index.ready(mastery, prerequisite_threshold, demonstrated)[:, skill]
    if last_item is not None:
        students = np.flatnonzero(last_item >= 0)
        eligible[students, last_item[students]] = False
    urgency = gaps[:, skill]  # (S, I), NaN for items of non-gap skills
    tier = np.where(np.isnan(urgency), 1, 0)  # gap skills first, then the other skills tied to the targets
    if demonstrated is not None:
        tier = np.where(demonstrated[:, skill], 2, tier)  # then skills the student has just shown they master
    if relevant is not None:
        tier = np.where(np.isnan(urgency) & ~relevant[:, skill], 3, tier)  # then the rest
    practised = recent[:, skill] if recent is not None else np.zeros_like(tier)
    priority = np.where(np.isnan(urgency), mastery[:, skill], -urgency)  # urgent gap / least mastered first
    centre = (band[0] + band[1]) / 2.0
    # Sort keys, most significant last: eligible, tier, less practised lately, priority, nearer the centre.
    order = np.lexsort((np.abs(item_p - centre), priority, practised, tier, ~eligible), axis=-1)  # (S, I)
    out = np.full((n_students, k), -1, dtype=np.int64)
    n_eligible = eligible.sum(axis=1)
    for s in range(n_students):
        taken: dict[int, int] = {}
        filled = 0
        for item in order[s, : n_eligible[s]]:
            sk = int(skill[item])
            if taken.get(sk, 0) >= per_skill:
                continue
            taken[sk] = taken.get(sk, 0) + 1
            out[s, filled] = item
            filled += 1
            if filled == k:
                break
    return out


def recent_practice(skill_history: np.ndarray, n_skills: int, window: int) -> np.ndarray:
    """(S, K) counts of each skill among each student's last `window` answers.

    Args:
        skill_history: Skill index of each answer, oldest first, -1 for none or unknown (S, T).
        n_skills: K.
        window: How many of the last answers count.
    """
    last = skill_history[:, -window:] if window > 0 else skill_history[:, :0]
    counts = np.zeros((len(last), n_skills + 1), dtype=np.int64)
    rows = np.repeat(np.arange(len(last)), last.shape[1])
    np.add.at(counts, (rows, np.where(last >= 0, last, n_skills).ravel()), 1)
    return counts[:, :n_skills]


def mastery_evidence(
    skill_history: np.ndarray, correct: np.ndarray, n_skills: int, *, required: int, window: int
) -> np.ndarray:
    """(S, K) True where at least `required` of the student's last `window` answers on the skill were correct.

    Args:
        skill_history: Skill index of each answer, oldest first, -1 for none or unknown (S, T).
        correct: 1 for a correct answer, 0 otherwise (S, T), aligned with `skill_history`.
        n_skills: K.
        required: Correct answers needed (N of the N-of-M rule).
        window: How many of the latest answers on each skill count (M).

    Raises:
        ConfigError: `required` outside [1, window].
        InputValidationError: `correct` and `skill_history` of different shapes.
    """
    if not 1 <= required <= window:
        raise ConfigError(f"mastery evidence: expected 1 <= required <= window; got {required} of {window}.")
    if np.shape(correct) != np.shape(skill_history):
        raise InputValidationError(
            f"mastery_evidence: correct {np.shape(correct)} and skill_history {np.shape(skill_history)} "
            "must have the same shape."
        )
    n_students, n_steps = skill_history.shape
    rows = np.arange(n_students)
    seen = np.zeros((n_students, n_skills + 1), dtype=np.int64)  # column K collects unknown skills
    right = np.zeros((n_students, n_skills + 1), dtype=np.int64)
    for t in range(n_steps - 1, -1, -1):  # newest first, so each skill counts its latest `window` answers
        column = np.where(skill_history[:, t] >= 0, skill_history[:, t], n_skills)
        counts = seen[rows, column] < window
        seen[rows, column] += counts
        right[rows, column] += counts & (np.asarray(correct[:, t]) == 1)
    return right[:, :n_skills] >= required

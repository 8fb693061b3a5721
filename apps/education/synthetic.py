"""Simulated learners on a prerequisite DAG of named skills: a data generator and a step-by-step environment.

The learner model is a BKT/IRT hybrid. Student s has a latent ability theta[s, k] (logits) per skill k;
its true mastery is `sigmoid(theta)`. For an item i of skill k with difficulty b_i:

    readiness[s, k] = min over prerequisites p of k of mastery[s, p]          (1 for a root skill)
    gate[s, k]      = sigmoid(gate_sharpness * (readiness - mastery_threshold))
    p_know          = sigmoid(theta[s, k] - prerequisite_penalty * (1 - gate) - b_i)      (IRT, 1PL)
    P(correct)      = guess + (1 - slip - guess) * p_know                                  (BKT slip/guess)

so a skill is hard until its prerequisites are mastered. After each answer the student learns (BKT's
learning transition, in logit space and continuous):

    theta[s, k] += learn_rate * rate_s * gate * (1 if correct else wrong_answer_learning)
                   * ((1 - zpd_weight) + zpd_weight * 4 * p_know * (1 - p_know))

Learning is slow while prerequisites are unmastered (the gate) and fastest on items of about 50% success
(the zone of proximal development term). Responses are sampled from counter-based random numbers keyed by
(seed, student, answer number), so a student's outcomes do not depend on how calls are interleaved across
students: under one seed, the same student answering the same items gets the same responses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import pandas as pd

from apps.education.graph import EDGE_COLUMNS, PrerequisiteGraph
from core.errors import ConfigError, InputValidationError

logger = logging.getLogger(__name__)

# A hand-made maths prerequisite map, listed in a topological order (every prerequisite comes earlier), so
# any prefix of a topological order of it is closed under prerequisites.
MATH_SKILLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("counting", "Counting", ()),
    ("addition", "Addition", ("counting",)),
    ("subtraction", "Subtraction", ("addition",)),
    ("place_value", "Place Value", ("counting",)),
    ("multiplication", "Multiplication", ("addition",)),
    ("division", "Division", ("multiplication", "subtraction")),
    ("fractions", "Fractions", ("division",)),
    ("decimals", "Decimals", ("place_value", "fractions")),
    ("negative_numbers", "Negative Numbers", ("subtraction",)),
    ("order_of_operations", "Order of Operations", ("multiplication", "division")),
    ("percents", "Percents", ("decimals",)),
    ("ratios", "Ratios and Proportions", ("fractions",)),
    ("exponents", "Exponents", ("multiplication",)),
    ("perimeter", "Perimeter", ("addition",)),
    ("area", "Area", ("multiplication", "perimeter")),
    ("variables", "Variables and Expressions", ("order_of_operations", "negative_numbers")),
    ("one_step_equations", "One-Step Equations", ("variables",)),
    ("two_step_equations", "Two-Step Equations", ("one_step_equations",)),
    ("square_roots", "Square Roots", ("exponents",)),
    ("volume", "Volume", ("area",)),
    ("probability", "Probability", ("fractions",)),
    ("mean_median_mode", "Mean, Median and Mode", ("division",)),
    ("inequalities", "Inequalities", ("two_step_equations",)),
    ("linear_functions", "Linear Functions", ("two_step_equations",)),
    ("slope", "Slope", ("linear_functions", "ratios")),
    ("pythagorean_theorem", "Pythagorean Theorem", ("square_roots", "area")),
    ("systems_of_equations", "Systems of Equations", ("linear_functions",)),
    ("polynomials", "Polynomials", ("exponents", "variables")),
    ("factoring", "Factoring", ("polynomials",)),
    ("quadratic_equations", "Quadratic Equations", ("factoring", "square_roots")),
)


@dataclass(frozen=True)
class LearnerConfig:
    """Parameters of the simulated learners (see the module docstring for the equations).

    Attributes:
        slip: P(wrong | knows the item).
        guess: P(correct | does not know the item).
        learn_rate: Mean logit gain per practised item with prerequisites met.
        learn_rate_spread: Standard deviation of the log of each student's learning-rate multiplier.
        wrong_answer_learning: Share of the gain after a wrong answer (feedback still teaches).
        zpd_weight: How much learning depends on the item being neither too easy nor too hard (0..1).
        initial_ability_mean: Mean initial logit ability on a root skill.
        student_ability_sd: Standard deviation of a student's general ability (shared by all skills).
        skill_ability_sd: Standard deviation of the per-skill deviation from it.
        depth_penalty: Initial logits lost per level of prerequisite depth.
        item_difficulty_sd: Standard deviation of item difficulty (logits).
        mastery_threshold: Mastery (0..1) at which a skill counts as mastered.
        prerequisite_penalty: Logits lost on a skill whose prerequisites are unmastered.
        gate_sharpness: Steepness of the prerequisite gate around `mastery_threshold`.
    """

    slip: float = 0.1
    guess: float = 0.2
    learn_rate: float = 0.5
    learn_rate_spread: float = 0.3
    wrong_answer_learning: float = 0.5
    zpd_weight: float = 0.5
    initial_ability_mean: float = 1.5
    student_ability_sd: float = 0.8
    skill_ability_sd: float = 0.5
    depth_penalty: float = 0.5
    item_difficulty_sd: float = 0.6
    mastery_threshold: float = 0.7
    prerequisite_penalty: float = 3.0
    gate_sharpness: float = 15.0

    def __post_init__(self) -> None:
        for name in ("slip", "guess", "wrong_answer_learning", "zpd_weight", "mastery_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"LearnerConfig.{name}: expected a value in [0, 1]; got {value}.")
        if self.slip + self.guess >= 1.0:
            raise ConfigError(
                f"LearnerConfig: slip + guess must be below 1 (else answers carry no signal); "
                f"got {self.slip} + {self.guess}."
            )
        non_negative = (
            "learn_rate",
            "learn_rate_spread",
            "student_ability_sd",
            "skill_ability_sd",
            "item_difficulty_sd",
            "prerequisite_penalty",
            "gate_sharpness",
            "depth_penalty",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"LearnerConfig.{name}: expected a value >= 0; got {getattr(self, name)}.")


def generate_skill_graph(n_skills: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A prerequisite DAG of named maths skills.

    Up to 30 skills come from `MATH_SKILLS`: the first `n_skills` of a random topological order of that
    map, so the set is closed under prerequisites and varies with the random state. Further skills are
    `skill_31`, ... ("Skill 31"), each with one or two random earlier skills as prerequisites.

    Args:
        n_skills: Number of skills (>= 1).
        rng: Random state.

    Returns:
        (skills: `skill_id, skill_name, depth`, in topological order; edges: `prerequisite_skill, skill`).

    Raises:
        ConfigError: `n_skills < 1`.
    """
    if n_skills < 1:
        raise ConfigError(f"n_skills must be at least 1; got {n_skills}.")
    prerequisites = {skill_id: prereqs for skill_id, _, prereqs in MATH_SKILLS}
    names = {skill_id: name for skill_id, name, _ in MATH_SKILLS}
    chosen: list[str] = []
    remaining = [skill_id for skill_id, _, _ in MATH_SKILLS]
    while remaining and len(chosen) < n_skills:
        ready = [s for s in remaining if all(p in chosen for p in prerequisites[s])]
        pick = ready[int(rng.integers(len(ready)))]
        chosen.append(pick)
        remaining.remove(pick)
    edges = [(p, s) for s in chosen for p in prerequisites[s]]
    for number in range(len(chosen) + 1, n_skills + 1):
        skill_id = f"skill_{number}"
        recent = chosen[-min(len(chosen), 6) :]
        picks = rng.choice(len(recent), size=min(len(recent), int(rng.integers(1, 3))), replace=False)
        edges.extend((recent[int(i)], skill_id) for i in sorted(picks))
        names[skill_id] = f"Skill {number}"
        chosen.append(skill_id)
    edge_frame = pd.DataFrame(edges, columns=list(EDGE_COLUMNS), dtype="string")
    graph = PrerequisiteGraph.from_edges(edge_frame, skills=chosen, source="<generated graph>")
    depth = graph.depth()
    skills = pd.DataFrame(
        {
            "skill_id": pd.Series(chosen, dtype="string"),
            "skill_name": pd.Series([names[s] for s in chosen], dtype="string"),
            "depth": np.array([depth[s] for s in chosen], dtype=np.int64),
        }
    )
    return skills, edge_frame


def generate_items(
    skills: pd.DataFrame, items_per_skill: int, rng: np.random.Generator, config: LearnerConfig
) -> pd.DataFrame:
    """Items for each skill with IRT difficulties.

    Returns:
        `item_id` (`"<skill_id>/<n>"`), `skill_id`, `difficulty` (logits, float64), grouped by skill.
    """
    if items_per_skill < 1:
        raise ConfigError(f"items_per_skill must be at least 1; got {items_per_skill}.")
    skill_ids = np.repeat(skills["skill_id"].to_numpy(dtype=object), items_per_skill)
    numbers = np.tile(np.arange(1, items_per_skill + 1), len(skills))
    return pd.DataFrame(
        {
            "item_id": pd.Series(
                [f"{s}/{n}" for s, n in zip(skill_ids, numbers, strict=True)], dtype="string"
            ),
            "skill_id": pd.Series(skill_ids, dtype="string"),
            "difficulty": rng.normal(0.0, config.item_difficulty_sd, size=len(skill_ids)),
        }
    )


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective scramble of uint64 values."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, student: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers keyed by (seed, student, counter): order-independent randomness."""
    key = _mix64(np.full(student.shape, seed, dtype=np.uint64) ^ _mix64(student.astype(np.uint64)))
    bits = _mix64(key ^ counter.astype(np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class LearnerSimulator:
    """A cohort of simulated learners to answer items step by step (the recommendation environment).

    Example:
        >>> sim = LearnerSimulator(skills, edges, items, n_students=100, seed=0)
        >>> response = sim.answer(0, "fractions/3")        # sample, then learn
        >>> sim.mastery(0)                                  # true mastery per skill, shape (K,)

    Args:
        skills: `skill_id` (and optionally `skill_name`) per skill, K rows.
        edges: Prerequisite edges `prerequisite_skill, skill` over those skills (validated as a DAG).
        items: `item_id`, `skill_id`, `difficulty` (logits), one row per item.
        n_students: Cohort size S.
        config: Learner parameters.
        seed: Seeds the initial abilities, learning rates and every sampled response.
        initial_ability: Optional logits, shape (S, K), replacing the sampled initial abilities.
    """

    def __init__(
        self,
        skills: pd.DataFrame,
        edges: pd.DataFrame,
        items: pd.DataFrame,
        *,
        n_students: int,
        config: Optional[LearnerConfig] = None,
        seed: int = 0,
        initial_ability: Optional[np.ndarray] = None,
    ) -> None:
        if seed < 0:
            raise ConfigError(f"seed must be a non-negative integer; got {seed}.")
        self.config = config or LearnerConfig()
        self.seed = int(seed)
        self.skill_ids = pd.Index(skills["skill_id"].astype(str), name="skill_id")
        self.graph = PrerequisiteGraph.from_edges(edges, skills=self.skill_ids, source="<simulator edges>")
        self.item_ids = pd.Index(items["item_id"].astype(str), name="item_id")
        if not self.item_ids.is_unique:
            raise InputValidationError("LearnerSimulator: item_id values must be unique.")
        item_skill = self.skill_ids.get_indexer(items["skill_id"].astype(str))
        if (item_skill < 0).any():
            bad = items["skill_id"].astype(str)[item_skill < 0].iloc[0]
            raise InputValidationError(
                f"LearnerSimulator: item skill {bad!r} is not among the {len(self.skill_ids)} skills."
            )
        self.item_skill = item_skill.astype(np.int64)
        self.item_difficulty = items["difficulty"].to_numpy(dtype=np.float64)
        k = len(self.skill_ids)
        prereq_lists = [self.skill_ids.get_indexer(self.graph.prerequisites(s)) for s in self.skill_ids]
        width = max((len(p) for p in prereq_lists), default=0)
        # (K, P) prerequisite indices padded with k; index k reads a constant mastery of 1 (no prerequisite).
        self._prereq = np.full((k, max(width, 1)), k, dtype=np.int64)
        for row, prereqs in enumerate(prereq_lists):
            self._prereq[row, : len(prereqs)] = prereqs
        depth = self.graph.depth()
        self.skill_depth = np.array([depth[s] for s in self.skill_ids], dtype=np.int64)

        if n_students < 1:
            raise ConfigError(f"n_students must be at least 1; got {n_students}.")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1]))
        c = self.config
        if initial_ability is None:
            general = rng.normal(0.0, c.student_ability_sd, size=(n_students, 1))
            specific = rng.normal(0.0, c.skill_ability_sd, size=(n_students, k))
            initial_ability = c.initial_ability_mean + general + specific - c.depth_penalty * self.skill_depth
        initial_ability = np.asarray(initial_ability, dtype=np.float64)
        if initial_ability.shape != (n_students, k):
            raise ConfigError(
                f"initial_ability: expected shape {(n_students, k)}; got {initial_ability.shape}."
            )
        self.theta = initial_ability.copy()  # (S, K) logits
        self.rate = np.exp(rng.normal(0.0, c.learn_rate_spread, size=n_students))  # (S,)
        self.n_answers = np.zeros(n_students, dtype=np.int64)
        self.user_ids = pd.Index([f"learner_{i + 1:05d}" for i in range(n_students)], name="user_id")

    @property
    def n_students(self) -> int:
        """Cohort size S."""
        return len(self.user_ids)

    def _students(self, student: Union[int, str, np.ndarray, list]) -> np.ndarray:
        values = np.atleast_1d(np.asarray(student))
        if values.dtype.kind in "iu":
            index = values.astype(np.int64)
            bad = (index < 0) | (index >= self.n_students)
        else:
            index = self.user_ids.get_indexer(values.astype(str))
            bad = index < 0
        if bad.any():
            raise InputValidationError(
                f"unknown student {values[bad][0].item()!r}; expected an index in [0, {self.n_students}) or a "
                f"user id such as {self.user_ids[0]!r}."
            )
        return index

    def _items(self, item: Union[int, str, np.ndarray, list]) -> np.ndarray:
        values = np.atleast_1d(np.asarray(item))
        if values.dtype.kind in "iu":
            index = values.astype(np.int64)
            bad = (index < 0) | (index >= len(self.item_ids))
        else:
            index = self.item_ids.get_indexer(values.astype(str))
            bad = index < 0
        if bad.any():
            raise InputValidationError(
                f"unknown item {values[bad][0].item()!r}; expected an index in [0, {len(self.item_ids)}) or an "
                f"item id such as {self.item_ids[0]!r}."
            )
        return index

    def mastery(self, student: Union[int, str, np.ndarray, list, None] = None) -> np.ndarray:
        """True mastery `sigmoid(theta)`: shape (K,) for one student, (n, K) for several, (S, K) for None."""
        if student is None:
            return _sigmoid(self.theta)
        index = self._students(student)
        values = _sigmoid(self.theta[index])
        return values[0] if np.ndim(student) == 0 else values

    def mastery_frame(self) -> pd.DataFrame:
        """True mastery of every student (rows, `user_id`) on every skill (columns, `skill_id`)."""
        return pd.DataFrame(self.mastery(), index=self.user_ids, columns=self.skill_ids)

    def _state(self, students: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(skill index, prerequisite gate, p_know) for each (student, item) pair."""
        c = self.config
        skill = self.item_skill[items]
        mastery = np.concatenate([_sigmoid(self.theta[students]), np.ones((len(students), 1))], axis=1)
        readiness = np.take_along_axis(mastery, self._prereq[skill], axis=1).min(axis=1)
        gate = _sigmoid(c.gate_sharpness * (readiness - c.mastery_threshold))
        logit = (
            self.theta[students, skill] - c.prerequisite_penalty * (1.0 - gate) - self.item_difficulty[items]
        )
        return skill, gate, _sigmoid(logit)

    def p_correct(
        self, student: Union[int, str, np.ndarray, list], item: Union[int, str, np.ndarray, list]
    ) -> np.ndarray:
        """True probability of a correct answer now, without answering (no state change).

        Args:
            student: Student index/id, or an array of them (n,).
            item: Item index/id, or an array (n,) paired with `student`.

        Returns:
            float64, shape (n,).
        """
        students, items = np.broadcast_arrays(self._students(student), self._items(item))
        _, _, p_know = self._state(students, items)
        c = self.config
        return c.guess + (1.0 - c.slip - c.guess) * p_know

    def answer(
        self, student: Union[int, str, np.ndarray, list], item: Union[int, str, np.ndarray, list]
    ) -> Union[int, np.ndarray]:
        """Let students answer items: sample each response, then update the latent ability.

        Pairs naming the same student more than once are applied in order.

        Args:
            student: Student index/id, or an array of them (n,).
            item: Item index/id, or an array (n,) paired with `student`.

        Returns:
            The responses (1 = correct): an int for scalar input, else int8 of shape (n,).

        Raises:
            InputValidationError: An unknown student or item.
        """
        students, items = np.broadcast_arrays(self._students(student), self._items(item))
        responses = np.empty(len(students), dtype=np.int8)
        occurrence = pd.Series(students).groupby(students).cumcount().to_numpy()
        for round_ in range(int(occurrence.max()) + 1 if len(students) else 0):
            pick = np.flatnonzero(occurrence == round_)
            responses[pick] = self._answer_once(students[pick], items[pick])
        if np.ndim(student) == 0 and np.ndim(item) == 0:
            return int(responses[0])
        return responses

    def _answer_once(self, students: np.ndarray, items: np.ndarray) -> np.ndarray:
        c = self.config
        skill, gate, p_know = self._state(students, items)
        p = c.guess + (1.0 - c.slip - c.guess) * p_know
        correct = _uniform(self.seed, students, self.n_answers[students]) < p
        self.n_answers[students] += 1
        zpd = (1.0 - c.zpd_weight) + c.zpd_weight * 4.0 * p_know * (1.0 - p_know)
        gain = (
            c.learn_rate * self.rate[students] * gate * zpd * np.where(correct, 1.0, c.wrong_answer_learning)
        )
        self.theta[students, skill] += gain
        return correct.astype(np.int8)


@dataclass(frozen=True)
class SimulationTruth:
    """What generated a synthetic data set: the world, and every learner's latent mastery over time.

    Attributes:
        skills: `skill_id, skill_name, depth`, K rows in topological order.
        items: `item_id, skill_id, difficulty`.
        edges: Prerequisite edges `prerequisite_skill, skill`.
        user_ids: Student ids, shape (S,).
        mastery: True mastery before each interaction and after the last, float32, shape (S, T + 1, K);
            `mastery[s, t]` is what student s knew when answering interaction t.
        p_correct: True probability of each generated response, float32, shape (S * T,), aligned with the
            interaction rows.
        config: The learner parameters.
        seed: The seed.
    """

    skills: pd.DataFrame
    items: pd.DataFrame
    edges: pd.DataFrame
    user_ids: np.ndarray
    mastery: np.ndarray
    p_correct: np.ndarray
    config: LearnerConfig = field(default_factory=LearnerConfig)
    seed: int = 0

    def final_mastery(self) -> pd.DataFrame:
        """Mastery after the last interaction: students (rows) x skills (columns)."""
        return pd.DataFrame(self.mastery[:, -1], index=self.user_ids, columns=self.skills["skill_id"])

    def simulator(self, *, n_students: int, seed: int) -> LearnerSimulator:
        """A fresh cohort of learners in the same world (skills, prerequisites, items, parameters)."""
        return LearnerSimulator(
            self.skills, self.edges, self.items, n_students=n_students, config=self.config, seed=seed
        )


def generate(
    students: int = 200,
    skills: int = 12,
    items_per_skill: int = 10,
    interactions_per_student: int = 60,
    seed: int = 0,
    *,
    config: Optional[LearnerConfig] = None,
    explore: float = 0.1,
    streak_to_advance: int = 3,
    max_attempts_per_skill: int = 10,
) -> tuple[pd.DataFrame, pd.DataFrame, SimulationTruth]:
    """Simulate a class of learners working through a skill-builder-style curriculum.

    Each student follows their own curriculum (skills by prerequisite depth plus noise, so some students
    start a skill before its prerequisites are mastered) and practises the current skill on random items
    until `streak_to_advance` correct answers in a row or `max_attempts_per_skill` attempts, then moves
    on (and starts over after the last skill). With probability `explore` a step practises a random
    skill instead. Timestamps follow sessions of about 20 answers, days apart.

    Args:
        students: Number of students S.
        skills: Number of skills K (named maths skills, see `generate_skill_graph`).
        items_per_skill: Items per skill.
        interactions_per_student: Answers per student T.
        seed: Makes the whole output reproducible.
        config: Learner parameters.
        explore: Share of steps that practise a random skill.
        streak_to_advance: Correct answers in a row that end practice on a skill.
        max_attempts_per_skill: Attempts after which the student moves on anyway.

    Returns:
        (interactions: canonical interaction table, S * T rows ordered by student then time;
        graph_edges: `prerequisite_skill, skill`; truth: `SimulationTruth`).

    Raises:
        ConfigError: A count is not positive or `explore` is outside [0, 1].
    """
    for name, value in (("students", students), ("interactions_per_student", interactions_per_student)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1; got {value}.")
    if not 0.0 <= explore <= 1.0:
        raise ConfigError(f"explore must be in [0, 1]; got {explore}.")
    config = config or LearnerConfig()
    world_seq, sim_seq, policy_seq = np.random.SeedSequence(seed).spawn(3)
    world_rng = np.random.default_rng(world_seq)
    skill_frame, edges = generate_skill_graph(skills, world_rng)
    items = generate_items(skill_frame, items_per_skill, world_rng, config)
    sim = LearnerSimulator(
        skill_frame,
        edges,
        items,
        n_students=students,
        config=config,
        seed=int(sim_seq.generate_state(1)[0]),
    )
    rng = np.random.default_rng(policy_seq)
    n_skills, n_steps = len(skill_frame), interactions_per_student
    everyone = np.arange(students)

    # Each student's curriculum: skills by depth, jittered so prerequisites are sometimes skipped.
    jitter = rng.uniform(0.0, 1.5, size=(students, n_skills))
    curriculum = np.argsort(sim.skill_depth[None, :] + jitter, axis=1, kind="stable")  # (S, K)
    pointer = np.zeros(students, dtype=np.int64)
    streak = np.zeros(students, dtype=np.int64)
    attempts = np.zeros(students, dtype=np.int64)

    mastery = np.empty((students, n_steps + 1, n_skills), dtype=np.float32)
    item_index = np.empty((students, n_steps), dtype=np.int64)
    correct = np.empty((students, n_steps), dtype=np.int8)
    p_true = np.empty((students, n_steps), dtype=np.float32)
    for t in range(n_steps):
        mastery[:, t] = sim.mastery()
        exploring = rng.random(students) < explore
        skill = np.where(exploring, rng.integers(n_skills, size=students), curriculum[everyone, pointer])
        item = skill * items_per_skill + rng.integers(items_per_skill, size=students)
        p_true[:, t] = sim.p_correct(everyone, item)
        response = sim.answer(everyone, item)
        item_index[:, t], correct[:, t] = item, response
        on_plan = ~exploring
        streak = np.where(on_plan, np.where(response == 1, streak + 1, 0), streak)
        attempts = np.where(on_plan, attempts + 1, attempts)
        advance = on_plan & ((streak >= streak_to_advance) | (attempts >= max_attempts_per_skill))
        pointer = np.where(advance, (pointer + 1) % n_skills, pointer)
        streak = np.where(advance, 0, streak)
        attempts = np.where(advance, 0, attempts)
    mastery[:, n_steps] = sim.mastery()

    interactions = _interaction_table(sim, items, skill_frame, item_index, correct, rng)
    truth = SimulationTruth(
        skills=skill_frame,
        items=items,
        edges=edges,
        user_ids=np.asarray(sim.user_ids, dtype=object),
        mastery=mastery,
        p_correct=p_true.ravel(),
        config=config,
        seed=seed,
    )
    logger.info(
        "generated %d students x %d answers over %d skills (%d items), share correct %.3f",
        students,
        n_steps,
        n_skills,
        len(items),
        float(correct.mean()),
    )
    return interactions, edges, truth


def _interaction_table(
    sim: LearnerSimulator,
    items: pd.DataFrame,
    skills: pd.DataFrame,
    item_index: np.ndarray,
    correct: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Canonical interaction rows (S * T, student-major) with sessions, attempts and response times."""
    n_students, n_steps = item_index.shape
    # Within a session answers are about a minute apart; a new session every ~20 answers, 1-4 days later.
    gaps = rng.lognormal(np.log(60.0), 0.6, size=(n_students, n_steps))
    new_session = rng.random((n_students, n_steps)) < 1.0 / 20.0
    gaps = np.where(new_session, rng.uniform(1.0, 4.0, size=gaps.shape) * 86_400.0, gaps)
    gaps[:, 0] = 0.0
    start = pd.Timestamp("2024-09-02", tz="UTC") + pd.to_timedelta(
        rng.uniform(0.0, 14.0, size=n_students) * 86_400.0, unit="s"
    )
    offsets = pd.to_timedelta(np.cumsum(gaps, axis=1).ravel(), unit="s")
    timestamp = start.repeat(n_steps) + offsets
    flat_item = item_index.ravel()
    flat_correct = correct.ravel()
    names = dict(zip(skills["skill_id"].astype(str), skills["skill_name"].astype(str), strict=True))
    skill_ids = items["skill_id"].astype(str).to_numpy()[flat_item]
    response_ms = rng.lognormal(np.log(np.where(flat_correct == 1, 18_000.0, 30_000.0)), 0.5)
    attempts = np.where(flat_correct == 1, 1, 1 + rng.geometric(0.6, size=flat_correct.shape))
    return pd.DataFrame(
        {
            "user_id": pd.Series(np.repeat(np.asarray(sim.user_ids), n_steps), dtype="string"),
            "order": np.tile(np.arange(n_steps, dtype=np.int64), n_students),
            "timestamp": pd.Series(timestamp, dtype="datetime64[ns, UTC]"),
            "item_id": pd.Series(items["item_id"].astype(str).to_numpy()[flat_item], dtype="string"),
            "skill_id": pd.Series(skill_ids, dtype="string"),
            "correct": flat_correct.astype(np.int8),
            "skill_name": pd.Series([names[s] for s in skill_ids], dtype="string"),
            "attempt_count": pd.Series(attempts, dtype="Int32"),
            "response_time_ms": response_ms.round().astype(np.float64),
            "source_row": np.arange(1, n_students * n_steps + 1, dtype=np.int64),
        }
    )

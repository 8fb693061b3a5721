"""Simulated learners: the generator's output, its determinism, and the learner dynamics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.education import adapters, synthetic
from apps.education.graph import PrerequisiteGraph
from apps.education.schema import INTERACTION_DTYPES
from apps.education.synthetic import LearnerConfig, LearnerSimulator
from core.errors import ConfigError, InputValidationError


@pytest.fixture(scope="module")
def generated() -> tuple[pd.DataFrame, pd.DataFrame, synthetic.SimulationTruth]:
    return synthetic.generate(students=300, skills=12, items_per_skill=5, interactions_per_student=60, seed=3)


def two_skill_world(n_students: int, ability_a: float, ability_b: float, **config: float) -> LearnerSimulator:
    """Skill a is the prerequisite of skill b; one item of difficulty 0 each."""
    skills = pd.DataFrame({"skill_id": ["a", "b"]})
    edges = pd.DataFrame({"prerequisite_skill": ["a"], "skill": ["b"]})
    items = pd.DataFrame({"item_id": ["a/1", "b/1"], "skill_id": ["a", "b"], "difficulty": [0.0, 0.0]})
    ability = np.tile([ability_a, ability_b], (n_students, 1))
    return LearnerSimulator(
        skills,
        edges,
        items,
        n_students=n_students,
        seed=5,
        initial_ability=ability,
        config=LearnerConfig(**config),
    )


def test_generate_returns_canonical_interactions_a_dag_and_truth(generated) -> None:
    interactions, edges, truth = generated
    assert len(interactions) == 300 * 60
    assert dict(interactions.dtypes.astype(str)) == INTERACTION_DTYPES
    log = adapters.validate_interactions(interactions)
    assert log.rejected.empty and log.n_students == 300
    graph = PrerequisiteGraph.from_edges(edges, skills=truth.skills["skill_id"])
    assert len(graph) == 12 and len(graph.edges()) > 0
    assert set(interactions["skill_id"]) <= set(truth.skills["skill_id"])
    assert truth.skills["skill_name"].notna().all() and truth.skills["skill_id"].iloc[0] == "counting"
    assert truth.mastery.shape == (300, 61, 12) and truth.p_correct.shape == (300 * 60,)
    assert interactions.groupby("user_id")["timestamp"].is_monotonic_increasing.all()
    assert 0.4 < interactions["correct"].mean() < 0.85


def test_generate_is_deterministic_under_a_seed() -> None:
    first = synthetic.generate(40, 8, 3, 20, seed=11)
    second = synthetic.generate(40, 8, 3, 20, seed=11)
    other = synthetic.generate(40, 8, 3, 20, seed=12)
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2].mastery, second[2].mastery)
    assert not first[0]["correct"].equals(other[0]["correct"])


def test_practice_raises_mastery(generated) -> None:
    _, _, truth = generated
    assert truth.mastery[:, -1].mean() > truth.mastery[:, 0].mean() + 0.05
    sim = truth.simulator(n_students=1, seed=0)
    root_items = truth.items.index[truth.items["skill_id"] == "counting"]
    skill = sim.skill_ids.get_loc("counting")
    trajectory = [sim.mastery(0)[skill]]
    for step in range(15):
        sim.answer(0, int(root_items[step % len(root_items)]))
        trajectory.append(sim.mastery(0)[skill])
    assert np.all(np.diff(trajectory) > 0) and trajectory[-1] > trajectory[0] + 0.05


def test_a_skill_with_unmastered_prerequisites_is_answered_worse() -> None:
    ready = two_skill_world(2000, ability_a=3.0, ability_b=0.5)
    blocked = two_skill_world(2000, ability_a=-3.0, ability_b=0.5)
    students = np.arange(2000)
    assert ready.p_correct(0, "b/1")[0] > blocked.p_correct(0, "b/1")[0] + 0.2
    answers_ready = ready.answer(students, np.full(2000, 1))
    answers_blocked = blocked.answer(students, np.full(2000, 1))
    assert answers_ready.mean() > answers_blocked.mean() + 0.2
    # and it is learned more slowly: the gate scales the learning step
    assert ready.mastery(0)[1] - 1 / (1 + np.exp(-0.5)) > 2 * (blocked.mastery(0)[1] - 1 / (1 + np.exp(-0.5)))


def test_generated_answers_are_worse_when_prerequisites_are_unmastered(generated) -> None:
    interactions, _, truth = generated
    graph = PrerequisiteGraph.from_edges(truth.edges, skills=truth.skills["skill_id"])
    skill_ids = list(truth.skills["skill_id"])
    skill = np.array([skill_ids.index(s) for s in interactions["skill_id"]])
    before = truth.mastery[:, :-1].reshape(-1, len(skill_ids))  # mastery when each answer was given
    readiness = np.ones(len(interactions))
    for k, skill_id in enumerate(skill_ids):
        prerequisites = [skill_ids.index(p) for p in graph.prerequisites(skill_id)]
        if prerequisites:
            rows = skill == k
            readiness[rows] = before[rows][:, prerequisites].min(axis=1)
    own = before[np.arange(len(skill)), skill]
    similar_own = (own > 0.4) & (own < 0.8)
    blocked = similar_own & (readiness < 0.5)
    ready = similar_own & (readiness > 0.8)
    assert blocked.sum() > 50 and ready.sum() > 50
    correct = interactions["correct"].to_numpy()
    assert correct[ready].mean() > correct[blocked].mean() + 0.1


def test_responses_do_not_depend_on_call_interleaving() -> None:
    _, _, truth = synthetic.generate(5, 6, 3, 5, seed=2)
    items = np.arange(len(truth.items))
    together = truth.simulator(n_students=2, seed=9)
    apart = truth.simulator(n_students=2, seed=9)
    first = [together.answer([0, 1], [i, i]) for i in items]
    second_student = [apart.answer(1, int(i)) for i in items]
    first_student = [apart.answer(0, int(i)) for i in items]
    assert [a[0] for a in first] == first_student and [a[1] for a in first] == second_student
    np.testing.assert_allclose(together.mastery(), apart.mastery())


def test_repeated_students_in_one_call_answer_in_order() -> None:
    sim = two_skill_world(1, 3.0, 0.0)
    again = two_skill_world(1, 3.0, 0.0)
    batch = sim.answer([0, 0, 0], ["b/1", "b/1", "b/1"])
    one_by_one = [again.answer(0, "b/1") for _ in range(3)]
    assert batch.tolist() == one_by_one and sim.n_answers.tolist() == [3]


def test_simulator_rejects_unknown_students_and_items() -> None:
    sim = two_skill_world(2, 0.0, 0.0)
    with pytest.raises(InputValidationError, match="unknown student 5"):
        sim.answer(5, "a/1")
    with pytest.raises(InputValidationError, match="unknown item 'z/9'"):
        sim.p_correct(0, "z/9")
    assert sim.mastery_frame().shape == (2, 2)


def test_invalid_parameters_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"slip \+ guess"):
        LearnerConfig(slip=0.6, guess=0.5)
    with pytest.raises(ConfigError, match=r"LearnerConfig\.learn_rate"):
        LearnerConfig(learn_rate=-1.0)
    with pytest.raises(ConfigError, match="students must be at least 1"):
        synthetic.generate(students=0)


def test_more_than_thirty_skills_extend_the_named_map() -> None:
    skills, edges = synthetic.generate_skill_graph(34, np.random.default_rng(0))
    assert len(skills) == 34 and skills["skill_id"].iloc[-1] == "skill_34"
    graph = PrerequisiteGraph.from_edges(edges, skills=skills["skill_id"])
    assert graph.prerequisites("skill_34")

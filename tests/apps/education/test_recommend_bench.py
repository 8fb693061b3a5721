"""The recommendation benchmark's reference oracle and report helpers (bench/education_recommend_bench.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from apps.education.synthetic import LearnerConfig, LearnerSimulator, generate
from tests.conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("education_recommend_bench")


def _identical_learners(n: int, ability: np.ndarray) -> LearnerSimulator:
    """n learners with the same abilities and learning rate, in a small generated world."""
    _, edges, truth = generate(students=2, skills=6, items_per_skill=3, interactions_per_student=2, seed=3)
    config = LearnerConfig(learn_rate_spread=0.0)
    return LearnerSimulator(
        truth.skills,
        edges,
        truth.items,
        n_students=n,
        config=config,
        seed=5,
        initial_ability=np.repeat(ability[None, :], n, axis=0),
    )


def test_oracle_gain_matches_the_simulators_mean_learning(bench) -> None:
    sim = _identical_learners(4000, np.zeros(6))
    targets = np.ones((sim.n_students, 6), dtype=bool)
    root = int(np.flatnonzero(sim.skill_depth == 0)[0])
    item = int(np.flatnonzero(sim.item_skill == root)[0])
    expected = bench.oracle_gain(sim, targets)[0, item]
    after = copy.deepcopy(sim)
    after.answer(np.arange(sim.n_students), np.full(sim.n_students, item))
    realised = ((after.mastery() - sim.mastery()) * targets).sum(axis=1) / targets.sum(axis=1)
    assert expected > 0
    assert realised.mean() == pytest.approx(expected, rel=0.05)


def test_oracle_gain_is_small_on_a_skill_with_unmastered_prerequisites(bench) -> None:
    ability = np.full(6, -1.0)  # nothing mastered: every skill with prerequisites is gated
    sim = _identical_learners(2, ability)
    targets = np.ones((2, 6), dtype=bool)
    gain = bench.oracle_gain(sim, targets)[0]
    gated = sim.skill_depth[sim.item_skill] > 0
    assert gain[gated].max() < 0.2 * gain[~gated].min()


def test_report_without_latency_still_renders(bench) -> None:
    def run(seed: int, ours: float) -> dict:
        policy = {"gain": ours, "violations": 0.01, "seconds": 1.0}
        return {
            "seed": seed,
            "train_s": 1.0,
            "clusters": 2,
            "readout_r": 0.5,
            "ours": {**policy, "no_eligible": 0.0},
            "random": {**policy, "gain": 0.1},
            "weakest_first": {**policy, "gain": 0.05},
            "oracle": {**policy, "gain": 0.2},
        }

    runs = [run(0, 0.15), run(1, 0.17)]
    summary = bench.summarise(runs)
    assert summary["vs_random"]["mean"] == pytest.approx(1.6)
    assert summary["oracle_vs_random"]["mean"] == pytest.approx(2.0)
    args = dict(learners=2, seeds=[0, 1], warmup=1, steps=1, skills=6, items_per_skill=3, train_students=2)
    report = {
        "summary": summary,
        "runs": runs,
        "seconds": 1.0,
        "args": {**args, "train_answers": 2, "threads": 1},
    }
    text = bench.markdown(report)
    assert "| gain ours / random | 1.600" in text and "not measured" in text

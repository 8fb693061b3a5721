"""Batched recommendation ranking on hand-made arrays, and the tracer's batched state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.education.graph import PrerequisiteGraph
from apps.education.recommender import (
    SkillIndex,
    gap_scores,
    mastery_evidence,
    rank_items,
    recent_practice,
)
from core.errors import ConfigError, InputValidationError

# Skills a -> b -> c (a chain) and d (independent); two items per skill: a/1 a/2 b/1 b/2 c/1 c/2 d/1 d/2.
SKILLS = ["a", "b", "c", "d"]
ITEMS = [f"{s}/{n}" for s in SKILLS for n in (1, 2)]


@pytest.fixture
def index() -> SkillIndex:
    graph = PrerequisiteGraph.from_edges([("a", "b"), ("b", "c")])
    return SkillIndex(
        skills=pd.Index(SKILLS),
        items=pd.Index(ITEMS),
        item_skill=np.repeat(np.arange(4), 2),
        prerequisites=np.array([[4], [0], [1], [4]]),
        ancestors=np.array(
            [[s in graph.ancestors(t) for s in SKILLS] if t in graph else [False] * 4 for t in SKILLS]
        ),
    )


def _rank(index, item_p, mastery, targets, **kwargs):
    item_p, mastery, targets = (np.atleast_2d(np.asarray(x, dtype=float)) for x in (item_p, mastery, targets))
    gaps = gap_scores(mastery, targets.astype(bool), index, threshold=0.7)
    options = dict(band=(0.6, 0.8), prerequisite_threshold=0.75, k=3)
    return rank_items(item_p, mastery, index, gaps=gaps, **{**options, **kwargs})


def test_ancestors_of_targets_are_relevant_and_only_unmastered_ones_are_gaps(index):
    targets = np.array([[False, False, True, False]])  # target c
    assert index.relevant(targets).tolist() == [[True, True, True, False]]
    gaps = gap_scores(np.array([[0.9, 0.5, 0.3, 0.1]]), targets, index, threshold=0.7)
    assert np.isnan(gaps[0, [0, 3]]).all() and gaps[0, 1] == pytest.approx(0.2) and gaps[0, 2] > gaps[0, 1]


def test_gap_on_the_frontier_comes_first_and_locked_skills_never(index):
    item_p = [0.7, 0.75, 0.7, 0.65, 0.7, 0.7, 0.7, 0.7]
    mastery = [0.9, 0.5, 0.3, 0.9]  # b is a gap with a mastered prerequisite; c is locked (b unmastered)
    chosen = _rank(index, item_p, mastery, [0, 0, 1, 0])[0]
    assert [ITEMS[i][0] for i in chosen[:2]] == ["b", "b"]
    assert not {ITEMS[i] for i in chosen if i >= 0} & {"c/1", "c/2"}


def test_a_prerequisite_just_below_the_margin_still_locks(index):
    chosen = _rank(index, [0.7] * 8, [0.72, 0.5, 0.3, 0.9], [0, 0, 1, 0])[0]  # a 0.72 < 0.75
    assert {ITEMS[i][0] for i in chosen if i >= 0} <= {"a", "d"}


def test_items_outside_the_band_and_the_last_item_are_left_out(index):
    item_p = [0.7, 0.95, 0.3, 0.7, 0.7, 0.7, 0.7, 0.7]
    chosen = _rank(index, item_p, [0.9, 0.5, 0.3, 0.9], [0, 0, 1, 0], last_item=np.array([3]), k=8)[0]
    picked = {ITEMS[i] for i in chosen if i >= 0}
    assert picked == {"a/1", "d/1", "d/2"}  # a/2 and b/1 outside the band, b/2 just answered, c locked
    assert chosen.tolist()[3:] == [-1] * 5


def test_target_skills_rank_before_unrelated_ones_and_recent_practice_interleaves(index):
    item_p = [0.7] * 8
    mastery = [0.85, 0.8, 0.8, 0.75]  # no gaps
    targets = [1, 1, 0, 0]  # a and b are targets; c, d unrelated
    relevant = index.relevant(np.array([targets], dtype=bool))
    first = _rank(index, item_p, mastery, targets, relevant=relevant, k=1)[0, 0]
    assert ITEMS[first][0] == "b"  # the less mastered target
    recent = recent_practice(np.array([[1, 1, 1]]), 4, 3)  # b practised three times lately
    assert recent.tolist() == [[0, 3, 0, 0]]
    again = _rank(index, item_p, mastery, targets, relevant=relevant, recent=recent, k=1)[0, 0]
    assert ITEMS[again][0] == "a"


def test_at_most_two_items_per_skill_and_rows_are_independent(index):
    item_p = np.full((2, 8), 0.7)
    mastery = np.array([[0.9, 0.9, 0.9, 0.9], [0.9, 0.5, 0.3, 0.9]])
    gaps = gap_scores(mastery, np.array([[1, 1, 1, 1], [0, 0, 1, 0]], dtype=bool), index, threshold=0.7)
    chosen = rank_items(item_p, mastery, index, gaps=gaps, band=(0.6, 0.8), prerequisite_threshold=0.75, k=8)
    for row in chosen:
        skills = [ITEMS[i][0] for i in row if i >= 0]
        assert max(skills.count(s) for s in set(skills)) <= 2
    assert len([i for i in chosen[0] if i >= 0]) == 8 and ITEMS[chosen[1, 0]][0] == "b"


def test_mastery_evidence_counts_the_latest_answers_on_each_skill():
    skills = np.array([[0, 0, 1, 0, 0, 0, -1], [1, 1, 1, 1, -1, -1, -1]])
    correct = np.array([[1, 1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0]])
    # Student 0, skill a: the last five answers on it are 1 1 0 1 1 (4 right); the last three 0 1 1 (2 right).
    assert mastery_evidence(skills, correct, 2, required=3, window=5).tolist() == [
        [True, False],
        [False, True],
    ]
    assert mastery_evidence(skills, correct, 2, required=3, window=3).tolist() == [
        [False, False],
        [False, True],
    ]
    with pytest.raises(ConfigError, match="required <= window"):
        mastery_evidence(skills, correct, 2, required=4, window=3)
    with pytest.raises(InputValidationError, match="same shape"):
        mastery_evidence(skills, correct[:, :3], 2, required=1, window=3)


def test_a_demonstrated_prerequisite_unlocks_its_skill(index):
    item_p = [0.7] * 8
    mastery = [0.9, 0.6, 0.3, 0.9]  # b below the prerequisite threshold, so c is locked ...
    locked = _rank(index, item_p, mastery, [0, 0, 1, 0], k=8)[0]
    assert "c" not in {ITEMS[i][0] for i in locked if i >= 0}
    shown = np.array([[False, True, False, False]])  # ... until the student demonstrates b
    unlocked = _rank(index, item_p, mastery, [0, 0, 1, 0], k=8, demonstrated=shown)[0]
    assert "c" in {ITEMS[i][0] for i in unlocked if i >= 0}


def test_demonstrated_skills_rank_after_the_other_target_skills(index):
    item_p = [0.7] * 8
    mastery = [0.9, 0.5, 0.9, 0.9]  # b is a gap of target c
    targets = [0, 0, 1, 0]
    relevant = index.relevant(np.array([targets], dtype=bool))
    first = _rank(index, item_p, mastery, targets, relevant=relevant, k=1)[0, 0]
    assert ITEMS[first][0] == "b"
    shown = np.array([[False, True, False, False]])  # b answered right 3 times of the last 5: a reinforcement
    again = _rank(index, item_p, mastery, targets, relevant=relevant, demonstrated=shown, k=1)[0, 0]
    assert ITEMS[again][0] in {"a", "c"}
    with pytest.raises(InputValidationError, match="demonstrated"):
        _rank(index, item_p, mastery, targets, demonstrated=shown[:, :3])


def test_invalid_arguments_are_rejected(index):
    with pytest.raises(ConfigError, match="k must be"):
        _rank(index, [0.7] * 8, [0.9] * 4, [1, 0, 0, 0], k=0)
    with pytest.raises(ConfigError, match="band"):
        _rank(index, [0.7] * 8, [0.9] * 4, [1, 0, 0, 0], band=(0.8, 0.6))
    with pytest.raises(InputValidationError, match="expected item_p"):
        _rank(index, [0.7] * 7, [0.9] * 4, [1, 0, 0, 0])


def test_batched_state_matches_the_single_student_state(trained_world):
    tracer, test = trained_world.tracer, trained_world.test
    users = test["user_id"].unique()[:3]
    batched = tracer.item_probabilities(test[test["user_id"].isin(users)])
    assert list(batched.index) == list(users)
    for user in users:
        state = tracer.student_state(test, user)
        np.testing.assert_allclose(batched.loc[user].to_numpy(), state.item_p.to_numpy(), atol=1e-4)
        np.testing.assert_allclose(
            tracer.skill_mastery_matrix(batched.loc[[user]].to_numpy())[0],
            state.mastery.to_numpy(),
            atol=1e-4,
        )


def test_skill_index_reads_the_tracer_and_graph(trained_world):
    tracer = trained_world.tracer
    graph = PrerequisiteGraph.from_edges(trained_world.edges, skills=list(tracer.skill_vocab_.tokens))
    index = SkillIndex.build(tracer, graph)
    assert list(index.items) == list(tracer.item_vocab_.tokens)
    skill = next(s for s in graph.skills if graph.prerequisites(s))
    row = index.skills.get_loc(skill)
    direct = set(index.skills[index.prerequisites[row][index.prerequisites[row] < len(index.skills)]])
    assert direct == set(graph.prerequisites(skill))
    assert set(index.skills[index.ancestors[row]]) == set(graph.ancestors(skill))

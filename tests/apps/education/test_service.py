"""Knowledge gaps and recommendations: prerequisites, the success band, reasons; assignments in the DB."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

import apps.education.orm  # noqa: F401 - registers the education tables
from apps.education import repository
from apps.education.graph import PrerequisiteGraph
from apps.education.service import knowledge_gaps, mastery_dot, recommend, session_change
from core.errors import ConfigError, InputValidationError


@pytest.fixture(scope="module")
def world_state(trained_world):
    tracer = trained_world.tracer
    graph = PrerequisiteGraph.from_edges(trained_world.edges, skills=list(tracer.skill_vocab_.tokens))
    user = trained_world.test["user_id"].iloc[0]
    return tracer, graph, tracer.student_state(trained_world.test, user)


def _demonstrated(state, required: int = 3, window: int = 5) -> set[str]:
    """Skills with at least `required` of the student's last `window` answers on them correct."""
    history = state.history.assign(skill=state.history["skill_id"].astype(str).str.split("|").str[0])
    last = history.groupby("skill", sort=False)["correct"].apply(lambda c: int(c.tail(window).sum()))
    return set(last[last >= required].index)


def test_recommendations_stay_in_the_band_and_respect_prerequisites(world_state):
    tracer, graph, state = world_state
    band = (0.5, 0.9)
    recs = recommend(tracer, state, graph, k=5, band=band)
    assert recs, "expected at least one exercise in a wide band"
    shown = _demonstrated(state)
    for rec in recs:
        assert band[0] <= rec.p_correct <= band[1]
        assert all(state.mastery[p] >= 0.8 or p in shown for p in graph.prerequisites(rec.skill_id))
        assert rec.reason and "predicted success" in rec.reason.lower()


def test_a_prerequisite_the_student_demonstrated_unlocks_its_skill_and_the_reason_says_so(world_state):
    tracer, graph, state = world_state
    skill = next(s for s in graph.skills if len(graph.prerequisites(s)) == 1)
    prerequisite = graph.prerequisites(skill)[0]
    item = str(tracer.skill_of_item()[lambda s: s == prerequisite].index[0])
    # Mastery below the prerequisite threshold, but the last three answers are right on the prerequisite.
    mastery = pd.Series(0.9, index=state.mastery.index)
    mastery[prerequisite] = 0.6
    history = state.history.tail(3).assign(item_id=item, skill_id=prerequisite, correct=1)
    item_p = pd.Series(0.7, index=state.item_p.index)
    shown = replace(state, item_p=item_p, mastery=mastery, history=history)
    recs = recommend(tracer, shown, graph, k=50)
    unlocked = [r for r in recs if r.skill_id == skill]
    assert unlocked and "3 of the last 5 answers on it correct" in unlocked[0].reason
    blind = recommend(tracer, shown, graph, k=50, evidence=None)
    assert skill not in {r.skill_id for r in blind}


def test_a_skill_with_an_unmastered_prerequisite_is_never_recommended(world_state):
    tracer, graph, state = world_state
    skill = next(s for s in graph.skills if graph.prerequisites(s))
    prerequisite = graph.prerequisites(skill)[0]
    # Every item predicted in the band, the prerequisite unmastered (and never answered right, so not
    # demonstrated either), everything else mastered.
    item_p = pd.Series(0.7, index=state.item_p.index)
    mastery = pd.Series(0.9, index=state.mastery.index)
    mastery[prerequisite] = 0.3
    forced = replace(state, item_p=item_p, mastery=mastery, history=state.history.assign(correct=0))
    recs = recommend(tracer, forced, graph, k=50, band=(0.6, 0.8))
    assert recs
    assert all(prerequisite not in graph.prerequisites(r.skill_id) for r in recs)
    assert skill not in {r.skill_id for r in recs}


def test_items_outside_the_band_are_not_recommended(world_state):
    tracer, graph, state = world_state
    forced = replace(state, item_p=pd.Series(0.95, index=state.item_p.index))
    assert recommend(tracer, forced, graph, k=5, band=(0.6, 0.8)) == []


def test_gaps_are_prerequisites_of_targets_below_threshold(world_state):
    tracer, graph, state = world_state
    target = next(s for s in graph.skills if graph.ancestors(s))
    low = graph.ancestors(target)[0]
    mastery = pd.Series(0.9, index=state.mastery.index)
    mastery[low] = 0.2
    gaps = knowledge_gaps(tracer, replace(state, mastery=mastery), graph, targets=[target])
    assert [g.skill_id for g in gaps] == [low]
    assert target in gaps[0].blocks and "needed for" in gaps[0].reason


def test_invalid_band_and_unknown_target_are_rejected(world_state):
    tracer, graph, state = world_state
    with pytest.raises(ConfigError, match="band"):
        recommend(tracer, state, graph, band=(0.8, 0.6))
    with pytest.raises(InputValidationError, match="not in the model's skill vocabulary"):
        knowledge_gaps(tracer, state, graph, targets=["no_such_skill"])


def test_session_change_and_graph_drawing(world_state, trained_world):
    tracer, graph, state = world_state
    change = session_change(tracer, trained_world.test, state.user_id)
    assert set(change.columns) >= {"skill_id", "before", "after", "change", "answers"}
    assert change["answers"].sum() > 0
    dot = mastery_dot(tracer, state.mastery, graph)
    assert dot.startswith("digraph") and dot.count("->") == len(graph.edges())


def test_assignments_are_saved_and_listed_per_student(world_state, db_session):
    tracer, graph, state = world_state
    recs = recommend(tracer, state, graph, k=2, band=(0.3, 0.95))
    rows = repository.add_assignments(
        db_session, state.user_id, recs, assigned_by="ms tutor", note="before Friday"
    )
    assert all(row.id is not None for row in rows)
    listed = repository.list_assignments(db_session, student_id=state.user_id)
    assert {a.item_id for a in listed} == {r.item_id for r in recs}
    assert repository.list_assignments(db_session, student_id="someone else") == []
    with pytest.raises(InputValidationError, match="assigned_by"):
        repository.add_assignments(db_session, state.user_id, recs, assigned_by=" ")

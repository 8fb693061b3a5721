"""DKT-forget-style practice features: their encoding (causal, multi-skill pooling) and the tracer using them."""

from __future__ import annotations

import numpy as np
import pytest

from apps.education.config import PRACTICE_BUCKETS, PRACTICE_FIELDS, knowledge_tracing_config
from apps.education.encode import practice_features
from apps.education.predictor import KnowledgeTracer
from core.config import CoreConfig
from core.errors import ConfigError
from tests.apps.education.test_predictor import assert_prediction_never_sees_its_own_response

# Skills of six answers (one column) and their responses.
SKILLS = np.array([[2], [3], [2], [2], [3], [4]])
CORRECT = np.array([1, 0, 0, 1, 1, 0])


def test_features_count_earlier_answers_on_the_same_skill():
    features = practice_features(SKILLS, CORRECT)
    attempts, success, gap, last = features.T
    # Slot 3 (skill 2): two earlier answers on skill 2 (slots 0, 2), one correct, the latest 1 slot ago, wrong.
    assert attempts[3] == 1 + np.floor(np.log2(3))
    assert success[3] == 2 + np.floor((1 + 1) / (2 + 2) * 10)
    assert gap[3] == 2 + np.floor(np.log2(1))
    assert last[3] == 2 + 0
    # First attempts on a skill: "never practised" everywhere.
    assert (features[[0, 1, 5]] == 1).all()
    assert features.min() >= 1 and (features.max(axis=0) < np.array(PRACTICE_BUCKETS)).all()


def test_a_response_never_enters_its_own_or_earlier_features():
    base = practice_features(SKILLS, CORRECT)
    for t in range(len(CORRECT)):
        flipped = CORRECT.copy()
        flipped[t] = 1 - flipped[t]
        changed = practice_features(SKILLS, flipped)
        np.testing.assert_array_equal(changed[: t + 1], base[: t + 1])
        later_same_skill = [s for s in range(t + 1, len(CORRECT)) if SKILLS[s, 0] == SKILLS[t, 0]]
        if later_same_skill:
            assert (changed[later_same_skill[0]] != base[later_same_skill[0]]).any()


def test_multi_skill_items_pool_their_skills():
    skills = np.array([[2, 0], [3, 0], [2, 3]])
    correct = np.array([1, 0, 1])
    attempts, success, gap, last = practice_features(skills, correct)[2]
    # Skills 2 and 3 were each practised once (mean 1), one of two correct, latest attempt (skill 3) wrong.
    assert attempts == 1 + np.floor(np.log2(2))
    assert success == 2 + np.floor((1 + 1) / (2 + 2) * 10)
    assert gap == 2 and last == 2


def test_scoring_items_after_a_window_matches_the_next_answers_features():
    full = practice_features(SKILLS, CORRECT)
    for n in range(len(CORRECT)):
        after = practice_features(SKILLS[:n], CORRECT[:n], query_skills=SKILLS[n : n + 1])
        np.testing.assert_array_equal(after[0], full[n])
    unseen = practice_features(SKILLS, CORRECT, query_skills=np.array([[9], [0]]))
    assert (unseen == 1).all()


def test_feature_buckets_without_a_next_step_head_are_rejected():
    with pytest.raises(ConfigError, match="next_step_feature_buckets"):
        CoreConfig(next_step_feature_buckets=[4])
    config = knowledge_tracing_config(12, 6, preset="practice")
    assert config.next_step_feature_buckets == list(PRACTICE_BUCKETS)
    assert all(
        config.categorical_fields[name] == n
        for name, n in zip(PRACTICE_FIELDS, PRACTICE_BUCKETS, strict=True)
    )
    retrieval = knowledge_tracing_config(12, 6, preset="retrieval")
    assert not retrieval.next_step_feature_buckets and PRACTICE_FIELDS[0] not in retrieval.categorical_fields
    head_only = knowledge_tracing_config(12, 6, preset="practice", practice_tokens=False)
    assert head_only.next_step_feature_buckets and PRACTICE_FIELDS[0] not in head_only.categorical_fields


@pytest.fixture(scope="module")
def practice_tracer(trained_world) -> KnowledgeTracer:
    """A tiny tracer reading the practice features in the head and on the tokens (a few seconds)."""
    return KnowledgeTracer(
        preset="practice",
        pretrain_epochs=0,
        task_epochs=2,
        learning_rate=3e-3,
        batch_size=16,
        config_overrides=dict(
            hidden_size=16, num_heads=4, ffn_size=16, n_routed_experts=2, moe_top_k=1, practice_tokens=True
        ),
        max_clusters=1,
    ).fit(trained_world.train)


def first_student(frame):
    return frame[frame["user_id"] == frame["user_id"].iloc[0]]


def test_a_prediction_with_practice_features_never_sees_its_own_response(practice_tracer, trained_world):
    assert practice_tracer.model_.next_step.features is not None
    assert_prediction_never_sees_its_own_response(practice_tracer, first_student(trained_world.test))


def test_read_out_after_a_history_matches_the_prediction_of_the_next_answer(practice_tracer, trained_world):
    # student_state computes every item's practice features after the history; predict_proba computes
    # them for the answer that followed: both paths must give the same probability for that item.
    student = first_student(trained_world.test)
    for n in (1, 15, 30):
        state = practice_tracer.student_state(student.iloc[:n], student["user_id"].iloc[0])
        predicted = practice_tracer.predict_proba(student.iloc[: n + 1])["p_correct"].iloc[n]
        assert state.item_p[student["item_id"].iloc[n]] == pytest.approx(predicted, abs=1e-5)


def test_cold_student_and_save_load_keep_working(practice_tracer, trained_world, tmp_path):
    state = practice_tracer.student_state(trained_world.test.iloc[:0], "nobody")
    assert state.item_p.between(0, 1).all() and len(state.item_p) == len(practice_tracer.item_vocab_.tokens)
    practice_tracer.save(tmp_path / "model")
    loaded = KnowledgeTracer.load(tmp_path / "model")
    head = trained_world.test.head(100)
    np.testing.assert_allclose(
        loaded.predict_proba(head)["p_correct"], practice_tracer.predict_proba(head)["p_correct"]
    )
    np.testing.assert_allclose(loaded.mastery(head).to_numpy(), practice_tracer.mastery(head).to_numpy())

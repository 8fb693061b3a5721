"""KnowledgeTracer with the AKT-style options of the core: recency bias and the retrieval next-step head."""

from __future__ import annotations

import numpy as np
import pytest

from apps.education.predictor import KnowledgeTracer
from core.errors import ConfigError
from tests.apps.education.test_predictor import assert_prediction_never_sees_its_own_response


@pytest.fixture(scope="module")
def retrieval_tracer(trained_world) -> KnowledgeTracer:
    """A tiny tracer with both options, trained briefly (a few seconds on one thread)."""
    return KnowledgeTracer(
        pretrain_epochs=0,
        task_epochs=2,
        learning_rate=3e-3,
        batch_size=16,
        config_overrides=dict(
            hidden_size=16,
            n_routed_experts=2,
            moe_top_k=1,
            recency_bias=True,
            next_step_retrieval=True,
        ),
        max_clusters=1,
    ).fit(trained_world.train)


def first_student(frame):
    return frame[frame["user_id"] == frame["user_id"].iloc[0]]


def test_options_reach_the_model(retrieval_tracer):
    config = retrieval_tracer.model_.config
    assert config.recency_bias and config.next_step_retrieval
    assert retrieval_tracer.model_.next_step.retrieval is not None


def test_a_prediction_never_sees_its_own_response(retrieval_tracer, trained_world):
    assert_prediction_never_sees_its_own_response(retrieval_tracer, first_student(trained_world.test))


def test_read_out_after_a_history_matches_the_prediction_of_the_next_answer(retrieval_tracer, trained_world):
    # student_state scores every item from the last state through the retrieval head; predict_proba
    # scores the answer that followed inside the sequence: both must agree for that item.
    student = first_student(trained_world.test)
    n = 15
    state = retrieval_tracer.student_state(student.iloc[:n], student["user_id"].iloc[0])
    predicted = retrieval_tracer.predict_proba(student.iloc[: n + 1])["p_correct"].iloc[n]
    assert state.item_p[student["item_id"].iloc[n]] == pytest.approx(predicted, abs=1e-5)


def test_cold_student_gets_probabilities_for_every_item(retrieval_tracer, trained_world):
    state = retrieval_tracer.student_state(trained_world.test.iloc[:0], "nobody")
    assert len(state.item_p) == len(retrieval_tracer.item_vocab_.tokens)
    assert state.item_p.between(0, 1).all()


def test_save_then_load_keeps_the_options_and_predictions(retrieval_tracer, trained_world, tmp_path):
    retrieval_tracer.save(tmp_path / "model")
    loaded = KnowledgeTracer.load(tmp_path / "model")
    assert loaded.model_.config.next_step_retrieval and loaded.model_.config.recency_bias
    head = trained_world.test.head(100)
    np.testing.assert_allclose(
        loaded.predict_proba(head)["p_correct"], retrieval_tracer.predict_proba(head)["p_correct"]
    )


def test_retrieval_on_a_non_causal_config_is_rejected(trained_world):
    with pytest.raises(ConfigError, match="next_step_retrieval"):
        KnowledgeTracer(config_overrides=dict(causal=False, next_step_retrieval=True)).prepare_fit(
            trained_world.train
        )


def test_retrieval_preset_turns_both_options_on():
    from apps.education.config import TRAINING, knowledge_tracing_config

    config = knowledge_tracing_config(12, 6, preset="retrieval")
    assert config.causal and config.recency_bias and config.next_step_retrieval
    assert "retrieval" in TRAINING
    assert not knowledge_tracing_config(12, 6, preset="small").next_step_retrieval

"""KnowledgeTracer: the estimator contract, causality, learning, mastery read-out, persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from apps.education.adapters import validate_interactions
from apps.education.encode import build_vocabularies, make_windows, to_examples, to_sequences
from apps.education.predictor import PREDICTION_COLUMNS, KnowledgeTracer
from apps.education.schema import Interaction, interactions_to_frame
from core.errors import NotFittedError


def _frame(records: list[Interaction]) -> pd.DataFrame:
    return validate_interactions(interactions_to_frame(records), source="<test>").frame


def test_predict_before_fit_raises_not_fitted(trained_world):
    with pytest.raises(NotFittedError, match="Call 'fit'"):
        KnowledgeTracer().predict_proba(trained_world.test)


def test_examples_shift_targets_by_one_token(trained_world):
    items, skills = build_vocabularies(trained_world.train)
    seqs = to_sequences(trained_world.train.head(50), items, skills)
    example = to_examples(make_windows(seqs, mode="sliding"), score_first=True)[0]
    n = len(example["next_item_ids"]) - 1
    # Token j + 1 carries answer j; the state at token j predicts answer j.
    assert np.array_equal(example["categorical"]["item"][1:], example["next_item_ids"][:n])
    assert np.array_equal(example["categorical"]["response"][1:] - 2, example["next_labels"][:n])
    assert example["next_labels"][-1] == -1


def test_next_step_prediction_never_sees_its_own_response(trained_world):
    student = trained_world.test[trained_world.test["user_id"] == trained_world.test["user_id"].iloc[0]]
    assert_prediction_never_sees_its_own_response(trained_world.tracer, student)


def assert_prediction_never_sees_its_own_response(tracer, student) -> None:
    """Flipping answer t leaves the predictions up to t unchanged and moves the later ones."""
    base = tracer.predict_proba(student)
    t = 20
    flipped = student.copy()
    flipped.iloc[t, flipped.columns.get_loc("correct")] = 1 - flipped["correct"].iloc[t]
    changed = tracer.predict_proba(flipped)
    # Answers up to and including t are predicted before response t exists: unchanged.
    np.testing.assert_allclose(changed["p_correct"][: t + 1], base["p_correct"][: t + 1], atol=1e-6)
    # Later answers do see it.
    assert not np.allclose(changed["p_correct"][t + 1 :], base["p_correct"][t + 1 :], atol=1e-6)


def test_predict_proba_has_one_row_per_interaction(trained_world):
    predictions = trained_world.tracer.predict_proba(trained_world.test)
    assert tuple(predictions.columns) == PREDICTION_COLUMNS
    assert len(predictions) == len(trained_world.test)
    assert predictions["p_correct"].between(0, 1).all()
    assert (predictions.groupby("user_id")["position"].min() == 0).all()


def test_training_beats_a_per_skill_mean_baseline(trained_world):
    tracer, train, test = trained_world.tracer, trained_world.train, trained_world.test
    metrics = tracer.evaluate(test)
    predictions = tracer.predict_proba(test)
    scored = predictions[predictions["position"] > 0]
    baseline = roc_auc_score(
        scored["correct"], scored["skill_id"].map(train.groupby("skill_id")["correct"].mean())
    )
    assert metrics["n_predictions"] == len(scored)
    assert metrics["auc"] == pytest.approx(roc_auc_score(scored["correct"], scored["p_correct"]), abs=1e-9)
    assert metrics["auc"] > baseline + 0.01


def test_shuffled_labels_give_auc_near_one_half(trained_world):
    rng = np.random.default_rng(0)
    shuffled = trained_world.train.copy()
    shuffled["correct"] = rng.permutation(shuffled["correct"].to_numpy())
    test = trained_world.test.copy()
    test["correct"] = rng.permutation(test["correct"].to_numpy())
    tracer = KnowledgeTracer(
        pretrain_epochs=0,
        task_epochs=1,
        config_overrides=dict(hidden_size=16, n_routed_experts=2, moe_top_k=1),
    ).fit(shuffled)
    assert abs(tracer.evaluate(test)["auc"] - 0.5) < 0.05


def test_mastery_rises_after_correct_answers_for_a_new_student(trained_world):
    tracer = trained_world.tracer
    skill = trained_world.train["skill_id"].iloc[0]
    items = trained_world.train.loc[trained_world.train["skill_id"] == skill, "item_id"].unique()[:3]

    def answers(correct: int) -> pd.DataFrame:
        return _frame(
            [Interaction("new", str(items[i % len(items)]), skill, correct, order=i) for i in range(6)]
        )

    right = tracer.student_state(answers(1), "new").mastery[skill]
    wrong = tracer.student_state(answers(0), "new").mastery[skill]
    cold = tracer.student_state(answers(1).iloc[:0], "new").mastery[skill]
    assert right > cold > wrong


def test_mastery_table_covers_every_student_and_skill(trained_world):
    table = trained_world.tracer.mastery(trained_world.test)
    assert table.shape == (
        trained_world.test["user_id"].nunique(),
        len(trained_world.tracer.skill_vocab_.tokens),
    )
    assert ((table >= 0) & (table <= 1)).all().all()


def test_save_then_load_gives_identical_predictions(trained_world, tmp_path):
    tracer = trained_world.tracer
    tracer.save(tmp_path / "model", metrics={"auc": 0.5})
    loaded = KnowledgeTracer.load(tmp_path / "model")
    head = trained_world.test.head(100)
    np.testing.assert_allclose(
        loaded.predict_proba(head)["p_correct"], tracer.predict_proba(head)["p_correct"]
    )
    assert loaded.skill_names_ == tracer.skill_names_

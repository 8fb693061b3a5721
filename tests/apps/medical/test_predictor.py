"""The Diagnoser: beats chance, works without CT, explains, adds few-shot classes, saves and loads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from apps.medical.predictor import Diagnoser, class_prototype, classification_metrics, fewshot_probabilities
from apps.medical.schema import MedicalCase
from core.errors import InputValidationError, NotFittedError


def test_unfitted_diagnoser_raises_not_fitted(trained):
    with pytest.raises(NotFittedError, match="Call 'fit'"):
        Diagnoser("tiny").predict_proba(trained.test[:1])


def test_training_on_a_few_cases_beats_chance(trained):
    probabilities = trained.diagnoser.predict_proba(trained.test)
    assert probabilities.shape == (len(trained.test), 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    metrics = classification_metrics(
        [c.label for c in trained.test], probabilities, trained.diagnoser.classes_
    )
    # Chance is an AUROC of 0.5 and an accuracy of 0.2 over five balanced classes.
    assert metrics["auroc_macro"] > 0.65
    assert metrics["accuracy"] > 0.3


def test_a_case_without_ct_is_diagnosed_from_the_record(trained):
    case = trained.test[0]
    record_only = MedicalCase(case_id="no-ct", record=case.record, volume=None)
    probabilities = trained.diagnoser.predict_proba([record_only])
    np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5)
    explanation = trained.diagnoser.explain(record_only)
    assert not explanation.volume_present and explanation.patch_map is None and explanation.regions == []
    assert explanation.record_fields  # the record still explains the diagnosis
    # CT tokens are masked out: whatever the zero volume holds does not matter, so the CT changes the output.
    assert not np.allclose(probabilities, trained.diagnoser.predict_proba([case]))


def test_explain_points_at_ct_regions_inside_the_series_and_record_fields(trained):
    case = trained.test[1]
    explanation = trained.diagnoser.explain(case, top_k=3)
    assert explanation.label == trained.diagnoser.predict([case])[0]
    assert explanation.patch_map.shape == trained.diagnoser.grid_.patch_grid
    assert explanation.patch_map.sum() == pytest.approx(1.0, abs=1e-4)
    slices = case.volume.shape[0]
    assert explanation.top_slices and all(0 <= s < slices for s in explanation.top_slices)
    for region in explanation.regions:
        assert 0 <= region["slices"][0] <= region["slices"][1] < slices
    fields = [f["field"] for f in explanation.record_fields]
    assert "patient_id" not in fields and len(fields) == len(set(fields))
    effects = [abs(f["effect"]) for f in explanation.record_fields]
    assert effects == sorted(effects, reverse=True)


def test_add_class_recognises_siblings_of_its_support_cases(trained, tmp_path):
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    diagnoser = Diagnoser.load(model_dir)
    support, siblings = trained.rare[:8], trained.rare[8:]
    diagnoser.add_class("miliary", support)
    assert diagnoser.classes_[-1] == "miliary"
    # Threshold-free, so it does not hang on this tiny model's calibration: the new class's probability
    # ranks the 16 unseen siblings of the support cases above the 40 base test cases. Chance is an AUROC of
    # 0.5 with a standard error of about 0.09 here, so 0.65 is a margin a random prototype rarely clears.
    p_siblings = diagnoser.predict_proba(siblings)[:, -1]
    p_base = diagnoser.predict_proba(trained.test)[:, -1]
    is_sibling = [1] * len(p_siblings) + [0] * len(p_base)
    assert roc_auc_score(is_sibling, np.concatenate([p_siblings, p_base])) >= 0.65
    # At the argmax: siblings are called miliary more often than base cases, which mostly keep a base class.
    sibling_rate = np.mean([p == "miliary" for p in diagnoser.predict(siblings)])
    base_rate = np.mean([p == "miliary" for p in diagnoser.predict(trained.test)])
    assert sibling_rate > base_rate and base_rate <= 0.3
    explanation = diagnoser.explain(siblings[0])  # the gradient runs through the prototype path too
    assert list(explanation.probabilities) == diagnoser.classes_
    assert sum(explanation.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    diagnoser.save_prototypes(model_dir)
    reloaded = Diagnoser.load(model_dir)
    assert reloaded.classes_ == diagnoser.classes_
    np.testing.assert_allclose(reloaded.predict_proba(siblings), diagnoser.predict_proba(siblings), atol=1e-5)


def test_add_class_rejects_an_existing_name_and_empty_support(trained):
    diagnoser = Diagnoser.load(trained.model_dir)
    with pytest.raises(InputValidationError, match="exists already"):
        diagnoser.add_class("normal", trained.rare[:1])
    with pytest.raises(InputValidationError, match="no support cases"):
        diagnoser.add_class("rare", [])


def test_save_then_load_gives_identical_probabilities(trained):
    reloaded = Diagnoser.load(trained.model_dir)
    np.testing.assert_allclose(
        reloaded.predict_proba(trained.test[:4]), trained.diagnoser.predict_proba(trained.test[:4]), atol=1e-6
    )
    assert len(reloaded.model_version_) == 16 and reloaded.config_hash_


def test_metrics_leave_out_classes_without_positives():
    metrics = classification_metrics(
        ["a", "a", "b"], np.array([[0.9, 0.1, 0], [0.6, 0.4, 0], [0.2, 0.8, 0]]), ["a", "b", "c"]
    )
    assert metrics["accuracy"] == 1.0 and metrics["auroc_a"] == 1.0 and "auroc_c" not in metrics
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["brier"] > 0


def test_config_overrides_reach_the_model_and_survive_save_load(trained, tmp_path):
    diagnoser = Diagnoser(
        "tiny",
        epochs=1,
        pretrain_epochs=0,
        batch_size=8,
        show_progress=False,
        config_overrides={"volume_stem_channels": 2, "classifier_pooling": "max"},
    ).fit(trained.train[:16])
    assert diagnoser.model_.volume_embedder.stem is not None
    loaded = Diagnoser.load(diagnoser.save(tmp_path / "model"))
    assert loaded.model_.config.volume_stem_channels == 2
    assert loaded.model_.config.classifier_pooling == "max"
    np.testing.assert_allclose(
        loaded.predict_proba(trained.test[:4]), diagnoser.predict_proba(trained.test[:4]), atol=1e-5
    )


def test_mirror_volume_flips_the_ct_half_the_time_and_never_the_stored_example() -> None:
    from apps.medical.predictor import MirrorVolume

    volume = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    example = {"volume": volume, "volume_present": True, "labels": 1}
    mirror = MirrorVolume(seed=0)
    outputs = [mirror(example) for _ in range(200)]
    flipped = [o for o in outputs if o is not example]
    assert 60 < len(flipped) < 140  # about half
    np.testing.assert_array_equal(flipped[0]["volume"], volume[..., ::-1])
    assert flipped[0]["labels"] == 1
    np.testing.assert_array_equal(example["volume"], np.arange(48, dtype=np.float32).reshape(2, 2, 3, 4))
    absent = {"volume": volume, "volume_present": False}
    assert all(mirror(absent) is absent for _ in range(20))  # no CT: nothing to mirror


def test_fewshot_probabilities_add_a_class_to_the_classifier():
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    support = F.normalize(torch.randn(4, 8, generator=generator), dim=-1) + 2.0 * F.normalize(
        torch.randn(8, generator=generator), dim=0
    )
    novel = class_prototype(support)
    assert torch.allclose(novel.norm(), torch.tensor(1.0))
    logits = torch.randn(5, 3, generator=generator)
    queries = torch.cat([novel[None], base])  # one case on the novel prototype, one on each base one
    queries = torch.cat([queries, F.normalize(torch.randn(1, 8, generator=generator), dim=-1)])

    without = fewshot_probabilities(logits, queries, base, [])
    assert torch.allclose(without, torch.softmax(logits, dim=-1))

    proba = fewshot_probabilities(logits, queries, base, [novel])
    assert proba.shape == (5, 4)
    assert torch.allclose(proba.sum(dim=1), torch.ones(5), atol=1e-6)
    assert proba[0].argmax() == 3  # the case on the novel prototype goes to the added class
    assert (proba[1:4, 3] < proba[0, 3]).all()
    # the base classes keep the classifier's ranking: only their shared mass shrinks
    assert torch.equal(proba[:, :3].argsort(dim=1), torch.softmax(logits, dim=-1).argsort(dim=1))

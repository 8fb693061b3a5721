"""Skill clusters as MoE domains: from the prerequisite graph, from co-occurrence, capped; domain ids per token."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.education.adapters import validate_interactions
from apps.education.clusters import domain_names, domain_of_skill_index, skill_clusters
from apps.education.encode import build_vocabularies, make_windows, to_examples, to_sequences
from apps.education.graph import PrerequisiteGraph
from apps.education.schema import Interaction, Vocabulary, interactions_to_frame
from core.errors import ConfigError


def _vocab(*skills: str) -> Vocabulary:
    return Vocabulary.build(pd.Series(skills), name="skill_id")


def test_disconnected_topics_of_the_graph_get_different_clusters():
    graph = PrerequisiteGraph.from_edges([("a", "b"), ("b", "c"), ("x", "y"), ("y", "z")])
    clusters = skill_clusters(_vocab("a", "b", "c", "x", "y", "z"), graph=graph)
    assert clusters["a"] == clusters["b"] == clusters["c"]
    assert clusters["x"] == clusters["y"] == clusters["z"]
    assert clusters["a"] != clusters["x"]


def test_cluster_count_is_capped_and_one_cluster_means_one_domain():
    pairs = [(f"p{i}", f"s{i}") for i in range(6)]  # six separate topics
    vocab = _vocab(*[s for pair in pairs for s in pair])
    graph = PrerequisiteGraph.from_edges(pairs)
    capped = skill_clusters(vocab, graph=graph, max_clusters=3)
    assert set(capped.values()) == {0, 1, 2}
    assert set(skill_clusters(vocab, graph=graph, max_clusters=1).values()) == {0}
    with pytest.raises(ConfigError, match="max_clusters"):
        skill_clusters(vocab, graph=graph, max_clusters=0)
    with pytest.raises(ConfigError, match="sequences or a prerequisite graph"):
        skill_clusters(vocab)


def test_skills_practised_together_share_a_cluster_without_a_graph():
    # Students alternate a<->b or c<->d, never mixing the two pairs.
    records = []
    for student in range(6):
        pair = ("a", "b") if student % 2 == 0 else ("c", "d")
        records += [
            Interaction(f"u{student}", f"{pair[i % 2]}/1", pair[i % 2], i % 2, order=i) for i in range(10)
        ]
    frame = validate_interactions(interactions_to_frame(records), source="<test>").frame
    items, skills = build_vocabularies(frame)
    clusters = skill_clusters(skills, sequences=to_sequences(frame, items, skills))
    assert clusters["a"] == clusters["b"] and clusters["c"] == clusters["d"]
    assert clusters["a"] != clusters["c"]


@pytest.fixture(scope="module")
def clustered(trained_world):
    """A small tracer with skill clusters from the prerequisite graph (a few seconds)."""
    from apps.education.predictor import KnowledgeTracer

    graph = PrerequisiteGraph.from_edges(trained_world.edges)
    return KnowledgeTracer(
        task_epochs=1,
        pretrain_epochs=0,
        batch_size=16,
        config_overrides=dict(hidden_size=16, n_routed_experts=2, moe_top_k=1),
    ).fit(trained_world.train, graph=graph)


def test_each_token_carries_its_skill_domain_and_the_start_token_domain_zero(clustered, trained_world):
    n_clusters = len(set(clustered.skill_clusters_.values()))
    assert 1 < n_clusters <= 8
    assert clustered.model_.config.domains == domain_names(n_clusters)
    skill_domain = domain_of_skill_index(clustered.skill_vocab_, clustered.skill_clusters_)
    sequences = to_sequences(trained_world.test, clustered.item_vocab_, clustered.skill_vocab_)
    example = to_examples(make_windows(sequences), skill_domain=skill_domain)[0]
    skills = example["categorical"]["skill"]
    assert example["domain_ids"][0] == 0
    expected = [clustered.skill_clusters_[clustered.skill_vocab_.tokens[s - 2]] + 1 for s in skills[1:]]
    assert example["domain_ids"][1:].tolist() == expected


def test_domain_ids_change_predictions_and_survive_save_and_load(clustered, trained_world, tmp_path):
    from apps.education.predictor import KnowledgeTracer

    head = trained_world.test.head(60)
    clustered.save(tmp_path / "model")
    loaded = KnowledgeTracer.load(tmp_path / "model")
    assert loaded.skill_clusters_ == clustered.skill_clusters_
    np.testing.assert_allclose(
        loaded.predict_proba(head)["p_correct"], clustered.predict_proba(head)["p_correct"]
    )
    loaded.skill_clusters_ = {}  # the same weights read without domain ids predict differently
    assert not np.allclose(
        loaded.predict_proba(head)["p_correct"], clustered.predict_proba(head)["p_correct"]
    )


def test_a_single_cluster_trains_a_single_domain_model(trained_world):
    assert trained_world.tracer.skill_clusters_ == {}
    assert trained_world.tracer.model_.config.domains == ["general"]

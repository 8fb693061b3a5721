"""Skill clusters: the MoE domain of each skill (one domain per subject / skill cluster).

Every token of the interaction sequence carries the domain id of its skill's cluster, so the router's
per-domain prior lets experts specialise per cluster. Clusters come from the prerequisite graph when one
is given (communities of its undirected form, so a connected topic stays together), otherwise from how
skills co-occur in the logs (communities of the graph whose edge weights count how often one skill
directly follows another in a student's sequence). Both use networkx's seeded Louvain method; more than
`max_clusters` communities are reduced by keeping the largest `max_clusters - 1` and pooling the rest.

Domain 0 (`"general"`) is the start token and skills the model never saw; cluster c is domain c + 1.
"""

from __future__ import annotations

import logging
from typing import Optional

import networkx as nx
import numpy as np

from apps.education.graph import PrerequisiteGraph
from apps.education.schema import StudentSequences, Vocabulary
from core.errors import ConfigError

logger = logging.getLogger(__name__)

GENERAL_DOMAIN = "general"
"""Domain 0: the start token and skills outside every cluster."""

DEFAULT_MAX_CLUSTERS = 8


def domain_names(n_clusters: int) -> list[str]:
    """`["general", "cluster_1", ..., "cluster_n"]`, the `CoreConfig.domains` of a model with n clusters."""
    return [GENERAL_DOMAIN, *(f"cluster_{c + 1}" for c in range(n_clusters))]


def skill_clusters(
    skill_vocab: Vocabulary,
    *,
    sequences: Optional[StudentSequences] = None,
    graph: Optional[PrerequisiteGraph] = None,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
    seed: int = 0,
) -> dict[str, int]:
    """Assign every skill of the vocabulary to one of at most `max_clusters` clusters.

    Args:
        skill_vocab: The model's skill vocabulary.
        sequences: Training sequences (`encode.to_sequences`); used when `graph` is None.
        graph: Prerequisite graph; its skills outside the vocabulary are ignored. Vocabulary skills
            outside it are singletons, pooled into the last cluster when communities exceed the cap.
        max_clusters: Upper bound on the number of clusters (1 puts every skill in one cluster).
        seed: Seeds the Louvain method.

    Returns:
        skill id -> cluster index in [0, n_clusters), with clusters numbered largest first.

    Raises:
        ConfigError: `max_clusters < 1`, or neither `sequences` nor `graph` given.
    """
    if max_clusters < 1:
        raise ConfigError(f"max_clusters must be at least 1; got {max_clusters}.")
    if sequences is None and graph is None:
        raise ConfigError("skill_clusters needs the training sequences or a prerequisite graph.")
    skills = list(skill_vocab.tokens)
    if max_clusters == 1 or len(skills) <= 1:
        return {s: 0 for s in skills}
    weighted = nx.Graph()
    weighted.add_nodes_from(skills)
    if graph is not None:
        known = set(skills)
        for prerequisite, skill in graph.edges().itertuples(index=False):
            if prerequisite in known and skill in known:
                weighted.add_edge(str(prerequisite), str(skill), weight=1.0)
    if sequences is not None and (graph is None or weighted.number_of_edges() == 0):
        for (a, b), count in _transitions(sequences, skill_vocab).items():
            weighted.add_edge(a, b, weight=float(count))
    communities = nx.community.louvain_communities(weighted, weight="weight", seed=seed)
    ranked = sorted((sorted(c) for c in communities), key=lambda c: (-len(c), c[0]))
    mapping: dict[str, int] = {}
    for index, community in enumerate(ranked):
        for skill in community:
            mapping[skill] = min(index, max_clusters - 1)
    logger.info(
        "skill clusters: %d communities -> %d clusters over %d skills (%s)",
        len(ranked),
        min(len(ranked), max_clusters),
        len(skills),
        "prerequisite graph" if graph is not None else "co-occurrence",
    )
    return mapping


def _transitions(sequences: StudentSequences, skill_vocab: Vocabulary) -> dict[tuple[str, str], int]:
    """Counts of (skill, next skill) pairs, unordered, over consecutive answers of the same student."""
    first = sequences.skills[:, 0]  # (N,) skill index of each answer's first skill
    same_student = np.ones(len(first), dtype=bool)
    same_student[sequences.offsets[1:-1]] = False  # the answer after a student's last is another student's
    a, b = first[:-1], first[1:]
    keep = same_student[1:] & (a >= 2) & (b >= 2) & (a != b)
    if not keep.any():
        return {}
    low, high = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    pairs, counts = np.unique(np.stack([low, high], axis=1), axis=0, return_counts=True)
    tokens = skill_vocab.tokens
    return {(tokens[int(i) - 2], tokens[int(j) - 2]): int(c) for (i, j), c in zip(pairs, counts, strict=True)}


def domain_of_skill_index(skill_vocab: Vocabulary, clusters: dict[str, int]) -> np.ndarray:
    """Domain id per skill vocabulary index (0 for padding, unknown and unclustered skills), shape (V,)."""
    out = np.zeros(len(skill_vocab), dtype=np.int64)
    for index, skill in enumerate(skill_vocab.tokens):
        if skill in clusters:
            out[index + 2] = clusters[skill] + 1
    return out

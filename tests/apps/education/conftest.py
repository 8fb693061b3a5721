"""Education test fixtures: the path to the shared real datasets (skipped with a reason when absent)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

SHARED_EDUCATION = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "education"


@pytest.fixture
def shared_education() -> Path:
    """`<repo root>/../shared/data/education`; skips the test when that folder is absent."""
    if not SHARED_EDUCATION.is_dir():
        pytest.skip(f"shared data not available at {SHARED_EDUCATION} (real datasets live outside the repo)")
    return SHARED_EDUCATION


@dataclass(frozen=True)
class TrainedWorld:
    """A small simulated class, split by student, and a tracer trained on the training students."""

    tracer: object
    train: pd.DataFrame
    test: pd.DataFrame
    edges: pd.DataFrame


@pytest.fixture(scope="session")
def trained_world() -> TrainedWorld:
    """Trains once per test session (about 15 s on one CPU thread)."""
    import torch

    from apps.education.predictor import KnowledgeTracer
    from apps.education.synthetic import LearnerConfig, generate

    torch.set_num_threads(1)  # the CI machine's 2 cores are shared
    torch.manual_seed(0)
    frame, edges, _ = generate(
        students=240,
        skills=8,
        items_per_skill=4,
        interactions_per_student=50,
        seed=1,
        config=LearnerConfig(student_ability_sd=1.2),
    )
    users = frame["user_id"].unique()
    train = frame[frame["user_id"].isin(users[:200])]
    test = frame[~frame["user_id"].isin(users[:200])]
    # One MoE domain: on 200 students the per-cluster domain parameters cost held-out AUC (measured 0.63-0.64
    # with clusters vs 0.69 without), while from 1,000 students on they are on par; test_clusters.py
    # trains its own small clustered model.
    tracer = KnowledgeTracer(
        task_epochs=10,
        pretrain_epochs=0.5,
        learning_rate=3e-3,
        batch_size=8,
        config_overrides=dict(hidden_size=32, n_routed_experts=2, moe_top_k=1),
        max_clusters=1,
    ).fit(train)
    return TrainedWorld(tracer=tracer, train=train, test=test, edges=edges)

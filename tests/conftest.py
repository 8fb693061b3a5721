"""Shared fixtures: tiny configs, seeding, a transactional in-memory database session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import CoreConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def tiny_config() -> CoreConfig:
    """d_model 32, 2 layers, 4 heads, 3 experts, blocks of 4 tokens: every code path at test size."""
    return CoreConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        block_size=4,
        top_k_blocks=1,
        dense_below=0,
        dense_tail_layers=0,
        n_routed_experts=3,
        n_shared_experts=1,
        moe_top_k=2,
        domains=("a", "b"),
    )

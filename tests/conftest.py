"""Shared fixtures: tiny configs, seeding, a transactional in-memory database session, one demo home."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session

import core.orm  # noqa: F401 - registers the core tables on Base.metadata
from core.config import CoreConfig
from core.db import Base, make_engine

if TYPE_CHECKING:
    from tests.e2e.suite import DemoHome


def load_bench(name: str) -> ModuleType:
    """A benchmark script under bench/ (not a package) loaded as a module, for tests of its helpers."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def db_session() -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back on teardown.

    ``join_transaction_mode="create_savepoint"`` turns the code under test's own ``commit()`` /
    ``begin()`` into savepoints, so nothing it does outlives the test.
    """
    engine = make_engine("sqlite://")
    Base.metadata.create_all(engine)
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()
        engine.dispose()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> DemoHome:
    """One `verticals demo --no-ui` run per test session (a few minutes on 2 cores), shared by the CLI test
    and the browser tests. Tests may add rows (analyst actions, reviews, assignments) but must not rely on
    being alone in it."""
    from tests.e2e.suite import run_demo

    return run_demo(tmp_path_factory.mktemp("demo") / "home")

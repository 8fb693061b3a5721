"""Finance fixtures: one small generated data set and one detector trained on it, shared by the tests."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from apps.finance.predictor import FraudDetector
from apps.finance.synthetic import generate


@dataclass(frozen=True)
class Trained:
    detector: FraudDetector
    train: pd.DataFrame
    test: pd.DataFrame
    model_dir: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A detector trained for a few seconds on 21 days of 300 accounts; tested on the next 7 days."""
    torch.set_num_threads(1)
    df = generate(300, 28, seed=3)
    cut = df["timestamp"].min() + pd.Timedelta(days=21)
    train, test = df[df["timestamp"] < cut], df[df["timestamp"] >= cut]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # a tiny validation set may not reach the target precision
        detector = FraudDetector(
            hidden_size=32,
            num_heads=2,
            epochs=6,
            pretrain_epochs=0.3,
            batch_size=32,
            learning_rate=3e-3,
            use_moe=False,
        ).fit(train)
    model_dir = detector.save(tmp_path_factory.mktemp("finance") / "model")
    return Trained(detector, train, test, model_dir)

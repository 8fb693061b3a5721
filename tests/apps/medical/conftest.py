"""Medical test fixtures: one small generated data set and a tiny diagnoser trained on it once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from apps.medical.schema import MedicalCase

TEST_SHAPE = (8, 32, 32)  # the smallest phantom: 8 slices of 32 x 32
BASE_LABELS = ("normal", "benign_nodule", "malignancy", "pneumonia", "tuberculosis")
N_TRAIN = 100
N_TEST = 80  # predictions are cheap; more test cases make the AUROC and accuracy checks less noisy
N_RARE = 24  # 8 support cases, 16 unseen siblings


@dataclass(frozen=True)
class TrainedDiagnoser:
    """A tiny diagnoser saved in `model_dir`, trained on `data_dir`'s first cases, with held-out cases."""

    diagnoser: object
    model_dir: Path
    data_dir: Path
    train: list[MedicalCase]
    test: list[MedicalCase]
    rare: list[MedicalCase]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedDiagnoser:
    """Trains once per test session (a few seconds on one CPU thread)."""
    import torch

    from apps.medical.adapters import read_cases
    from apps.medical.predictor import Diagnoser
    from apps.medical.synthetic import generate

    torch.set_num_threads(1)  # the CI machine's 2 cores are shared
    root = tmp_path_factory.mktemp("medical")
    data_dir = root / "data"
    labels = [BASE_LABELS[i % len(BASE_LABELS)] for i in range(N_TRAIN + N_TEST)] + ["miliary"] * N_RARE
    generate(data_dir, len(labels), seed=3, shape=TEST_SHAPE, labels=labels)
    cases = read_cases(data_dir)
    train, test, rare = cases[:N_TRAIN], cases[N_TRAIN : N_TRAIN + N_TEST], cases[N_TRAIN + N_TEST :]
    diagnoser = Diagnoser(
        "tiny", epochs=40, pretrain_epochs=1, learning_rate=3e-3, batch_size=8, show_progress=False
    ).fit(train)
    model_dir = diagnoser.save(root / "model")
    return TrainedDiagnoser(diagnoser, model_dir, data_dir, train, test, rare)

"""Use cases of the medical app: train/evaluate, diagnose a case into the review queue, clinician review, demo.

Patient identifiers never reach the database: a diagnosis stores the HMAC pseudonym of the patient id,
keyed by a secret the entry point obtains with `load_secret` (``VERTICALS_SECRET``, else a random secret
generated once into the home folder). Every stored diagnosis carries the model version (hash of the
weights), the config hash, the input paths and a hash of the input files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apps.medical import repository
from apps.medical.adapters import read_case, read_cases
from apps.medical.auth import generate_password, hash_password, verify_password
from apps.medical.orm import Clinician, DiagnosisCase, ReviewEvent
from apps.medical.records import MIN_SECRET_BYTES, pseudonymise
from apps.medical.schema import MedicalCase
from core.errors import ConfigError, InputValidationError

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy.orm import Session, sessionmaker

    from apps.medical.predictor import Diagnoser, Explanation

logger = logging.getLogger(__name__)

SECRET_ENV = "VERTICALS_SECRET"
SECRET_FILE = "medical_secret"
VALIDATION_EVERY = 5  # `train_model` holds out 1 case in 5 for validation


# ---------------------------------------------------------------------------------------------------------
# secrets and hashes


def load_secret(home: Path, environ: Mapping[str, str]) -> str:
    """The pseudonymisation secret: ``VERTICALS_SECRET``, else ``<home>/medical_secret`` (created once).

    The generated file holds 32 random bytes in hex and is readable by its owner only.

    Raises:
        ConfigError: a secret shorter than 16 bytes.
    """
    value = environ.get(SECRET_ENV)
    if not value:
        path = Path(home) / SECRET_FILE
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
            logger.info("generated a pseudonymisation secret in %s", path)
        value = path.read_text().strip()
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{SECRET_ENV}: expected a secret of at least {MIN_SECRET_BYTES} bytes; use secrets.token_hex(32)"
        )
    return value


def input_hash(series_dir: Path | None, record_file: Path) -> str:
    """SHA-256 over the series files (relative name + bytes, sorted) and the record file."""
    digest = hashlib.sha256()
    if series_dir is not None:
        series_dir = Path(series_dir)
        files = (
            sorted(p for p in series_dir.rglob("*") if p.is_file()) if series_dir.is_dir() else [series_dir]
        )
        for path in files:
            digest.update(str(path.relative_to(series_dir) if series_dir.is_dir() else path.name).encode())
            digest.update(path.read_bytes())
    digest.update(b"record:")
    digest.update(Path(record_file).read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# training and evaluation


@dataclass(frozen=True)
class TrainResult:
    """What `train_model` did: the saved model, its validation metrics, and the case counts."""

    model_dir: Path
    metrics: dict[str, float]
    train_cases: int
    validation_cases: int
    data_fingerprint: str


def split_cases(cases: Sequence[MedicalCase], seed: int = 0) -> tuple[list[MedicalCase], list[MedicalCase]]:
    """Deterministic split: a seeded random fifth of the cases is held out for validation.

    Random rather than every n-th case, so that a data set listed in a label cycle still puts every label
    on both sides.
    """
    import numpy as np

    held = set(np.random.default_rng(seed).permutation(len(cases))[: len(cases) // VALIDATION_EVERY].tolist())
    train = [c for i, c in enumerate(cases) if i not in held]
    validation = [c for i, c in enumerate(cases) if i in held]
    return train, validation


def train_model(
    data_dir: Path,
    model_dir: Path,
    *,
    preset: str = "small",
    epochs: float = 8.0,
    pretrain_epochs: float = 2.0,
    learning_rate: float = 2e-3,
    batch_size: int = 8,
    exclude_labels: Sequence[str] = (),
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
) -> tuple[Diagnoser, TrainResult]:
    """Read a data set, train a diagnoser on 4/5 of it (seeded split), evaluate on the rest, save the model.

    Args:
        data_dir: a folder with ``cases.csv`` (see `apps.medical.adapters.read_cases`).
        model_dir: where to write the model (a new or existing model folder is overwritten).
        preset, epochs, pretrain_epochs, learning_rate, batch_size, seed, device: see `Diagnoser`.
        exclude_labels: labels left out of training (e.g. a rare class to add later with `add_class`).
        show_progress: progress bars.

    Returns:
        The fitted diagnoser and a `TrainResult`.

    Raises:
        InputValidationError: unlabelled cases, or fewer than two classes left.
    """
    from apps.medical.predictor import Diagnoser, classification_metrics

    cases = [c for c in read_cases(data_dir) if c.label not in set(exclude_labels)]
    train, validation = split_cases(cases)
    diagnoser = Diagnoser(
        preset,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        device=device,
        show_progress=show_progress,
    ).fit(train)
    known = [c for c in validation if c.label in diagnoser.labels_]
    metrics: dict[str, float] = {}
    if known:
        metrics = classification_metrics(
            [c.label for c in known], diagnoser.predict_proba(known), diagnoser.classes_
        )
    diagnoser.save(model_dir, metrics=metrics)
    return diagnoser, TrainResult(
        model_dir=Path(model_dir),
        metrics=metrics,
        train_cases=len(train),
        validation_cases=len(known),
        data_fingerprint=diagnoser.data_fingerprint_,
    )


def evaluate_model(diagnoser: Diagnoser, data_dir: Path) -> dict[str, float]:
    """Accuracy, AUROC per class, Brier and ECE of a diagnoser on every labelled case of a data set.

    Cases whose label is not a class of the model are left out (counted in ``"skipped"``).
    """
    from apps.medical.predictor import classification_metrics

    cases = read_cases(data_dir)
    known = [c for c in cases if c.label in diagnoser.classes_]
    if not known:
        raise InputValidationError(
            f"{data_dir}: no case has a label among the model's classes {diagnoser.classes_}"
        )
    metrics = classification_metrics(
        [c.label for c in known], diagnoser.predict_proba(known), diagnoser.classes_
    )
    metrics["skipped"] = float(len(cases) - len(known))
    return metrics


def support_cases(sources: Sequence[Path], name: str) -> list[MedicalCase]:
    """Confirmed cases for `add_class` from folders: a data set (``cases.csv``; its cases labelled `name`,
    or all of them when none is) or a single case folder (``record.json`` and optionally ``ct/``).

    Raises:
        InputValidationError: a folder that is neither, or no case found.
    """
    found: list[MedicalCase] = []
    for source in sources:
        source = Path(source)
        if (source / "cases.csv").is_file():
            cases = read_cases(source)
            matching = [c for c in cases if c.label == name]
            found.extend(matching or cases)
        elif (source / "record.json").is_file():
            series = source / "ct"
            found.append(
                read_case(
                    series if series.is_dir() else None,
                    source / "record.json",
                    case_id=source.name,
                    label=name,
                )
            )
        else:
            raise InputValidationError(
                f"{source}: expected a data set folder (cases.csv) or a case folder (record.json and ct/)"
            )
    if not found:
        raise InputValidationError(
            f"add-class {name!r}: no support cases found in {[str(s) for s in sources]}"
        )
    return found


# ---------------------------------------------------------------------------------------------------------
# diagnosis and review


def diagnose(
    session: Session,
    diagnoser: Diagnoser,
    *,
    series_dir: Path | None,
    record_file: Path,
    secret: str,
) -> tuple[DiagnosisCase, Explanation]:
    """Diagnose one case and store it as pending in the review queue (flushed, not committed).

    The same inputs diagnosed by the same model version again return the stored case (no duplicate row).

    Args:
        session: the caller's session.
        diagnoser: a fitted diagnoser loaded from (or saved to) a model directory.
        series_dir: the CT series (None: record only).
        record_file: the patient record (JSON/CSV).
        secret: the pseudonymisation secret (see `load_secret`).

    Returns:
        The stored case and the explanation.

    Raises:
        AdapterError, InputValidationError: unreadable or invalid inputs (names the file and the tag/field).
    """
    case = read_case(series_dir, record_file, case_id=Path(record_file).parent.name or "case")
    explanation = diagnoser.explain(case)
    hashed = input_hash(series_dir, record_file)
    version = diagnoser.model_version_
    existing = repository.find_case_by_inputs(session, hashed, version)
    if existing is not None:
        return existing, explanation
    stored = repository.add_case(
        session,
        patient_pseudonym=pseudonymise(case.record.patient_id, secret),
        series_path=str(Path(series_dir).resolve()) if series_dir is not None else None,
        record_path=str(Path(record_file).resolve()),
        input_hash=hashed,
        model_dir=str(Path(diagnoser.model_dir_).resolve()),
        model_version=version,
        config_hash=diagnoser.config_hash_,
        prediction=explanation.label,
        probabilities=explanation.probabilities,
        evidence=explanation.to_dict(),
    )
    return stored, explanation


def create_clinician(
    session: Session, username: str, *, role: str = "clinician", password: str | None = None
) -> tuple[Clinician, str]:
    """Create an account; returns it and its password (generated when not given; show it once)."""
    password = password or generate_password()
    clinician = repository.add_clinician(
        session, username=username, password_hash=hash_password(password), role=role
    )
    return clinician, password


def authenticate(session: Session, username: str, password: str) -> Clinician:
    """The account when the password matches.

    Raises:
        InputValidationError: unknown user or wrong password (one message for both).
    """
    clinician = repository.get_clinician(session, username)
    if clinician is None or not verify_password(password, clinician.password_hash):
        raise InputValidationError("login failed: unknown username or wrong password")
    return clinician


def review_case(
    session: Session,
    *,
    case_id: int,
    clinician: Clinician,
    action: str,
    final_label: str | None = None,
    reason: str = "",
) -> ReviewEvent:
    """Record a clinician's decision as an append-only audit row (flushed, not committed).

    Args:
        session: the caller's session.
        case_id: the case reviewed.
        clinician: the reviewer (from `authenticate`).
        action: ``"accept"`` (the final label is the model's prediction) or ``"override"``.
        final_label: the clinician's diagnosis (required for an override).
        reason: why (required for an override).

    Raises:
        InputValidationError: unknown case, an override without a label or reason, an unknown action.
    """
    case = repository.get_case(session, case_id)
    if action == "accept":
        label = case.prediction
    else:
        if not final_label:
            raise InputValidationError(f"case {case_id}: an override needs the corrected diagnosis")
        label = final_label
    return repository.add_review(session, case, clinician, action=action, final_label=label, reason=reason)


def summary(case: DiagnosisCase) -> dict[str, Any]:
    """A JSON-ready view of a stored diagnosis (no identifier beyond the pseudonym)."""
    return {
        "case_id": case.id,
        "patient_pseudonym": case.patient_pseudonym,
        "prediction": case.prediction,
        "probabilities": case.probabilities,
        "status": case.status,
        "model_version": case.model_version,
        "config_hash": case.config_hash,
        "input_hash": case.input_hash,
        "series_path": case.series_path,
        "record_path": case.record_path,
        "evidence": {k: v for k, v in case.evidence.items() if k != "patch_map"},
    }


# ---------------------------------------------------------------------------------------------------------
# demo

DEMO_CASES = 48
DEMO_SEED = 7
DEMO_SHAPE = (24, 64, 64)
DEMO_PRESET = "small"
DEMO_EPOCHS = 24.0
DEMO_LEARNING_RATE = 5e-3  # 36 training cases: at 2e-3 for 12 epochs the model stayed at its class prior
DEMO_QUEUE = 12
DEMO_USER = "demo"


def demo(home: Path, session_factory: sessionmaker[Session], console: Console) -> None:
    """Generate small cases, train a small diagnoser, fill the review queue, create a demo clinician.

    Reuses whatever exists from an earlier run (data, model, stored cases, the account).
    """
    from apps.medical.predictor import Diagnoser
    from apps.medical.synthetic import LABELS, RARE_LABELS, generate
    from core.repository import record_model_run
    from core.train import code_version

    root = Path(home) / "medical"
    data_dir, model_dir = root / "demo_data", root / "demo_model"
    if not (data_dir / "cases.csv").is_file():
        # Every label appears; the rare one only in the last cases, to be added as a few-shot class.
        base = [label for label in LABELS if label not in RARE_LABELS]
        labels = [base[i % len(base)] for i in range(DEMO_CASES - 4)] + [RARE_LABELS[0]] * 4
        with console.status(f"medical: generating {DEMO_CASES} phantom CT cases in {data_dir}"):
            generate(data_dir, DEMO_CASES, DEMO_SEED, shape=DEMO_SHAPE, labels=labels)
    if (model_dir / "prototypes.json").is_file():
        diagnoser = Diagnoser.load(model_dir)
        console.print(f"medical: reusing the model in {model_dir}")
    else:
        console.print(f"medical: training a small diagnoser ({DEMO_PRESET} preset, {DEMO_EPOCHS:g} epochs)")
        diagnoser, result = train_model(
            data_dir,
            model_dir,
            preset=DEMO_PRESET,
            epochs=DEMO_EPOCHS,
            learning_rate=DEMO_LEARNING_RATE,
            pretrain_epochs=1.0,
            exclude_labels=RARE_LABELS,
        )
        rare = [c for c in read_cases(data_dir) if c.label in RARE_LABELS]
        support = rare[: len(rare) // 2]
        diagnoser.add_class(RARE_LABELS[0], support).save_prototypes(model_dir)
        with session_factory() as session, session.begin():
            record_model_run(
                session,
                model_dir=model_dir,
                app="medical",
                metrics=result.metrics,
                data_fingerprint=result.data_fingerprint,
                code_version=code_version(),
            )
        shown = {k: round(v, 3) for k, v in result.metrics.items() if k in ("accuracy", "auroc_macro", "ece")}
        console.print(f"medical: model saved to {model_dir}; validation {shown}")
    secret = load_secret(home, os.environ)
    cases = read_cases(data_dir)
    _, validation = split_cases(cases)
    queue = (validation + [c for c in cases if c.label in RARE_LABELS])[:DEMO_QUEUE]
    with session_factory() as session, session.begin():
        for case in queue:
            diagnose(
                session, diagnoser, series_dir=case.series_dir, record_file=case.record_file, secret=secret
            )
        count = len(repository.list_cases(session))
        if repository.get_clinician(session, DEMO_USER) is None:
            _, password = create_clinician(session, DEMO_USER, role="clinician")
            console.print(
                f"medical: review UI account [bold]{DEMO_USER}[/bold] / password [bold]{password}[/bold] "
                "(shown once; stored only as a scrypt hash)"
            )
        else:
            console.print(
                f"medical: review UI account {DEMO_USER!r} exists (password shown on the first run)"
            )
    console.print(f"medical: {count} cases in the review queue")


def evidence_overlay(case: DiagnosisCase, volume_shape: Sequence[int], volume: Any) -> Any:
    """The stored CT attention map of a case projected onto its series voxels, ``(S, R, C)`` in [0, 1].

    Returns None when the case had no CT (there is no map to show).
    """
    import numpy as np

    from apps.medical.config import VolumeGrid
    from apps.medical.encode import patch_map_to_volume

    patch_map = case.evidence.get("patch_map")
    if patch_map is None:
        return None
    grid = VolumeGrid.from_dict(case.evidence["grid"])
    per_voxel = patch_map_to_volume(np.asarray(patch_map, dtype=np.float32), volume_shape, volume, grid)
    peak = float(per_voxel.max())
    return per_voxel / peak if peak > 0 else per_voxel

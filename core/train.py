"""Two-stage fine-tuning on transformers.Trainer, seeding, and model-directory checkpoints.

Stage 1 (domain adaptation): masked-field modelling on unlabelled records — random tokens are replaced by
a mask embedding and the model reconstructs their fields. Stage 2 (task): the app's labels. Both stages
are plain `transformers.Trainer` runs, so bf16/fp16, gradient checkpointing and several GPUs under
`torchrun`/`accelerate` come with it; the MoE balance callback keeps expert load even.

A model directory holds `config.json` + `model.safetensors` (`save_pretrained`) and `app.json`
(vocabularies, thresholds, data fingerprint, code version) — see `save_checkpoint` / `load_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from core.config import CoreConfig
from core.data import collate
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel
from core.moe import MoEBalanceCallback

logger = logging.getLogger(__name__)

APP_FILE = "app.json"
METRICS_FILE = "metrics.json"
SUITE_FILE = "suite.json"
TASK_TARGETS = ("labels", "token_labels", "next_item_ids", "next_labels")


class ExampleDataset(Dataset):
    """A list of encoded examples (see `core.data`) as a torch Dataset.

    Args:
        examples: the encoded examples.
        transform: applied to an example each time it is read (training-time augmentation); it must
            return a new example and leave its argument unchanged.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        transform: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ) -> None:
        self.examples = list(examples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        example = self.examples[index]
        return example if self.transform is None else self.transform(example)


@dataclass
class TrainingPlan:
    """What an app's `fit` prepares before training, so that another trainer (the suite) can train it.

    Attributes:
        config: the CoreConfig of the app's model.
        task_examples: labelled examples of stage 2 (see `core.data`).
        pretrain_examples: examples of stage 1 (masked-field modelling; task targets are dropped).
        context: the app's own state needed to finish fitting (encoders, validation data, ...).
    """

    config: CoreConfig
    task_examples: list[Mapping[str, Any]]
    pretrain_examples: list[Mapping[str, Any]]
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskCollator:
    """Collates examples with their task targets (stage 2)."""

    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return collate(examples, self.pad_to_multiple_of).to_dict()


@dataclass
class MaskedFieldCollator:
    """Collates examples without task targets and masks a share of each sequence's tokens (stage 1).

    Every sequence gets at least one masked token; padding is never masked.

    Args:
        mask_probability: share of real tokens replaced by the mask embedding.
        seed: seed of the masking generator (masks differ per batch, reproducibly).
    """

    mask_probability: float = 0.15
    seed: int = 0
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_probability < 1.0:
            raise ConfigError(f"mask_probability: expected a float in (0, 1), got {self.mask_probability!r}")
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        unlabelled = [{k: v for k, v in e.items() if k not in TASK_TARGETS} for e in examples]
        batch = collate(unlabelled, self.pad_to_multiple_of)
        valid = batch.attention_mask
        draw = torch.rand(valid.shape, generator=self._generator)
        mask = (draw < self.mask_probability) & valid
        # Guarantee one masked token per sequence: the real token with the smallest draw.
        smallest = draw.masked_fill(~valid, 2.0).argmin(dim=1)
        mask[torch.arange(len(batch)), smallest] = True
        batch.mfm_mask = mask & valid
        return batch.to_dict()


def default_training_args(
    output_dir: str | Path,
    *,
    epochs: float = 1.0,
    learning_rate: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    max_steps: int = -1,
    **overrides: Any,
) -> TrainingArguments:
    """TrainingArguments with the suite's defaults: bf16 on a GPU that supports it, no external loggers,
    no intermediate checkpoints (the model directory is written once by `save_checkpoint`)."""
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        weight_decay=0.01,
        warmup_steps=0.05,  # a float below 1 is a share of the total steps
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=use_bf16,
        remove_unused_columns=False,  # examples are dicts of arrays, not named model inputs
        # Routed experts that receive no token in a step have no gradient; DDP must allow that.
        ddp_find_unused_parameters=True,
        # Each rank keeps its own expert-load counts; update_balance() sums them across ranks.
        ddp_broadcast_buffers=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )
    args.update(overrides)
    return TrainingArguments(**args)


def run_stage(
    model: CoreModel,
    dataset: Dataset,
    args: TrainingArguments,
    collator: TaskCollator | MaskedFieldCollator,
    eval_dataset: Dataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, float]:
    """One Trainer run; returns the training metrics (loss, runtime, samples/s)."""
    if len(dataset) == 0:
        raise InputValidationError("training stage got an empty dataset")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[MoEBalanceCallback(), *callbacks],
    )
    result = trainer.train()
    return dict(result.metrics)


def fit_two_stage(
    model: CoreModel,
    task_dataset: Dataset,
    output_dir: str | Path,
    *,
    pretrain_dataset: Dataset | None = None,
    pretrain_args: TrainingArguments | None = None,
    task_args: TrainingArguments | None = None,
    mask_probability: float = 0.15,
    eval_dataset: Dataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Stage 1 masked-field modelling (when `pretrain_dataset` is given), then stage 2 task fine-tuning.

    Args:
        model: the model to train in place.
        task_dataset: labelled examples for stage 2.
        output_dir: Trainer working directory (logs); the model directory is written by `save_checkpoint`.
        pretrain_dataset: unlabelled examples for stage 1 (labels, if present, are dropped).
        pretrain_args, task_args: TrainingArguments per stage (default: `default_training_args`).
        mask_probability: share of tokens masked in stage 1.
        eval_dataset: optional evaluation set for stage 2.
        callbacks: extra Trainer callbacks (progress, early stopping).
        seed: seeds Python, NumPy and torch before each stage.

    Returns:
        {"pretrain": metrics, "task": metrics} (the first only when stage 1 ran).
    """
    output_dir = Path(output_dir)
    metrics: dict[str, dict[str, float]] = {}
    if pretrain_dataset is not None:
        set_seed(seed)
        args = pretrain_args or default_training_args(output_dir / "pretrain", seed=seed)
        collator = MaskedFieldCollator(mask_probability, seed=seed)
        metrics["pretrain"] = run_stage(model, pretrain_dataset, args, collator, callbacks=callbacks)
        logger.info("stage 1 (masked-field) done: %s", metrics["pretrain"])
    set_seed(seed)
    args = task_args or default_training_args(output_dir / "task", seed=seed)
    metrics["task"] = run_stage(
        model, task_dataset, args, TaskCollator(), eval_dataset=eval_dataset, callbacks=callbacks
    )
    logger.info("stage 2 (task) done: %s", metrics["task"])
    return metrics


# ---------------------------------------------------------------------- stage 0: the CT stem alone
class VolumeStemClassifier(nn.Module):
    """A volume stem (`core.embeddings.ConvStem`) under a global max-and-mean pool and a linear head.

    Stage 0 of a model with a CT stem: the image encoder trained alone on the task labels before the
    sequence model sees it. A few lesion voxels among a whole chest give a CNN a long plateau before it
    finds them, and inside the full model (whose record tokens fit the labels early) the stem may never
    leave it; trained alone, as a plain classifier, it does. Max pooling lets one patch decide; the mean
    keeps every position in the gradient while none stands out yet (measured: a max-only pool stalled in
    one run of three at the same settings).
    """

    def __init__(self, stem: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.stem = stem
        self.head = nn.Linear(2 * stem.out_channels, num_labels)

    def forward(self, volume: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.stem(volume).flatten(2)  # (B, C, N)
        logits = self.head(torch.cat([features.amax(-1), features.mean(-1)], dim=-1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


@dataclass
class VolumeCollator:
    """Collates the CT volume and the label of examples (stage 0)."""

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        volume = torch.stack(
            [torch.as_tensor(np.asarray(e["volume"]), dtype=torch.float32) for e in examples]
        )
        return {"volume": volume, "labels": torch.as_tensor([int(e["labels"]) for e in examples])}


def pretrain_volume_stem(
    model: CoreModel,
    examples: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    *,
    epochs: float = 30.0,
    learning_rate: float = 3e-4,
    batch_size: int = 32,
    transform: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    freeze: bool = True,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, float]:
    """Stage 0: train `model`'s CT stem as an image-only classifier of the task labels, in place.

    The recipe measured to leave the CT plateau reliably (bench/results/medical_stem_sweep.md): AdamW
    (weight decay 0.05) under a one-cycle schedule peaking at `learning_rate`, no gradient clipping.

    Args:
        model: a CoreModel whose config has ``volume_stem_channels > 0``.
        examples: labelled examples; those without a CT (``volume_present`` False) are left out.
        output_dir: Trainer working directory.
        epochs: passes over the examples with a CT.
        learning_rate: the schedule's peak.
        batch_size: volumes per step.
        transform: training augmentation applied to each example read (e.g. a left-right mirror).
        freeze: stop the stem's gradients afterwards, so the later stages train on the features it found.
        seed: seeds the head's initialisation and the data order.
        overrides: further `TrainingArguments` (e.g. ``use_cpu``, ``disable_tqdm``).

    Returns:
        The Trainer's training metrics (loss, runtime, samples/s).

    Raises:
        ConfigError: the model has no CT stem.
        InputValidationError: no example has a CT, or one has no label.
    """
    stem = model.volume_embedder.stem
    if stem is None:
        raise ConfigError("pretrain_volume_stem: the model has no CT stem (volume_stem_channels is 0)")
    if not model.config.num_labels:
        raise ConfigError("pretrain_volume_stem: the model has no classification labels (num_labels is 0)")
    with_ct = [e for e in examples if e.get("volume_present", True) and "volume" in e]
    if not with_ct:
        raise InputValidationError("pretrain_volume_stem: no training example has a CT volume")
    if any("labels" not in e for e in with_ct):
        raise InputValidationError("pretrain_volume_stem: every example needs its label ('labels')")
    set_seed(seed)
    classifier = VolumeStemClassifier(stem, model.config.num_labels)
    steps = max(1, math.ceil(epochs * math.ceil(len(with_ct) / batch_size)))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    args = default_training_args(
        output_dir,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        max_steps=steps,
        max_grad_norm=0.0,
        logging_steps=max(1, steps // 20),
        **overrides,
    )
    trainer = Trainer(
        model=classifier,
        args=args,
        train_dataset=ExampleDataset(with_ct, transform),
        data_collator=VolumeCollator(),
        optimizers=(optimizer, schedule),
    )
    metrics = dict(trainer.train().metrics)
    logger.info("stage 0 (CT stem) done: %s", metrics)
    if freeze:
        stem.requires_grad_(False)
    return metrics


# ---------------------------------------------------------------------- model directories
def code_version() -> str:
    """The installed verticals version (recorded in every model directory)."""
    try:
        return metadata.version("verticals")
    except metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(*parts: bytes | str) -> str:
    """SHA-256 over the given data (a training-data fingerprint for app.json and model_runs)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise InputValidationError(f"a non-finite number ({value}) cannot be stored in a model directory")
    return value


def save_checkpoint(
    model: CoreModel,
    model_dir: str | Path,
    app_meta: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model directory: config.json + model.safetensors, app.json, and metrics.json.

    Args:
        model: the trained model.
        model_dir: target folder (created).
        app_meta: app name, schema version, vocabularies, thresholds, data fingerprint (JSON-serialisable).
        metrics: evaluation metrics to store beside it.

    Returns:
        The model directory.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    meta = {"code_version": code_version(), **_json_safe(dict(app_meta))}
    (model_dir / APP_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if metrics is not None:
        (model_dir / METRICS_FILE).write_text(json.dumps(_json_safe(dict(metrics)), indent=2, sort_keys=True))
    return model_dir


def resolve_model_dir(model_dir: str | Path, domain: str | None = None) -> Path:
    """The model directory to load: a suite directory (with `suite.json`) resolves to its part `DIR/<domain>`.

    Args:
        model_dir: an app's model directory, or a suite directory written by `verticals suite train`.
        domain: the suite domain (app) to load from a suite directory; with an app's own directory it
            must be None or that directory's app.

    Returns:
        The directory holding config.json, model.safetensors and app.json.

    Raises:
        InputValidationError: a suite directory without `domain`, an unknown domain (names the known ones),
            or a domain that does not match an app's own directory.
    """
    model_dir = Path(model_dir)
    suite_file = model_dir / SUITE_FILE
    if suite_file.is_file():
        known = list(json.loads(suite_file.read_text()).get("domains", []))
        if domain is None:
            raise InputValidationError(
                f"{model_dir}: a suite model directory; choose its part with --domain, one of {known}"
            )
        if domain not in known or not (model_dir / domain).is_dir():
            raise InputValidationError(
                f"{model_dir}: the suite model has no domain {domain!r}; known domains: {known}"
            )
        return model_dir / domain
    if domain is not None and (model_dir / APP_FILE).is_file():
        app = json.loads((model_dir / APP_FILE).read_text()).get("app")
        if app != domain:
            raise InputValidationError(
                f"{model_dir}: not a suite model directory but a model of app {app!r}; "
                f"--domain {domain!r} applies to suite directories (drop it, or pass --domain {app})"
            )
    return model_dir


def weights_file(model_dir: str | Path) -> Path:
    """The weights of a model directory: model.safetensors, or model.onnx for a `core.compress` int8 artifact."""
    model_dir = Path(model_dir)
    onnx_file = model_dir / "model.onnx"
    if onnx_file.is_file() and not (model_dir / "model.safetensors").is_file():
        return onnx_file
    return model_dir / "model.safetensors"


def load_checkpoint(
    model_dir: str | Path, device: str | torch.device = "cpu", domain: str | None = None
) -> tuple[CoreModel, dict[str, Any]]:
    """Load a model directory written by `save_checkpoint`: (model in eval mode, app.json contents).

    Args:
        model_dir: the model directory, or a suite directory (then `domain` picks its part, see
            `resolve_model_dir`).
        device: where the model goes.
        domain: the suite domain to load from a suite directory.

    Raises:
        InputValidationError: when the folder is not a model directory (names the missing file), or a suite
            directory without a valid `domain`.
    """
    model_dir = resolve_model_dir(model_dir, domain)
    if weights_file(model_dir).name == "model.onnx":
        # An int8 artifact of `core.compress`: an ONNX Runtime model with the CoreModel call interface.
        from core.onnx_model import OnnxCoreModel

        for name in ("config.json", APP_FILE):
            if not (model_dir / name).is_file():
                raise InputValidationError(f"{model_dir}: not a verticals model directory ({name} missing)")
        return OnnxCoreModel(model_dir).to(device), json.loads((model_dir / APP_FILE).read_text())
    for name in ("config.json", "model.safetensors", APP_FILE):
        if not (model_dir / name).is_file():
            raise InputValidationError(
                f"{model_dir}: not a verticals model directory ({name} missing); "
                "train one with `verticals <app> train --out DIR`"
            )
    config = CoreConfig.from_pretrained(model_dir)
    model = CoreModel.from_pretrained(model_dir, config=config).to(device).eval()
    meta = json.loads((model_dir / APP_FILE).read_text())
    return model, meta


def load_metrics(model_dir: str | Path) -> dict[str, Any]:
    """metrics.json of a model directory ({} when absent)."""
    path = Path(model_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}

"""Diagnoser: the scikit-learn-style CT-plus-record classifier over the core model, with few-shot classes.

CT patch tokens and record field tokens share one sequence through `CoreModel` (dynamic attention + domain
MoE); training is two-stage (masked-field pretraining on the cases without labels, then classification).
Few-shot classes are prototypes in the model's embedding space (the prototype head's L2-normalised
output): `add_class` averages the embeddings of a few confirmed cases, without retraining. At prediction
the prototype path estimates how likely the case belongs to an added class (softmax over cosine logits of
every prototype, base classes included); the classifier shares the remaining probability among the base
classes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apps.medical.config import APP_NAME, SCHEMA_VERSION, VolumeGrid, core_config, grid_for
from apps.medical.encode import (
    CATEGORICAL_VOCAB,
    NUMERIC_FEATURES,
    RECORD_FIELDS,
    encode_cases,
    fit_record_stats,
    patch_indices,
    record_values,
    without_field,
)
from apps.medical.schema import MedicalCase
from core.config import CoreConfig
from core.data import collate
from core.errors import ConfigError, InputValidationError, NotFittedError
from core.model import CoreModel, prototype_logits
from core.train import (
    ExampleDataset,
    TrainingPlan,
    default_training_args,
    fingerprint,
    fit_two_stage,
    load_checkpoint,
    pretrain_volume_stem,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

PROTOTYPE_WEIGHTS = "prototypes.safetensors"
PROTOTYPE_INDEX = "prototypes.json"
PROTOTYPE_SCALE = 10.0
INFERENCE_BATCH = 8


@dataclass
class Explanation:
    """Why the diagnoser predicted what it did for one case.

    Attributes:
        label: the predicted class.
        probabilities: class -> probability.
        volume_present: whether the case had a CT volume.
        patch_map: ``grid.patch_grid``-shaped share of the evidence each CT patch carries (sums to 1; see
            `Diagnoser.explain`), or None without CT.
        top_slices: original slice indices with the most evidence, best first.
        regions: the most attended CT patches: ``{"score", "slices" [first, last], "rows" [first, last],
            "cols" [first, last]}`` in original voxel indices.
        record_fields: per present record field, ``{"field", "value", "effect"}``: the drop in the
            predicted class's probability when the field is hidden (occlusion), largest magnitude first.
        grid: the CT grid the model saw (to project `patch_map` onto the series).
    """

    label: str
    probabilities: dict[str, float]
    volume_present: bool
    patch_map: np.ndarray | None
    top_slices: list[int]
    regions: list[dict[str, Any]]
    record_fields: list[dict[str, Any]]
    grid: VolumeGrid

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready evidence (stored with each diagnosis)."""
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "volume_present": self.volume_present,
            "patch_map": None if self.patch_map is None else np.round(self.patch_map, 6).tolist(),
            "top_slices": self.top_slices,
            "regions": self.regions,
            "record_fields": self.record_fields,
            "grid": self.grid.to_dict(),
        }


@dataclass
class _Prototypes:
    base: torch.Tensor  # (K_base, P) one per classifier label
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (P,)
    shots: dict[str, list[str]] = field(default_factory=dict)  # name -> support case ids


class MirrorVolume:
    """Training augmentation: an example's CT mirrored left-right (the last axis) with probability 0.5.

    Returns a new example when it mirrors (the stored one is never changed); cases without CT pass as is.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, example: Mapping[str, Any]) -> Mapping[str, Any]:
        if not example.get("volume_present", False) or self.rng.random() >= 0.5:
            return example
        return {**example, "volume": np.ascontiguousarray(example["volume"][..., ::-1])}


class Diagnoser:
    """CT-plus-record diagnosis with a classification head and few-shot prototype classes.

    Args:
        preset: model and CT-grid preset of `apps.medical.config` (``"small"``, ``"tiny"``).
        labels: the classifier's classes in order; default: the labels present in the training cases.
        epochs: task fine-tuning epochs (stage 2).
        pretrain_epochs: masked-field pretraining epochs (stage 1); 0 skips it.
        batch_size: training batch size.
        learning_rate: peak learning rate (both stages).
        seed: seeds training.
        device: torch device of training and inference.
        show_progress: show the Trainer's progress bars.
        config_overrides: `CoreConfig` fields replacing the preset's (e.g. ``{"volume_stem_channels": 16}``).
        augment: during training, mirror each CT left-right with probability 0.5 each time it is read
            (a lesion may lie in either lung; with a few hundred cases this doubles what the CT side sees).
        stem_epochs: with a CT stem (``volume_stem_channels`` > 0), epochs of stage 0, the stem trained
            alone as an image-only classifier (`core.train.pretrain_volume_stem`); 0 skips it.
        stem_learning_rate: peak learning rate of stage 0.
        freeze_stem: keep the stem as stage 0 left it during stages 1 and 2.
    """

    def __init__(
        self,
        preset: str = "small",
        *,
        labels: Sequence[str] | None = None,
        epochs: float = 8.0,
        pretrain_epochs: float = 2.0,
        batch_size: int = 8,
        learning_rate: float = 2e-3,
        seed: int = 0,
        device: str = "cpu",
        show_progress: bool = True,
        config_overrides: Mapping[str, Any] | None = None,
        augment: bool = True,
        stem_epochs: float = 30.0,
        stem_learning_rate: float = 3e-4,
        freeze_stem: bool = True,
    ) -> None:
        self.preset = preset
        self.augment = augment
        self.stem_epochs = stem_epochs
        self.stem_learning_rate = stem_learning_rate
        self.freeze_stem = freeze_stem
        self.config_overrides = dict(config_overrides or {})
        self.labels = labels
        self.epochs = epochs
        self.pretrain_epochs = pretrain_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed
        self.device = device
        self.show_progress = show_progress

    # ------------------------------------------------------------------ fitting
    def fit(self, cases: Sequence[MedicalCase]) -> Diagnoser:
        """Train on labelled cases: masked-field pretraining, then classification; then base prototypes.

        Args:
            cases: cases with a `label`; cases with or without CT.

        Returns:
            self.

        Raises:
            InputValidationError: no cases, a case without label, a label outside `labels`, or fewer
                than two classes.
        """
        plan = self.prepare_fit(cases)
        torch.manual_seed(self.seed)
        model = CoreModel(plan.config)
        common = dict(
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
            use_cpu=self.device == "cpu",
            disable_tqdm=not self.show_progress,
            logging_steps=max(1, len(cases) // self.batch_size),
        )
        with tempfile.TemporaryDirectory(prefix="medical-train-") as work:
            transform = self.training_transform()
            stem_metrics = self.pretrain_stem(model, plan, Path(work) / "stem")
            pretrain = None
            if self.pretrain_epochs > 0:
                pretrain = ExampleDataset(plan.pretrain_examples, transform)
            training_metrics = fit_two_stage(
                model,
                ExampleDataset(plan.task_examples, transform),
                work,
                pretrain_dataset=pretrain,
                pretrain_args=default_training_args(
                    Path(work) / "pretrain", epochs=self.pretrain_epochs, **common
                ),
                task_args=default_training_args(Path(work) / "task", epochs=self.epochs, **common),
                seed=self.seed,
            )
        if stem_metrics is not None:
            training_metrics = {"stem": stem_metrics, **training_metrics}
        return self.finish_fit(model, plan, training_metrics)

    def pretrain_stem(
        self, model: CoreModel, plan: TrainingPlan, work: str | Path
    ) -> dict[str, float] | None:
        """Stage 0 of `fit` (and of another trainer of this model, such as the suite's): the CT stem trained
        alone on the plan's labelled cases with a CT, then frozen when `freeze_stem`.

        Returns:
            The stage's training metrics; None when the model has no CT stem, `stem_epochs` is 0 or no
            case has a CT.
        """
        with_ct = any(e.get("volume_present", False) for e in plan.task_examples)
        if model.volume_embedder.stem is None or self.stem_epochs <= 0 or not with_ct:
            return None
        return pretrain_volume_stem(
            model,
            plan.task_examples,
            work,
            epochs=self.stem_epochs,
            learning_rate=self.stem_learning_rate,
            transform=self.training_transform(),
            freeze=self.freeze_stem,
            seed=self.seed,
            use_cpu=self.device == "cpu",
            disable_tqdm=not self.show_progress,
        )

    def training_transform(self) -> MirrorVolume | None:
        """The augmentation `fit` applies to training examples (None when `augment` is off); another trainer
        of this model (the suite's) applies the same."""
        return MirrorVolume(self.seed) if self.augment else None

    def prepare_fit(
        self, cases: Sequence[MedicalCase], config_overrides: Mapping[str, Any] | None = None
    ) -> TrainingPlan:
        """The first half of `fit`: check the cases, fit the record statistics, encode, build the config.

        `fit` is `prepare_fit`, two-stage training of `CoreModel(plan.config)`, then `finish_fit`; another
        trainer (the suite's joint training) can train the model in between.

        Args:
            cases: as in `fit`.
            config_overrides: CoreConfig fields replacing the preset's (e.g. a suite's shared trunk), on
                top of `self.config_overrides`.

        Returns:
            The `TrainingPlan` (pretraining examples are the task examples without labels).

        Raises:
            InputValidationError: as in `fit`.
        """
        if not cases:
            raise InputValidationError("Diagnoser.fit: no training cases")
        unlabelled = [c.case_id for c in cases if not c.label]
        if unlabelled:
            raise InputValidationError(
                f"Diagnoser.fit: cases {unlabelled[:5]} have no label; every training case needs a diagnosis"
            )
        labels = list(self.labels) if self.labels is not None else sorted({c.label for c in cases})
        if len(labels) < 2:
            raise InputValidationError(f"Diagnoser.fit: expected at least two classes, got {labels}")
        grid = grid_for(self.preset)
        label_ids = {name: i for i, name in enumerate(labels)}
        stats = fit_record_stats([c.record for c in cases])
        examples = encode_cases(cases, grid, stats, label_ids=label_ids)

        config = core_config(
            self.preset,
            num_labels=len(labels),
            categorical_fields=CATEGORICAL_VOCAB,
            numeric_fields=NUMERIC_FEATURES,
        )
        overrides = {**self.config_overrides, **(config_overrides or {})}
        if overrides:
            if "hidden_size" in overrides:
                # The few-shot embedding is the pooled hidden state (see `finish_fit`).
                overrides.setdefault("prototype_dim", overrides["hidden_size"])
            config = CoreConfig.from_dict({**config.to_dict(), **overrides})
        pretrain = [{k: v for k, v in e.items() if k != "labels"} for e in examples]
        context = dict(cases=list(cases), labels=labels, grid=grid, stats=stats, label_ids=label_ids)
        return TrainingPlan(config, examples, pretrain, context)

    def finish_fit(
        self, model: CoreModel, plan: TrainingPlan, training_metrics: Mapping[str, Any] | None = None
    ) -> Diagnoser:
        """The second half of `fit`: keep the trained model and compute the base-class prototypes.

        Args:
            model: the trained `CoreModel`.
            plan: the plan `prepare_fit` returned.
            training_metrics: the training stages' metrics, kept as `training_metrics_`.

        Returns:
            self, fitted.
        """
        config = model.config
        cases, labels, label_ids = plan.context["cases"], plan.context["labels"], plan.context["label_ids"]
        self.training_metrics_ = dict(training_metrics or {})
        # No loss trains the prototype projection: make it the identity, so the few-shot embedding is the
        # normalised pooled hidden state that the classifier was trained on.
        with torch.no_grad():
            model.prototype.weight.copy_(torch.eye(config.prototype_dim, config.hidden_size))
            model.prototype.bias.zero_()
        self.model_ = model.to(self.device).eval()
        self.labels_ = labels
        self.grid_ = plan.context["grid"]
        self.record_stats_ = plan.context["stats"]
        self.data_fingerprint_ = _data_fingerprint(cases)
        embeddings = self._embed_examples(plan.task_examples)
        targets = np.array([label_ids[c.label] for c in cases])
        self.prototypes_ = _Prototypes(base=_class_means(embeddings, targets, len(labels)))
        return self

    # ------------------------------------------------------------------ inference
    @property
    def classes_(self) -> list[str]:
        """Every class the diagnoser can output: the classifier labels, then the added few-shot classes."""
        self._check_fitted()
        return [*self.labels_, *self.prototypes_.added]

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "This Diagnoser instance is not fitted yet. Call 'fit' with labelled cases or "
                "'Diagnoser.load' with a model directory first."
            )

    def _encode(self, cases: Sequence[MedicalCase]) -> list[dict[str, Any]]:
        return encode_cases(cases, self.grid_, self.record_stats_)

    def _forward(self, examples: Sequence[dict[str, Any]], output_attentions: bool = False):
        batch = collate(examples).to(self.device)
        with torch.inference_mode():
            return self.model_(**batch.to_dict(), output_attentions=output_attentions)

    def _outputs(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K_base), embeddings (N, P)) in inference batches."""
        logits, embeddings = [], []
        for start in range(0, len(examples), INFERENCE_BATCH):
            out = self._forward(examples[start : start + INFERENCE_BATCH])
            logits.append(out.logits.float().cpu())
            embeddings.append(out.embeddings.float().cpu())
        return torch.cat(logits), torch.cat(embeddings)

    def _embed_examples(self, examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        return self._outputs(examples)[1]

    def _probabilities(self, logits: torch.Tensor, embeddings: torch.Tensor) -> np.ndarray:
        """(N, K) over `classes_`: the classifier for base classes, the prototype path for added ones."""
        return self._probability_tensor(logits, embeddings).numpy()

    def _probability_tensor(self, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """`_probabilities` as a (differentiable) tensor on the inputs' device."""
        added = list(self.prototypes_.added.values())
        return fewshot_probabilities(logits, embeddings, self.prototypes_.base, added)

    def predict_proba(self, cases: Sequence[MedicalCase]) -> np.ndarray:
        """Class probabilities, ``(N, len(classes_))``, rows summing to 1, columns in `classes_` order."""
        self._check_fitted()
        if not cases:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return self._probabilities(*self._outputs(self._encode(cases)))

    def predict(self, cases: Sequence[MedicalCase]) -> list[str]:
        """The most probable class of each case."""
        classes = self.classes_
        return [classes[i] for i in self.predict_proba(cases).argmax(axis=1)]

    def embed(self, cases: Sequence[MedicalCase]) -> np.ndarray:
        """The few-shot embeddings ``(N, P)`` (L2-normalised) of the cases."""
        self._check_fitted()
        return self._embed_examples(self._encode(cases)).numpy()

    def explain(self, case: MedicalCase, top_k: int = 5, max_fields: int = 8) -> Explanation:
        """Predict one case and say what drove it, from one forward and one backward pass.

        The gradient of the predicted class's probability with respect to the input tokens gives both kinds
        of evidence (no attention weights are materialised and the cost does not grow with the number of
        fields or patches; about 2.5 forward passes):

        - CT: each patch token's relevance ``|token . dp/dtoken|`` (gradient x input), normalised to sum 1.
        - Record: for each present field, the drop in the predicted class's probability when the field is
          hidden (marked missing), estimated to first order as ``(e_field - e_missing) . dp/de`` on the
          field's token embedding ``e``.

        A model without gradients (an ONNX Runtime artifact of `core.compress`) uses its attention traces
        for the CT (the attention each patch receives, averaged over layers, heads and queries) and
        measures the record drops exactly, occluding the `max_fields` most attended fields in one batch.

        Args:
            case: the case.
            top_k: regions and slices to report.
            max_fields: record fields reported (largest effect first).

        Returns:
            The `Explanation`.
        """
        self._check_fitted()
        example = self._encode([case])[0]
        values = record_values(case.record)
        present = [i for i, name in enumerate(RECORD_FIELDS) if values[name] is not None]
        if isinstance(self.model_, CoreModel):
            probabilities, effects, relevance = self._gradient_evidence(example, present)
        else:
            out = self._forward([example], output_attentions=True)
            probabilities = self._probabilities(out.logits.float().cpu(), out.embeddings.float().cpu())[0]
            relevance = self._ct_attention(out.attentions, self.grid_.num_patches)
            if len(present) > max_fields:
                received = self._field_attention(out.attentions, self.grid_.num_patches)
                present = sorted(present, key=lambda i: -received[i])[:max_fields]
            effects = self._occlusion_effects(example, present, probabilities)
        classes = self.classes_
        predicted = int(probabilities.argmax())

        patch_map, top_slices, regions = None, [], []
        if case.volume is not None:
            patch_map = relevance / max(float(relevance.sum()), 1e-12)
            top_slices, regions = self._regions(patch_map, case, top_k)

        record_fields = []
        for index in present:
            name = RECORD_FIELDS[index]
            value = values[name]
            record_fields.append(
                {
                    "field": name,
                    "value": round(value, 3) if isinstance(value, float) else value,
                    "effect": round(float(effects[index]), 5),
                }
            )
        record_fields.sort(key=lambda f: -abs(f["effect"]))
        return Explanation(
            label=classes[predicted],
            probabilities={c: float(p) for c, p in zip(classes, probabilities, strict=True)},
            volume_present=case.volume is not None,
            patch_map=patch_map,
            top_slices=top_slices,
            regions=regions,
            record_fields=record_fields[:max_fields],
            grid=self.grid_,
        )

    def _gradient_evidence(
        self, example: dict[str, Any], present: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward and one backward pass to the record and CT token embeddings.

        Returns:
            ``(probabilities (K,), record effects (T,), CT relevance grid.patch_grid)``: the effects are
            first-order estimates of the drop in the predicted class's probability when each record field
            is marked missing; the relevance is ``|token . gradient|`` per CT patch token.
        """
        batch = collate([example]).to(self.device)
        captured: dict[str, torch.Tensor] = {}

        def keeper(name: str):
            def keep(_module, _args, output: torch.Tensor) -> torch.Tensor:
                # (1, T, hidden) record tokens / (1, Nv, hidden) CT tokens, as leaves: the backward pass
                # stops at them instead of running on through the embedders (the CT stem's convolutions).
                captured[name] = output.detach().requires_grad_(True)
                return captured[name]

            return keep

        handles = [
            self.model_.field_embedder.register_forward_hook(keeper("record")),
            self.model_.volume_embedder.register_forward_hook(keeper("ct")),
        ]
        try:
            with torch.enable_grad():
                out = self.model_(**batch.to_dict())
                probabilities = self._probability_tensor(out.logits.float(), out.embeddings.float())[0]
                predicted = int(probabilities.argmax())
                # A case without CT has its CT tokens masked out: their gradient may be absent (zero).
                record_grad, ct_grad = torch.autograd.grad(
                    probabilities[predicted], [captured["record"], captured["ct"]], allow_unused=True
                )
        finally:
            for handle in handles:
                handle.remove()
        ct_grad = torch.zeros_like(captured["ct"]) if ct_grad is None else ct_grad
        record_grad = torch.zeros_like(captured["record"]) if record_grad is None else record_grad
        relevance = (captured["ct"].detach() * ct_grad)[0].sum(dim=-1).abs()  # (Nv,)
        relevance = relevance.float().cpu().view(*self.grid_.patch_grid).numpy()  # (D', H', W')
        effects = np.zeros(len(RECORD_FIELDS))
        if present:
            hidden = example
            for index in present:
                hidden = without_field(hidden, index)
            blank = collate([hidden]).to(self.device)
            with torch.inference_mode():
                missing = self.model_.field_embedder(
                    blank.categorical,
                    blank.numeric,
                    blank.numeric_mask,
                    blank.time_delta,
                    blank.modality_ids,
                    blank.domain_ids,
                )  # (1, T, hidden): every present field's token as if it were missing
            change = (captured["record"].detach() - missing) * record_grad  # (1, T, hidden)
            effects = change[0].sum(dim=-1).float().cpu().numpy()  # (T,)
        return probabilities.detach().cpu().numpy(), effects, relevance

    def _occlusion_effects(
        self, example: dict[str, Any], present: list[int], probabilities: np.ndarray
    ) -> np.ndarray:
        """Exact drop in the predicted class's probability when each field in `present` is hidden ``(T,)``."""
        effects = np.zeros(len(RECORD_FIELDS))
        if not present:
            return effects
        predicted = int(probabilities.argmax())
        logits, embeddings = self._outputs([without_field(example, i) for i in present])
        occluded = self._probabilities(logits, embeddings)[:, predicted]
        effects[present] = probabilities[predicted] - occluded
        return effects

    def _field_attention(self, traces, n_volume: int) -> np.ndarray:
        """Attention each record token receives ``(T,)``, averaged over layers, heads and queries."""
        received = 0.0
        for trace in traces:
            weights = trace.attention_weights[0].detach().float().cpu()  # (H, T_total, T_total)
            received = received + weights[:, :, n_volume:].mean(dim=(0, 1))  # (T,)
        return np.asarray(received)

    def _ct_attention(self, traces, n_volume: int) -> np.ndarray:
        """Attention each CT patch receives, averaged over layers, heads and queries ``grid.patch_grid``."""
        received = torch.zeros(n_volume)
        for trace in traces:
            weights = trace.attention_weights[0].detach().float().cpu()  # (H, T, T)
            received += weights[:, :, :n_volume].mean(dim=(0, 1))  # (Nv,)
        received = received / received.sum().clamp_min(1e-12)
        return received.view(*self.grid_.patch_grid).numpy()  # (D', H', W')

    def _regions(
        self, patch_map: np.ndarray, case: MedicalCase, top_k: int
    ) -> tuple[list[int], list[dict[str, Any]]]:
        volume = case.volume
        axes = patch_indices(volume.shape, volume, self.grid_)  # per axis: (patch index, inside grid)
        # Best score each original slice sees: the max over the patches of its grid layer that are on the image.
        rows_in, cols_in = (np.unique(index[inside]) for index, inside in axes[1:])
        layer_best = (
            patch_map[:, rows_in][:, :, cols_in].max(axis=(1, 2)) if rows_in.size and cols_in.size else None
        )
        top_slices: list[int] = []
        if layer_best is not None:
            slice_scores = np.where(axes[0][1], layer_best[axes[0][0]], 0.0)  # (S,)
            ranked = np.argsort(-slice_scores, kind="stable")[:top_k]
            top_slices = [int(i) for i in ranked if slice_scores[i] > 0]
        # Only patches that cover part of the scanned region can point at a place in the series.
        covered = [np.unique(index[inside]) for index, inside in axes]
        candidates = [
            (float(patch_map[d, h, w]), d, h, w) for d in covered[0] for h in covered[1] for w in covered[2]
        ]
        regions = []
        for score, *patch in sorted(candidates, key=lambda c: -c[0])[:top_k]:
            extent = [
                np.flatnonzero((index == p) & inside) for (index, inside), p in zip(axes, patch, strict=True)
            ]
            regions.append(
                {
                    "score": round(score, 6),
                    "slices": [int(extent[0][0]), int(extent[0][-1])],
                    "rows": [int(extent[1][0]), int(extent[1][-1])],
                    "cols": [int(extent[2][0]), int(extent[2][-1])],
                }
            )
        return top_slices, regions

    # ------------------------------------------------------------------ few-shot
    def add_class(self, name: str, support_cases: Sequence[MedicalCase]) -> Diagnoser:
        """Add a class from a handful of confirmed cases: its prototype is their mean embedding.

        No weights change; the class is saved with `save` / `save_prototypes`.

        Args:
            name: the new class name (not an existing class).
            support_cases: the confirmed cases (>= 1).

        Returns:
            self.

        Raises:
            InputValidationError: no support cases, or a name already used by a class.
        """
        self._check_fitted()
        name = name.strip()
        if not name:
            raise InputValidationError("add_class: the class name is empty")
        if name in self.classes_:
            raise InputValidationError(f"add_class: class {name!r} exists already; classes: {self.classes_}")
        if not support_cases:
            raise InputValidationError(
                f"add_class: no support cases for class {name!r}; expected at least one"
            )
        return self.add_class_from_embeddings(
            name, self.embed(support_cases), [c.case_id for c in support_cases]
        )

    def add_class_from_embeddings(
        self, name: str, embeddings: np.ndarray, case_ids: Sequence[str]
    ) -> Diagnoser:
        """`add_class` from support embeddings ``(k, P)`` already computed with `embed` (few-shot episodes)."""
        self._check_fitted()
        if len(embeddings) == 0:
            raise InputValidationError(
                f"add_class: no support cases for class {name!r}; expected at least one"
            )
        self.prototypes_.added[name] = class_prototype(embeddings)
        self.prototypes_.shots[name] = list(case_ids)
        return self

    def remove_class(self, name: str) -> Diagnoser:
        """Drop an added few-shot class (the classifier's classes cannot be removed).

        Raises:
            InputValidationError: `name` is not an added class.
        """
        self._check_fitted()
        if name not in self.prototypes_.added:
            raise InputValidationError(
                f"remove_class: {name!r} is not an added class; added: {list(self.prototypes_.added)}"
            )
        del self.prototypes_.added[name]
        del self.prototypes_.shots[name]
        return self

    def outputs(self, cases: Sequence[MedicalCase]) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs: classifier logits ``(N, len(labels_))`` and few-shot embeddings ``(N, P)``."""
        self._check_fitted()
        logits, embeddings = self._outputs(self._encode(cases))
        return logits.numpy(), embeddings.numpy()

    def proba_from_outputs(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """`predict_proba` from precomputed `outputs` (the added classes as they are now)."""
        self._check_fitted()
        return self._probabilities(torch.as_tensor(logits), torch.as_tensor(embeddings))

    # ------------------------------------------------------------------ persistence
    def save(self, model_dir: str | Path, metrics: Mapping[str, Any] | None = None) -> Path:
        """Write the model directory: core checkpoint (config.json, model.safetensors, app.json,
        metrics.json) plus ``prototypes.safetensors`` and ``prototypes.json``."""
        self._check_fitted()
        model_dir = Path(model_dir)
        meta = {
            "app": APP_NAME,
            "schema_version": SCHEMA_VERSION,
            "preset": self.preset,
            "labels": self.labels_,
            "record_stats": self.record_stats_,
            "grid": self.grid_.to_dict(),
            "data_fingerprint": self.data_fingerprint_,
            "config_hash": fingerprint(self.model_.config.to_json_string(use_diff=False))[:16],
        }
        save_checkpoint(self.model_, model_dir, meta, metrics)
        self.config_hash_ = meta["config_hash"]
        self.save_prototypes(model_dir)
        self.model_dir_ = model_dir
        return model_dir

    def save_prototypes(self, model_dir: str | Path) -> None:
        """Write the prototypes (base and added classes) into a model directory."""
        from safetensors.torch import save_file

        self._check_fitted()
        model_dir = Path(model_dir)
        tensors = {"base": self.prototypes_.base.contiguous()}
        for index, tensor in enumerate(self.prototypes_.added.values()):
            tensors[f"added.{index}"] = tensor.contiguous()
        save_file(tensors, str(model_dir / PROTOTYPE_WEIGHTS))
        index = {
            "base": self.labels_,
            "added": [
                {"name": n, "support_cases": self.prototypes_.shots[n]} for n in self.prototypes_.added
            ],
        }
        (model_dir / PROTOTYPE_INDEX).write_text(json.dumps(index, indent=2))

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> Diagnoser:
        """Rebuild a fitted diagnoser from a model directory written by `save`.

        Raises:
            InputValidationError: not a medical model directory (names the missing file or wrong app).
        """
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        model, meta = load_checkpoint(model_dir, device=device)
        if meta.get("app") != APP_NAME:
            raise InputValidationError(
                f"{model_dir}: a model of app {meta.get('app')!r}; expected a medical model "
                "(train one with `verticals medical train`)"
            )
        for name in (PROTOTYPE_WEIGHTS, PROTOTYPE_INDEX):
            if not (model_dir / name).is_file():
                raise InputValidationError(
                    f"{model_dir}: {name} missing; expected the diagnoser's prototypes"
                )
        diagnoser = cls(preset=meta["preset"], labels=meta["labels"], device=device)
        diagnoser.model_ = model
        diagnoser.labels_ = list(meta["labels"])
        diagnoser.grid_ = VolumeGrid.from_dict(meta["grid"])
        diagnoser.record_stats_ = {k: list(v) for k, v in meta["record_stats"].items()}
        diagnoser.data_fingerprint_ = meta["data_fingerprint"]
        diagnoser.config_hash_ = meta["config_hash"]
        tensors = load_file(str(model_dir / PROTOTYPE_WEIGHTS))
        index = json.loads((model_dir / PROTOTYPE_INDEX).read_text())
        prototypes = _Prototypes(base=tensors["base"])
        for position, entry in enumerate(index["added"]):
            prototypes.added[entry["name"]] = tensors[f"added.{position}"]
            prototypes.shots[entry["name"]] = list(entry["support_cases"])
        diagnoser.prototypes_ = prototypes
        diagnoser.model_dir_ = model_dir
        return diagnoser

    @property
    def model_version_(self) -> str:
        """The first 16 hex digits of the SHA-256 of the saved weights (set once saved or loaded)."""
        if not hasattr(self, "model_dir_"):
            raise NotFittedError(
                "model_version_: the Diagnoser has not been saved or loaded from a directory"
            )
        from core.train import weights_file  # model.safetensors, or model.onnx for a compressed model

        digest = hashlib.sha256(weights_file(self.model_dir_).read_bytes()).hexdigest()
        return digest[:16]


def class_prototype(embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A class's prototype from its cases' embeddings ``(k, P)``: their L2-normalised mean ``(P,)``."""
    mean = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)).mean(dim=0)
    return F.normalize(mean, dim=0)


def fewshot_probabilities(
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    base_prototypes: torch.Tensor,
    added_prototypes: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Class probabilities ``(N, K_base + K_added)`` with few-shot classes added to a trained classifier.

    The prototype path (softmax over the cosine logits of every prototype, base classes included)
    estimates how likely each case belongs to an added class; the classifier (softmax of `logits`,
    ``(N, K_base)``) shares the remaining probability among the base classes. Rows sum to 1.
    """
    base = torch.softmax(logits, dim=-1)  # (N, K_base)
    if not added_prototypes:
        return base
    prototypes = torch.cat([base_prototypes, torch.stack(list(added_prototypes))]).to(embeddings.device)
    proto = torch.softmax(prototype_logits(embeddings, prototypes, PROTOTYPE_SCALE), dim=-1)  # (N, K)
    added = proto[:, base_prototypes.shape[0] :]  # (N, K_added)
    novel = added.sum(dim=1, keepdim=True)  # (N, 1)
    return torch.cat([base * (1.0 - novel), added], dim=1)


def _class_means(embeddings: torch.Tensor, targets: np.ndarray, n_classes: int) -> torch.Tensor:
    means = torch.zeros(n_classes, embeddings.shape[1])
    for k in range(n_classes):
        members = embeddings[torch.as_tensor(targets == k)]
        if len(members):
            means[k] = F.normalize(members.mean(dim=0), dim=0)
    return means


def _data_fingerprint(cases: Sequence[MedicalCase]) -> str:
    parts: list[bytes | str] = []
    for case in cases:
        parts.append(f"{case.case_id}|{case.label}|{record_values(case.record)}")
        if case.volume is not None:
            parts.append(hashlib.sha256(case.volume.hu.tobytes()).digest())
    return fingerprint(*parts)


# ---------------------------------------------------------------------------------------------------------
# evaluation


def classification_metrics(
    y_true: Sequence[str], probabilities: np.ndarray, classes: Sequence[str], n_bins: int = 10
) -> dict[str, float]:
    """Accuracy, AUROC per class (one vs rest) and macro, multi-class Brier score and top-label ECE.

    A class absent from `y_true` (or the only one present) has no AUROC; it is left out rather than
    reported as a number.

    Args:
        y_true: the true labels.
        probabilities: ``(N, K)`` predicted probabilities over `classes`.
        classes: the column names.
        n_bins: confidence bins of the expected calibration error.

    Returns:
        ``{"n", "accuracy", "auroc_<class>", "auroc_macro", "brier", "ece"}``.

    Raises:
        ConfigError: a label outside `classes` or mismatched shapes.
    """
    from sklearn.metrics import roc_auc_score

    classes = list(classes)
    unknown = sorted(set(y_true) - set(classes))
    if unknown:
        raise ConfigError(f"evaluation: labels {unknown} are not among the model's classes {classes}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(y_true), len(classes)):
        raise ConfigError(
            f"evaluation: probabilities of shape {probabilities.shape}; expected {(len(y_true), len(classes))}"
        )
    truth = np.array([classes.index(y) for y in y_true])
    onehot = np.eye(len(classes))[truth]  # (N, K)
    predicted = probabilities.argmax(axis=1)
    metrics: dict[str, float] = {
        "n": float(len(truth)),
        "accuracy": float((predicted == truth).mean()),
    }
    aurocs = []
    for k, name in enumerate(classes):
        positives = int(onehot[:, k].sum())
        if 0 < positives < len(truth):
            value = float(roc_auc_score(onehot[:, k], probabilities[:, k]))
            metrics[f"auroc_{name}"] = value
            aurocs.append(value)
    if aurocs:
        metrics["auroc_macro"] = float(np.mean(aurocs))
    metrics["brier"] = float(((probabilities - onehot) ** 2).sum(axis=1).mean())
    confidence = probabilities.max(axis=1)
    correct = (predicted == truth).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    metrics["ece"] = float(ece)
    return metrics

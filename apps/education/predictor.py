"""`KnowledgeTracer`: a scikit-learn-style estimator over the causal core model for knowledge tracing.

`fit` trains in two stages (masked-field pretraining on the interaction sequences, then next-step
fine-tuning), `predict_proba` gives P(correct) for every answer made before its response was seen,
`evaluate` scores a log under the pyKT protocol, and `student_state` / `mastery` read out per-skill
mastery for any student, including a new student with only a few answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch

from apps.education.clusters import (
    DEFAULT_MAX_CLUSTERS,
    domain_names,
    domain_of_skill_index,
    skill_clusters,
)
from apps.education.config import TRAINING, knowledge_tracing_config
from apps.education.encode import (
    PYKT_MAXLEN,
    build_vocabularies,
    make_windows,
    practice_features,
    to_examples,
    to_sequences,
)
from apps.education.schema import (
    SKILL_SEPARATOR,
    OnUnknown,
    SequenceWindows,
    StudentSequences,
    Vocabulary,
)
from core.data import collate
from core.errors import ConfigError, InputValidationError, NotFittedError

if TYPE_CHECKING:
    from apps.education.graph import PrerequisiteGraph
    from core.train import TrainingPlan

logger = logging.getLogger(__name__)

APP_NAME = "education"
SCHEMA_VERSION = 1
PREDICTION_COLUMNS = ("user_id", "position", "item_id", "skill_id", "correct", "p_correct")


@dataclass(frozen=True)
class StudentState:
    """What the model knows about one student after their last answer.

    Attributes:
        user_id: The student.
        history: The student's answers used (canonical rows, time order; the last `maxlen`).
        item_p: Predicted P(correct) of the next answer for every known item, indexed by `item_id`.
        mastery: Per-skill mastery (mean predicted P(correct) over the skill's items), indexed by
            `skill_id`.
        attention: How much the state after the last answer attends to each answer of `history`
            (mean over heads and layers, shape (len(history),), sums to at most 1).
    """

    user_id: str
    history: pd.DataFrame
    item_p: pd.Series
    mastery: pd.Series
    attention: np.ndarray


class KnowledgeTracer:
    """Causal attention knowledge tracing over the shared core model.

    Args:
        preset: Architecture and training preset of `apps.education.config` (`"small"`, `"retrieval"`,
            `"practice"`, `"bench"`).
        maxlen: Answers per training window (pyKT: 200).
        pretrain_epochs: Epochs of masked-field pretraining (0 skips stage 1); None uses the preset's.
        task_epochs: Epochs of next-step fine-tuning; None uses the preset's.
        learning_rate: None uses the preset's.
        batch_size: Windows per step; None uses the preset's.
        max_steps: Caps each training stage at this many steps (-1: no cap), for quick runs.
        seed: Seeds training.
        device: Where inference runs (`"cpu"`, `"cuda"`); training uses what `transformers` picks.
        config_overrides: `CoreConfig` fields replacing the preset's (e.g. `{"hidden_size": 32}`).
        max_clusters: MoE domains: skills are grouped into at most this many clusters (from the
            prerequisite graph given to `fit`, else from co-occurrence in the logs) and every token
            carries its skill's cluster as its domain id; 1 gives a single domain.
    """

    def __init__(
        self,
        preset: str = "small",
        *,
        maxlen: int = PYKT_MAXLEN,
        pretrain_epochs: Optional[float] = None,
        task_epochs: Optional[float] = None,
        learning_rate: Optional[float] = None,
        batch_size: Optional[int] = None,
        max_steps: int = -1,
        seed: int = 0,
        device: str = "cpu",
        config_overrides: Optional[dict[str, Any]] = None,
        max_clusters: int = DEFAULT_MAX_CLUSTERS,
    ) -> None:
        self.preset = preset
        self.maxlen = maxlen
        self.pretrain_epochs = pretrain_epochs
        self.task_epochs = task_epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.seed = seed
        self.device = device
        self.config_overrides = config_overrides
        self.max_clusters = max_clusters

    # ------------------------------------------------------------------ training
    def fit(
        self,
        frame: pd.DataFrame,
        *,
        graph: Optional[PrerequisiteGraph] = None,
        output_dir: Optional[str | Path] = None,
        callbacks: Sequence[Any] = (),
    ) -> KnowledgeTracer:
        """Learn vocabularies and skill clusters, and train the model on canonical interactions.

        Args:
            frame: Canonical interaction table (training students only).
            graph: Prerequisite graph for the skill clusters (MoE domains); None clusters by co-occurrence.
            output_dir: Trainer working folder (logs); a temporary folder when None.
            callbacks: Extra `transformers.TrainerCallback`s.

        Returns:
            self, with `model_`, `item_vocab_`, `skill_vocab_`, `item_skill_`, `skill_names_`,
            `skill_clusters_`, `train_metrics_` and `data_fingerprint_` set.

        Raises:
            ConfigError: Unknown preset or invalid settings.
            InputValidationError: No student has at least 3 answers.
        """
        import tempfile

        from core.model import CoreModel
        from core.train import ExampleDataset, default_training_args, fit_two_stage

        plan = self.prepare_fit(frame, graph=graph)
        training = TRAINING[self.preset]
        torch.manual_seed(self.seed)
        model = CoreModel(plan.config)
        pretrain_epochs = training.pretrain_epochs if self.pretrain_epochs is None else self.pretrain_epochs
        common = dict(
            learning_rate=training.learning_rate if self.learning_rate is None else self.learning_rate,
            batch_size=training.batch_size if self.batch_size is None else self.batch_size,
            seed=self.seed,
            max_steps=self.max_steps,
            logging_steps=50,
        )
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(output_dir) if output_dir is not None else Path(scratch)
            metrics = fit_two_stage(
                model,
                ExampleDataset(plan.task_examples),
                work,
                pretrain_dataset=ExampleDataset(plan.pretrain_examples) if pretrain_epochs > 0 else None,
                pretrain_args=default_training_args(work / "pretrain", epochs=pretrain_epochs, **common),
                task_args=default_training_args(
                    work / "task",
                    epochs=training.task_epochs if self.task_epochs is None else self.task_epochs,
                    **common,
                ),
                callbacks=callbacks,
                seed=self.seed,
            )
        return self.finish_fit(model, plan, metrics)

    def prepare_fit(
        self,
        frame: pd.DataFrame,
        *,
        graph: Optional[PrerequisiteGraph] = None,
        config_overrides: Optional[dict[str, Any]] = None,
    ) -> TrainingPlan:
        """The first half of `fit`: vocabularies, skill clusters, training windows and the config.

        `fit` is `prepare_fit`, two-stage training of `CoreModel(plan.config)`, then `finish_fit`; another
        trainer (the suite's joint training) can train the model in between.

        Args:
            frame, graph: as in `fit`.
            config_overrides: CoreConfig fields replacing the preset's, on top of `self.config_overrides`
                (e.g. a suite's shared trunk).

        Returns:
            The `TrainingPlan` (task and pretraining examples are the training windows).

        Raises:
            ConfigError: Unknown preset or invalid settings.
            InputValidationError: No student has at least 3 answers.
        """
        from core.train import TrainingPlan

        if self.preset not in TRAINING:
            raise ConfigError(f"unknown preset {self.preset!r}; expected one of {sorted(TRAINING)}.")
        if self.maxlen < 2:
            raise ConfigError(f"maxlen must be at least 2; got {self.maxlen}.")
        item_vocab, skill_vocab = build_vocabularies(frame)
        sequences = to_sequences(frame, item_vocab, skill_vocab)
        windows = make_windows(sequences, maxlen=self.maxlen, mode="chunks")
        if len(windows) == 0:
            raise InputValidationError(
                f"training data: no student has at least 3 answers ({len(frame)} rows, "
                f"{frame['user_id'].nunique()} students); knowledge tracing needs answer histories."
            )
        clusters = skill_clusters(
            skill_vocab, sequences=sequences, graph=graph, max_clusters=self.max_clusters, seed=self.seed
        )
        n_clusters = max(clusters.values(), default=0) + 1
        if n_clusters == 1:  # one cluster: a single-domain model without domain ids
            clusters = {}
        skill_domain = domain_of_skill_index(skill_vocab, clusters) if clusters else None
        config = knowledge_tracing_config(
            len(item_vocab),
            len(skill_vocab),
            preset=self.preset,
            **{
                **({"domains": domain_names(n_clusters)} if clusters else {}),
                **(self.config_overrides or {}),
                **(config_overrides or {}),
            },
        )
        examples = to_examples(
            windows, score_first=True, skill_domain=skill_domain, **example_options(config)
        )
        context = dict(frame=frame, item_vocab=item_vocab, skill_vocab=skill_vocab, clusters=clusters)
        return TrainingPlan(config, examples, examples, context)

    def finish_fit(
        self, model: Any, plan: TrainingPlan, training_metrics: Optional[dict[str, Any]] = None
    ) -> KnowledgeTracer:
        """The second half of `fit`: keep the trained model and the vocabularies it was trained with.

        Args:
            model: the trained `CoreModel`.
            plan: the plan `prepare_fit` returned.
            training_metrics: {stage: metrics} of the training stages, kept as `train_metrics_`.

        Returns:
            self, fitted.
        """
        from core.train import fingerprint

        frame, item_vocab, skill_vocab = (
            plan.context["frame"],
            plan.context["item_vocab"],
            plan.context["skill_vocab"],
        )
        self.model_ = model.to(self.device).eval()
        self.item_vocab_ = item_vocab
        self.skill_vocab_ = skill_vocab
        self.item_skill_ = _item_skills(frame, item_vocab, skill_vocab)
        self.item_skill_sets_ = _item_skill_sets(frame, item_vocab, skill_vocab)
        self.skill_names_ = _skill_names(frame)
        self.skill_clusters_ = plan.context["clusters"]
        self.train_metrics_ = {
            stage: {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
            for stage, values in (training_metrics or {}).items()
        }
        self.data_fingerprint_ = fingerprint(
            pd.util.hash_pandas_object(frame[["user_id", "item_id", "skill_id", "correct"]], index=False)
            .to_numpy()
            .tobytes()
        )
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, model_dir: str | Path, metrics: Optional[dict[str, Any]] = None) -> Path:
        """Write the model directory (`config.json`, `model.safetensors`, `app.json`, `metrics.json`)."""
        from core.train import save_checkpoint

        self._check_fitted()
        meta = {
            "app": APP_NAME,
            "schema_version": SCHEMA_VERSION,
            "preset": self.preset,
            "maxlen": self.maxlen,
            "item_vocab": self.item_vocab_.to_dict(),
            "skill_vocab": self.skill_vocab_.to_dict(),
            "item_skill": self.item_skill_.tolist(),
            "item_skill_sets": self.item_skill_sets_.tolist(),
            "skill_names": self.skill_names_,
            "skill_clusters": self.skill_clusters_,
            "data_fingerprint": self.data_fingerprint_,
            "train_metrics": self.train_metrics_,
        }
        return save_checkpoint(self.model_, model_dir, meta, metrics)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> KnowledgeTracer:
        """Rebuild a fitted tracer from a model directory written by `save`.

        Raises:
            InputValidationError: The folder is not a model directory.
            ConfigError: It holds another app's model or an incompatible schema version.
        """
        from core.train import load_checkpoint

        model, meta = load_checkpoint(model_dir, device=device)
        if meta.get("app") != APP_NAME or meta.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(
                f"{model_dir}: expected an education model (schema version {SCHEMA_VERSION}); got app "
                f"{meta.get('app')!r}, schema version {meta.get('schema_version')!r}. Retrain with "
                "`verticals education train`."
            )
        tracer = cls(preset=meta["preset"], maxlen=int(meta["maxlen"]), device=device)
        tracer.model_ = model
        tracer.item_vocab_ = Vocabulary.from_dict(meta["item_vocab"])
        tracer.skill_vocab_ = Vocabulary.from_dict(meta["skill_vocab"])
        tracer.item_skill_ = np.asarray(meta["item_skill"], dtype=np.int64)
        tracer.item_skill_sets_ = np.asarray(
            meta.get("item_skill_sets", tracer.item_skill_[:, None].tolist()), dtype=np.int64
        )
        tracer.skill_names_ = dict(meta["skill_names"])
        tracer.skill_clusters_ = {str(k): int(v) for k, v in meta.get("skill_clusters", {}).items()}
        tracer.data_fingerprint_ = meta["data_fingerprint"]
        tracer.train_metrics_ = meta.get("train_metrics", {})
        return tracer

    # ------------------------------------------------------------------ prediction
    def predict_proba(
        self, frame: pd.DataFrame, *, on_unknown: OnUnknown = "raise", batch_size: int = 64
    ) -> pd.DataFrame:
        """P(correct) of every answer, predicted from the student's earlier answers only.

        Students longer than `maxlen` are scored with pyKT's sliding window (answer j from the previous
        `maxlen - 1` answers). A student's first answer is predicted from the start token alone.

        Args:
            frame: Canonical interactions.
            on_unknown: `"raise"` names the first row with an item or skill the model never saw;
                `"unknown"` maps such ids to the unknown bucket.
            batch_size: Windows per forward pass.

        Returns:
            One row per interaction: `user_id, position` (0-based index in the student's time-ordered
            answers), `item_id, skill_id, correct, p_correct`, ordered by student then position.

        Raises:
            NotFittedError: Before `fit` or `load`.
            InputValidationError: An unknown id with `on_unknown="raise"`.
        """
        self._check_fitted()
        sequences = to_sequences(frame, self.item_vocab_, self.skill_vocab_, on_unknown=on_unknown)
        windows = make_windows(sequences, maxlen=self.maxlen, mode="sliding", min_length=1)
        examples = to_examples(windows, score_first=True, **self._example_options())
        probs = self._window_probabilities(examples, batch_size=batch_size)
        student, position, p = [], [], []
        for w, (example, prob) in enumerate(zip(examples, probs, strict=True)):
            scored = np.flatnonzero(example["next_labels"] >= 0)
            student.append(np.full(len(scored), windows.student[w]))
            position.append(windows.position[w, scored])
            p.append(prob[scored])
        student_index = np.concatenate(student) if student else np.zeros(0, dtype=np.int64)
        positions = np.concatenate(position) if position else np.zeros(0, dtype=np.int64)
        flat = sequences.offsets[student_index] + positions
        order = np.argsort(flat, kind="stable")
        flat, student_index, positions = flat[order], student_index[order], positions[order]
        rows = frame.set_index("source_row").loc[sequences.source_row[flat]]
        return pd.DataFrame(
            {
                "user_id": pd.Series(sequences.user_ids[student_index], dtype="string"),
                "position": positions.astype(np.int64),
                "item_id": rows["item_id"].astype("string").to_numpy(),
                "skill_id": rows["skill_id"].astype("string").to_numpy(),
                "correct": sequences.correct[flat].astype(np.int8),
                "p_correct": np.concatenate(p)[order].astype(np.float64) if p else np.zeros(0),
            }
        )

    def evaluate(
        self, frame: pd.DataFrame, *, on_unknown: OnUnknown = "unknown", batch_size: int = 64
    ) -> dict[str, float]:
        """AUC and accuracy under pyKT's protocol: windows of `maxlen` with the sliding window, every
        answer after a student's first scored once, students with fewer than 3 answers left out.

        Args:
            frame: Canonical interactions (held-out students).
            on_unknown: Ids unseen in training map to the unknown bucket by default.
            batch_size: Windows per forward pass.

        Returns:
            `{"auc", "accuracy", "n_predictions", "n_students"}`.

        Raises:
            NotFittedError: Before `fit` or `load`.
            InputValidationError: Nothing to score, or only one class among the responses.
        """
        from sklearn.metrics import roc_auc_score

        self._check_fitted()
        sequences = to_sequences(frame, self.item_vocab_, self.skill_vocab_, on_unknown=on_unknown)
        windows = make_windows(sequences, maxlen=self.maxlen, mode="sliding")
        examples = to_examples(windows, **self._example_options())
        probs = self._window_probabilities(examples, batch_size=batch_size)
        y_true = np.concatenate([e["next_labels"][e["next_labels"] >= 0] for e in examples] or [[]])
        y_prob = np.concatenate(
            [p[e["next_labels"] >= 0] for e, p in zip(examples, probs, strict=True)] or [[]]
        )
        if len(np.unique(y_true)) < 2:
            raise InputValidationError(
                f"evaluation data: {len(y_true)} scored answers with responses {np.unique(y_true).tolist()}; "
                "AUC needs both correct and wrong answers from students with at least 3 answers."
            )
        return {
            "auc": float(roc_auc_score(y_true, y_prob)),
            "accuracy": float(np.mean((y_prob >= 0.5) == (y_true == 1))),
            "n_predictions": len(y_true),
            "n_students": len(np.unique(windows.student)),
        }

    def student_state(
        self, frame: pd.DataFrame, user_id: str, *, on_unknown: OnUnknown = "raise"
    ) -> StudentState:
        """Mastery and next-item success for one student after their last answer.

        Args:
            frame: Canonical interactions; only `user_id`'s rows are used (none: a new student).
            user_id: The student.
            on_unknown: See `predict_proba`.

        Returns:
            The `StudentState` (history limited to the last `maxlen - 1` answers).
        """
        self._check_fitted()
        rows = frame[frame["user_id"] == user_id]
        states = self._states(rows, on_unknown=on_unknown, with_attention=True)
        if states:
            history, item_p, attention = states[0]
        else:
            history, item_p, attention = rows.iloc[:0], self._cold_item_p(), np.zeros(0)
        return StudentState(
            user_id=str(user_id),
            history=history,
            item_p=item_p,
            mastery=self._skill_mastery(item_p.to_numpy()[None])[0],
            attention=attention,
        )

    def mastery(self, frame: pd.DataFrame, *, on_unknown: OnUnknown = "raise") -> pd.DataFrame:
        """Per-skill mastery of every student in `frame` after their last answer.

        Mastery of a skill is the mean predicted P(correct) on the skill's items, so it is defined for
        any student, including one with only a few answers.

        Returns:
            students (rows, `user_id` in order of first appearance) x skills (columns, `skill_id`).
        """
        item_p = self.item_probabilities(frame, on_unknown=on_unknown)
        return pd.DataFrame(
            self.skill_mastery_matrix(item_p.to_numpy()) if len(item_p) else None,
            index=item_p.index,
            columns=pd.Index(self.skill_vocab_.tokens, name="skill_id"),
            dtype=np.float64,
        )

    def skill_of_item(self) -> pd.Series:
        """The (first) skill of every known item, indexed by `item_id`."""
        self._check_fitted()
        return pd.Series(
            self.skill_vocab_.decode(self.item_skill_[2:]),
            index=pd.Index(self.item_vocab_.tokens, name="item_id"),
            name="skill_id",
        )

    # ------------------------------------------------------------------ internals
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "This KnowledgeTracer instance is not fitted yet. Call 'fit' with training interactions "
                "or 'load' a model directory before using this estimator."
            )

    @torch.no_grad()
    def _window_probabilities(self, examples: list[dict[str, Any]], *, batch_size: int) -> list[np.ndarray]:
        """P(correct) at every token of every example, shape (T_i,) each."""
        out: list[np.ndarray] = [np.zeros(0)] * len(examples)
        order = np.argsort([len(e["next_item_ids"]) for e in examples], kind="stable")
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            batch = collate([examples[i] for i in chunk]).to(self.device)
            batch.next_labels = None
            logits = self.model_(**batch.to_dict()).next_step_logits  # (B, T)
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            for row, index in enumerate(chunk):
                out[index] = probs[row, : len(examples[index]["next_item_ids"])]
        return out

    def item_probabilities(self, frame: pd.DataFrame, *, on_unknown: OnUnknown = "raise") -> pd.DataFrame:
        """P(correct) on every known item for the next answer of every student in `frame`, batched.

        One forward pass per 64 students over their last `maxlen - 1` answers; no per-student pandas work,
        so it suits simulations that step many students at once.

        Returns:
            students (rows, `user_id` in order of first appearance) x items (columns, `item_id`).
        """
        self._check_fitted()
        columns = pd.Index(self.item_vocab_.tokens, name="item_id")
        if frame.empty:
            return pd.DataFrame(columns=columns, dtype=np.float64)
        sequences = to_sequences(frame, self.item_vocab_, self.skill_vocab_, on_unknown=on_unknown)
        last = _last_windows(sequences, self.maxlen - 1)
        probs, _ = self._last_state(last, with_attention=False)
        users = pd.Index(sequences.user_ids[last.student], name="user_id")
        return pd.DataFrame(probs, index=users, columns=columns)

    def skill_mastery_matrix(self, item_p: np.ndarray) -> np.ndarray:
        """(S, n_known_items) item probabilities -> (S, n_known_skills) mastery, columns `skill_vocab_.tokens`.

        Mastery of a skill is the mean P(correct) over its items; a skill with no item of its own (only
        ever a second skill) reads the mean over all skills.
        """
        self._check_fitted()
        n_skills = len(self.skill_vocab_)
        skill_of = self.item_skill_[2:]
        onehot = np.zeros((len(skill_of), n_skills))
        onehot[np.arange(len(skill_of)), skill_of] = 1.0
        counts = onehot.sum(axis=0)
        means = (np.asarray(item_p) @ onehot) / np.maximum(counts, 1.0)  # (S, n_skills)
        fallback = means[:, 2:].mean(axis=1, keepdims=True) if n_skills > 2 else np.zeros((len(means), 1))
        return np.where(counts[None, 2:] > 0, means[:, 2:], fallback)

    @torch.no_grad()
    def _last_state(
        self, last: SequenceWindows, *, with_attention: bool, batch_size: int = 64
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Item P(correct) after each window's last answer, (W, n_known_items), and, on request, that
        state's attention over the window's tokens (mean over layers and heads), (W, L + 1)."""
        examples = to_examples(last, **self._example_options())
        item_ids = torch.arange(len(self.item_vocab_), device=self.device)
        probs, focus = [], []
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            features = self._candidate_features(last, range(lo, lo + len(chunk)))
            batch = collate(chunk).to(self.device)
            output = self.model_(**batch.to_dict(), output_attentions=with_attention)
            ends = batch.attention_mask.sum(dim=1) - 1  # (B,) last real token
            rows = torch.arange(len(chunk), device=self.device)
            hidden = output.hidden_states[rows, ends]  # (B, hidden)
            logits = self.model_.next_step(
                hidden[:, None, :].expand(-1, len(item_ids), -1),  # (B, n_items, hidden)
                item_ids[None, :].expand(len(chunk), -1),  # (B, n_items)
                # A retrieval head (`next_step_retrieval`) lets every item read the whole window.
                **self._retrieval_inputs(
                    output.hidden_states,
                    ends[:, None].expand(-1, len(item_ids)),  # (B, n_items)
                    batch.attention_mask,
                ),
                next_features=features,  # (B, n_items, F) or None
            )  # (B, n_items)
            probs.append(torch.sigmoid(logits.float())[:, 2:].cpu().numpy())
            if with_attention:
                # (layers, B, H, T, T) -> the last token's attention, mean over layers and heads: (B, T)
                weights = torch.stack([t.attention_weights for t in output.attentions], dim=1).float()
                part = weights[rows, :, :, ends, :].mean(dim=(1, 2)).cpu().numpy()
                width = last.position.shape[1] + 1
                focus.append(np.pad(part, ((0, 0), (0, width - part.shape[1]))))
        return np.concatenate(probs), (np.concatenate(focus) if with_attention else None)

    def _states(
        self, frame: pd.DataFrame, *, on_unknown: OnUnknown, with_attention: bool
    ) -> list[tuple[pd.DataFrame, pd.Series, np.ndarray]]:
        """(history rows, item P(correct) after the last answer, attention over history) per student."""
        if frame.empty:
            return []
        sequences = to_sequences(frame, self.item_vocab_, self.skill_vocab_, on_unknown=on_unknown)
        keep = self.maxlen - 1
        last = _last_windows(sequences, keep)
        probs, focus = self._last_state(last, with_attention=with_attention)
        source_rows = frame["source_row"].to_numpy()
        position_of = pd.Series(np.arange(len(frame)), index=source_rows)
        items = pd.Index(self.item_vocab_.tokens, name="item_id")
        results = []
        for w, student in enumerate(last.student):
            n = int(min(sequences.lengths[student], keep))
            flat = sequences.offsets[student] + last.position[w, :n]
            history = frame.iloc[position_of.loc[sequences.source_row[flat]].to_numpy()].reset_index(
                drop=True
            )
            attention = focus[w, 1 : n + 1] if focus is not None else np.zeros(n)
            results.append((history, pd.Series(probs[w], index=items), attention))
        return results

    def _retrieval_inputs(
        self, memory: torch.Tensor, query_positions: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The history a retrieval next-step head reads (`next_step_retrieval`); nothing for other heads
        (the exported ONNX head takes states and items only)."""
        if not getattr(self.model_.config, "next_step_retrieval", False):
            return {}
        return {"memory": memory, "memory_mask": memory_mask, "query_positions": query_positions}

    @torch.no_grad()
    def _cold_item_p(self) -> pd.Series:
        """Item P(correct) for a student with no answers (from the start token alone)."""
        from apps.education.config import START_INDEX

        start = np.array([START_INDEX], dtype=np.int64)
        example = {
            "categorical": {name: start for name in self.model_.config.categorical_fields},
            "time_delta": np.zeros(1, dtype=np.float32),
        }
        batch = collate([example]).to(self.device)
        states = self.model_(**batch.to_dict()).hidden_states  # (1, 1, hidden)
        item_ids = torch.arange(len(self.item_vocab_), device=self.device)
        logits = self.model_.next_step(
            states[:, 0, None, :].expand(-1, len(item_ids), -1),  # (1, n_items, hidden)
            item_ids[None],
            **self._retrieval_inputs(
                states, torch.zeros(1, len(item_ids), dtype=torch.long, device=self.device)
            ),
            next_features=self._candidate_features(None, [0]),
        )
        probs = torch.sigmoid(logits.float())[0, 2:].cpu().numpy()
        return pd.Series(probs, index=pd.Index(self.item_vocab_.tokens, name="item_id"))

    def _skill_mastery(self, item_p: np.ndarray) -> list[pd.Series]:
        """(S, n_known_items) item probabilities -> per-skill means, one Series per student."""
        index = pd.Index(self.skill_vocab_.tokens, name="skill_id")
        return [pd.Series(row, index=index, name="mastery") for row in self.skill_mastery_matrix(item_p)]

    def _example_options(self) -> dict[str, Any]:
        """`to_examples` keywords matching the fitted model: domain ids and practice features."""
        return {"skill_domain": self._skill_domain(), **example_options(self.model_.config)}

    def _candidate_features(self, last: Optional[SequenceWindows], windows: Any) -> Optional[torch.Tensor]:
        """Practice features of every known item after each of `windows` (indices into `last`; None: a
        student without answers), (B, n_items, F), or None when the model reads none."""
        if not example_options(self.model_.config)["practice"]:
            return None
        skill_sets = getattr(self, "item_skill_sets_", self.item_skill_[:, None])
        rows = []
        for w in windows:
            n = 0 if last is None else int(last.attention_mask[w].sum())
            skills = last.skills[w, :n] if last is not None else np.zeros((0, 1), dtype=np.int64)
            correct = last.correct[w, :n] if last is not None else np.zeros(0, dtype=np.int64)
            rows.append(practice_features(skills, correct, query_skills=skill_sets))
        return torch.as_tensor(np.stack(rows), device=self.device)

    def _skill_domain(self) -> Optional[np.ndarray]:
        """Domain id per skill vocabulary index, or None for a single-domain model (no domain ids)."""
        clusters = getattr(self, "skill_clusters_", {})
        return domain_of_skill_index(self.skill_vocab_, clusters) if clusters else None


def _last_windows(sequences: StudentSequences, keep: int) -> SequenceWindows:
    """One window per student (students without answers left out) holding their last `keep` answers."""
    students = np.flatnonzero(sequences.lengths > 0)
    n = np.minimum(sequences.lengths[students], keep)
    start = sequences.lengths[students] - n
    width = int(n.max()) if len(n) else 0
    slot = np.arange(width)[None, :]  # (1, L)
    valid = slot < n[:, None]  # (W, L)
    position = np.where(valid, start[:, None] + slot, -1)  # (W, L)
    flat = np.where(valid, sequences.offsets[students][:, None] + position, 0)  # (W, L)
    return SequenceWindows(
        student=students.astype(np.int64),
        position=position.astype(np.int64),
        items=np.where(valid, sequences.items[flat], 0),
        skills=np.where(valid[..., None], sequences.skills[flat], 0),
        correct=np.where(valid, sequences.correct[flat], 0).astype(np.int8),
        elapsed_s=np.where(valid, sequences.elapsed_s[flat], np.nan).astype(np.float32),
        attention_mask=valid,
        target_mask=np.zeros_like(valid),
    )


def example_options(config: Any) -> dict[str, bool]:
    """Which practice inputs a model config reads: `to_examples(practice=..., practice_tokens=...)`."""
    from apps.education.config import PRACTICE_FIELDS

    return {
        "practice": bool(getattr(config, "next_step_feature_buckets", [])),
        "practice_tokens": PRACTICE_FIELDS[0] in config.categorical_fields,
    }


def _item_skill_sets(frame: pd.DataFrame, item_vocab: Vocabulary, skill_vocab: Vocabulary) -> np.ndarray:
    """All skill indices of each item (its first row's skill cell), (n_items, K) padded with PAD_INDEX,
    aligned with the item vocabulary (pad/unknown items: no skill)."""
    cells = frame.drop_duplicates("item_id").set_index("item_id")["skill_id"].astype("string")
    parts = cells.loc[list(item_vocab.tokens)].str.split(SKILL_SEPARATOR, regex=False)
    flat = parts.reset_index(drop=True).explode()  # index: item position, one row per skill
    slot = flat.groupby(level=0).cumcount().to_numpy()
    out = np.zeros((len(item_vocab), int(slot.max(initial=0)) + 1), dtype=np.int64)
    out[2 + flat.index.to_numpy(), slot] = skill_vocab.encode(flat.to_numpy(), on_unknown="unknown")
    return out


def _item_skills(frame: pd.DataFrame, item_vocab: Vocabulary, skill_vocab: Vocabulary) -> np.ndarray:
    """Skill index of each item's first skill, aligned with the item vocabulary (pad/unknown -> 1)."""
    first = frame.drop_duplicates("item_id").set_index("item_id")["skill_id"].astype("string")
    first = first.str.split(SKILL_SEPARATOR, regex=False).str[0]
    out = np.ones(len(item_vocab), dtype=np.int64)
    out[2:] = skill_vocab.encode(first.loc[list(item_vocab.tokens)].to_numpy(), on_unknown="unknown")
    return out


def _skill_names(frame: pd.DataFrame) -> dict[str, str]:
    """skill id -> name where the data names it."""
    named = frame.dropna(subset=["skill_name"])
    if named.empty:
        return {}
    ids = named["skill_id"].astype(str).str.split(SKILL_SEPARATOR, regex=False).explode()
    names = named["skill_name"].astype(str).str.split(SKILL_SEPARATOR, regex=False).explode()
    pairs = pd.DataFrame({"id": ids.to_numpy(), "name": names.to_numpy()}) if len(ids) == len(names) else None
    if pairs is None:
        return {}
    return dict(pairs.drop_duplicates("id").itertuples(index=False, name=None))

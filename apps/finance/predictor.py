"""FraudDetector: a scikit-learn-style estimator scoring each transaction from its account's history."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from apps.finance.config import (
    HISTORY_WINDOW,
    LABEL_DELAY_DAYS,
    MAX_VOCABULARY,
    TARGET_PRECISION,
    fraud_config,
)
from apps.finance.encode import UNKNOWN_ID, EncodingState, FeatureEncoder, Windows
from apps.finance.metrics import fraud_metrics, pr_curve, threshold_for_budget, threshold_for_precision
from apps.finance.schema import LABEL_COLUMN
from core.data import collate
from core.errors import ConfigError, InputValidationError, NotFittedError
from core.train import (
    ExampleDataset,
    TrainingPlan,
    code_version,
    default_training_args,
    fingerprint,
    fit_two_stage,
    load_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

APP_NAME = "finance"
SCHEMA_VERSION = 2
LABELS_FILE = "merchant_labels.parquet"
ONNX_DIR = "onnx"
"""Sub-folder of a model directory caching its ONNX Runtime export (`FraudDetector.load(backend="onnx")`)."""
ONNX_SOURCE_FILE = "source.json"
BACKENDS = ("torch", "onnx")
TOKENS_PER_BATCH = 16_384
OCCLUSION_GROUPS: dict[str, tuple[str, ...]] = {
    "merchant": ("cat:merchant",),
    "merchant_category": ("cat:category",),
    "channel": ("cat:channel",),
    "country": ("cat:country",),
    "amount": ("num:log_amount", "num:amount_vs_account"),
    "time_of_day": ("num:hour_sin", "num:hour_cos"),
    "weekday": ("num:weekday_sin", "num:weekday_cos"),
    "merchant_risk": (
        "num:merchant_risk_1d",
        "num:merchant_risk_7d",
        "num:merchant_risk_30d",
        "num:merchant_risk_all",
        "num:merchant_log_count_1d",
        "num:merchant_log_count_7d",
        "num:merchant_log_count_30d",
    ),
    "recent_spending": (
        "num:account_log_count_1d",
        "num:account_log_count_7d",
        "num:account_log_count_30d",
        "num:amount_vs_account_1d",
        "num:amount_vs_account_7d",
        "num:amount_vs_account_30d",
    ),
    "time_since_previous": ("delta",),
}
"""Fields occluded together by `explain` (name shown to the analyst -> token fields)."""


class FraudDetector:
    """Scores transactions with the core model over each account's last K transactions.

    Two-stage fit: masked-field pretraining on the (unlabelled) training windows, then the fraud head on
    per-transaction labels with class weights (or focal loss). The alert threshold is chosen on
    validation data, for a target precision or a daily alert budget, and saved with the model.

    Args:
        hidden_size, num_layers, num_heads: model size (see `config.fraud_config`).
        history_window: K, tokens per window.
        label_delay_days: delay before a fraud label may feed the merchant-risk features.
        epochs: task epochs; pretrain_epochs: masked-field epochs (0 skips stage 1).
        batch_size: windows per training step; learning_rate: AdamW learning rate.
        max_steps: cap on task steps per stage (-1: by epochs), for quick runs.
        loss: "ce" with class weights, or "focal".
        target_precision: threshold rule: lowest threshold reaching this validation precision.
        alert_budget: alternatively, alerts per day allowed (overrides `target_precision`).
        validation_share: share of the training period (the latest) held out when no `val_df` is given.
        use_moe: channel-routed DomainMoE (True) or a dense FFN (default: at batch size 1 on one CPU
            thread the per-expert dispatch costs more than the real-time budget allows).
        seed: seeds both training stages.
        device: torch device for training and scoring.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        history_window: int = HISTORY_WINDOW,
        label_delay_days: float = LABEL_DELAY_DAYS,
        epochs: float = 3.0,
        pretrain_epochs: float = 1.0,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        max_steps: int = -1,
        loss: str = "ce",
        target_precision: float = TARGET_PRECISION,
        alert_budget: float | None = None,
        validation_share: float = 0.2,
        use_moe: bool = False,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.history_window = history_window
        self.label_delay_days = label_delay_days
        self.epochs = epochs
        self.pretrain_epochs = pretrain_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.max_steps = max_steps
        self.loss = loss
        self.target_precision = target_precision
        self.alert_budget = alert_budget
        self.validation_share = validation_share
        self.use_moe = use_moe
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------ fit
    def fit(
        self, train_df: pd.DataFrame, val_df: pd.DataFrame | None = None, history: pd.DataFrame | None = None
    ) -> FraudDetector:
        """Train on labelled canonical transactions and pick the alert threshold on validation data.

        Args:
            train_df: Validated canonical frame with `is_fraud`.
            val_df: Labelled validation frame, later than (or beside) the training period; its accounts'
                training transactions serve as their history. None: the latest `validation_share` of the
                training period is held out; with `validation_share=0` the threshold is chosen on the
                training data itself (in-sample, with a warning).
            history: Earlier transactions of the same accounts (context and delayed labels only, not
                trained on), e.g. the weeks before a training window.

        Returns:
            self.

        Raises:
            InputValidationError: No labels, or no fraud in the training data.
        """
        plan = self.prepare_fit(train_df, val_df, history)
        from core.model import CoreModel

        torch.manual_seed(self.seed)
        model = CoreModel(plan.config).to(self.device)
        dataset = ExampleDataset(plan.task_examples)
        with tempfile.TemporaryDirectory(prefix="finance-train-") as work:
            common = dict(
                learning_rate=self.learning_rate,
                batch_size=self.batch_size,
                seed=self.seed,
                max_steps=self.max_steps,
                use_cpu=self.device == "cpu",
                logging_steps=50,
            )
            pretrain = None
            if self.pretrain_epochs > 0:
                pretrain = default_training_args(
                    Path(work) / "pretrain", epochs=self.pretrain_epochs, **common
                )
            training_metrics = fit_two_stage(
                model,
                dataset,
                work,
                pretrain_dataset=ExampleDataset(plan.pretrain_examples) if pretrain is not None else None,
                pretrain_args=pretrain,
                task_args=default_training_args(Path(work) / "task", epochs=self.epochs, **common),
                seed=self.seed,
            )
        return self.finish_fit(model, plan, training_metrics)

    def prepare_fit(
        self,
        train_df: pd.DataFrame,
        val_df: pd.DataFrame | None = None,
        history: pd.DataFrame | None = None,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> TrainingPlan:
        """The first half of `fit`: split, fit the feature encoder, encode the windows, build the config.

        `fit` is `prepare_fit`, two-stage training of `CoreModel(plan.config)`, then `finish_fit`; another
        trainer (the suite's joint training) can train the model in between.

        Args:
            train_df, val_df, history: as in `fit`.
            config_overrides: CoreConfig fields replacing the preset's (e.g. a suite's shared trunk).

        Returns:
            The `TrainingPlan` (task and pretraining examples are the labelled training windows).

        Raises:
            InputValidationError: No labels, or no fraud in the training data.
        """
        if LABEL_COLUMN not in train_df.columns:
            raise InputValidationError(f"training data has no {LABEL_COLUMN!r} column; it needs labels")
        in_sample = val_df is None and self.validation_share <= 0
        if val_df is None and not in_sample:
            cut = train_df["timestamp"].quantile(1.0 - self.validation_share)
            train_df, val_df = train_df[train_df["timestamp"] < cut], train_df[train_df["timestamp"] >= cut]
        if in_sample:
            warnings.warn(
                "validation_share=0: the threshold is chosen on the training data", UserWarning, stacklevel=3
            )
            val_df = train_df
        if LABEL_COLUMN not in val_df.columns or len(val_df) == 0:
            raise InputValidationError(f"validation data needs rows with a {LABEL_COLUMN!r} column")
        positives = int(train_df[LABEL_COLUMN].sum())
        if positives == 0:
            raise InputValidationError(
                "training data holds no fraud (is_fraud == 1); cannot learn a detector"
            )
        started = time.perf_counter()
        self.encoder_ = FeatureEncoder.fit(
            train_df, self.history_window, self.label_delay_days, MAX_VOCABULARY, history
        )
        state = self.encoder_.new_state()
        if history is not None and len(history):
            self.encoder_.encode(history, state)
        windows = self.encoder_.encode(train_df, state, with_labels=True)
        negatives = len(train_df) - positives
        weights = None if self.loss == "focal" else [1.0, float(min(np.sqrt(negatives / positives), 30.0))]
        self.config_ = fraud_config(
            self.encoder_.vocab_sizes,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            history_window=self.history_window,
            class_weights=weights,
            classification_loss=self.loss,
            use_moe=self.use_moe,
            **dict(config_overrides or {}),
        )
        context = dict(
            train_df=train_df,
            val_df=val_df,
            history=history,
            in_sample=in_sample,
            windows=windows,
            started=started,
        )
        return TrainingPlan(self.config_, windows.examples, windows.examples, context)

    def finish_fit(
        self, model: Any, plan: TrainingPlan, training_metrics: Mapping[str, Any] | None = None
    ) -> FraudDetector:
        """The second half of `fit`: keep the trained model, choose the threshold on validation data, score it.

        Args:
            model: the trained `CoreModel` (its config may differ from `plan.config` in sizes, not in fields).
            plan: the plan `prepare_fit` returned.
            training_metrics: the training stages' metrics, kept as `training_metrics_`.

        Returns:
            self, fitted.
        """
        train_df, val_df, history = plan.context["train_df"], plan.context["val_df"], plan.context["history"]
        in_sample, windows = plan.context["in_sample"], plan.context["windows"]
        self.training_metrics_ = dict(training_metrics or {})
        self.model_ = model.to(self.device).eval()
        self.config_ = model.config
        labelled = train_df if in_sample else pd.concat([train_df, val_df])
        self.label_events_ = labelled[
            ["transaction_id", "merchant_id", "timestamp", LABEL_COLUMN]
        ].reset_index(drop=True)
        self.data_fingerprint_ = _frame_fingerprint(train_df)
        self.model_version_ = f"{pd.Timestamp.now(tz='UTC'):%Y%m%d%H%M%S}-{self.data_fingerprint_[:8]}"

        if in_sample:
            scores = self.score_windows(windows, len(train_df))
        else:
            context = train_df if history is None else pd.concat([history, train_df])
            scores = self.predict_proba(val_df, history=context)
        labels = val_df[LABEL_COLUMN].to_numpy()
        days = val_df["timestamp"].dt.floor("D").to_numpy()
        if self.alert_budget is not None:
            self.threshold_ = threshold_for_budget(scores, days, self.alert_budget)
            self.threshold_rule_ = f"alert_budget={self.alert_budget}/day"
        else:
            self.threshold_ = threshold_for_precision(scores, labels, self.target_precision)
            self.threshold_rule_ = f"target_precision={self.target_precision}"
        self.metrics_ = fraud_metrics(labels, scores, days, self.threshold_)
        self.metrics_["train_seconds"] = round(time.perf_counter() - plan.context["started"], 2)
        self.curve_ = pr_curve(labels, scores)
        self.score_histogram_ = np.histogram(scores, bins=20, range=(0.0, 1.0))[0].tolist()
        return self

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "This FraudDetector instance is not fitted yet. Call 'fit' with training data, "
                "or 'load' a model directory, before using this estimator."
            )

    def new_state(self) -> EncodingState:
        """A fresh encoding state holding the model's known labels (training and validation)."""
        self._check_fitted()
        state = self.encoder_.new_state()
        events = self.label_events_
        state.labels.add(
            events["transaction_id"].to_numpy(dtype=object),
            events["merchant_id"].to_numpy(dtype=object),
            (events["timestamp"].astype("datetime64[us, UTC]").astype("int64") // 1_000_000).to_numpy(),
            events[LABEL_COLUMN].to_numpy().astype(np.int64),
        )
        return state

    def score_windows(self, windows: Windows, n_rows: int) -> np.ndarray:
        """Fraud probability (n_rows,) of every row the windows score (windows from `encoder_.encode`)."""
        self._check_fitted()
        scores = np.full(n_rows, np.nan)
        order = np.argsort([len(e["time_delta"]) for e in windows.examples], kind="stable")
        start = 0
        with torch.inference_mode():
            while start < len(order):
                length = len(windows.examples[order[min(len(order) - 1, start)]]["time_delta"])
                stop = min(len(order), start + max(1, TOKENS_PER_BATCH // max(length, 1)))
                # Sorted by length, the last window of the batch is the longest: budget on it.
                longest = len(windows.examples[order[stop - 1]]["time_delta"])
                stop = min(stop, start + max(1, TOKENS_PER_BATCH // max(longest, 1)))
                chosen = order[start:stop]
                batch = collate([windows.examples[i] for i in chosen]).to(self.device)
                hidden = self.model_(**batch.to_dict()).hidden_states  # (B, T, hidden)
                logits = self.model_.classifier(hidden)  # (B, T, 2)
                probability = torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()  # (B, T)
                for row, i in enumerate(chosen):
                    scores[windows.rows[i]] = probability[row, windows.positions[i]]
                start = stop
        if np.isnan(scores).any():
            raise InputValidationError(
                "internal error: some transactions were not scored"
            )  # pragma: no cover
        return scores

    def predict_proba(self, df: pd.DataFrame, history: pd.DataFrame | None = None) -> np.ndarray:
        """Fraud probability of each row of `df`, from its account's earlier transactions only.

        Args:
            df: Validated canonical transactions (time order within each account).
            history: Earlier transactions of the same accounts (not scored; they give context and labels).

        Returns:
            (len(df),) float scores in [0, 1], aligned with the rows of `df`.
        """
        self._check_fitted()
        state = self.new_state()
        if history is not None and len(history):
            self.encoder_.encode(history, state)
        return self.score_windows(self.encoder_.encode(df, state), len(df))

    def predict(self, df: pd.DataFrame, history: pd.DataFrame | None = None) -> np.ndarray:
        """(len(df),) int 0/1: score >= the stored threshold."""
        return (self.predict_proba(df, history) >= self.threshold_).astype(np.int64)

    # ------------------------------------------------------------------ explanations
    def explain(self, df: pd.DataFrame, transaction_id: str, top_k: int = 5) -> dict[str, Any]:
        """Why a transaction got its score: the past transactions it attended to and the fields that moved it.

        Args:
            df: Canonical transactions including the transaction and its account's history.
            transaction_id: The transaction to explain.
            top_k: Past transactions to return.

        Returns:
            {"transaction_id", "account_id", "score", "threshold", "is_alert",
             "top_transactions": [{"transaction_id", "timestamp", "amount", "merchant_id", "weight"}],
             "field_effects": [{"field", "effect"}] sorted by |effect| (effect = score - score with the
             field occluded: positive means the field raised the score), "milliseconds"}.

        Raises:
            InputValidationError: The transaction id is not in `df`.
        """
        self._check_fitted()
        started = time.perf_counter()
        hits = np.flatnonzero(df["transaction_id"].to_numpy(dtype=object) == str(transaction_id))
        if len(hits) == 0:
            raise InputValidationError(
                f"transaction_id {transaction_id!r} not found in the data ({len(df)} rows)"
            )
        account = df["account_id"].iloc[hits[0]]
        account_rows = df[df["account_id"] == account]
        target = int(
            np.flatnonzero(account_rows["transaction_id"].to_numpy(dtype=object) == str(transaction_id))[0]
        )
        windows = self.encoder_.encode(account_rows, self.new_state())
        index = next(i for i, rows in enumerate(windows.rows) if target in rows)
        example = windows.examples[index]
        position = int(windows.positions[index][list(windows.rows[index]).index(target)])
        first_row = target - position  # account_rows row of token 0 of the window
        variants = [example] + [_occlude(example, position, parts) for parts in OCCLUSION_GROUPS.values()]
        batch = collate(variants).to(self.device)
        model = getattr(self, "torch_model_", self.model_)  # attention weights come from the torch model
        with torch.inference_mode():
            out = model(**batch.to_dict(), output_attentions=True)
            logits = model.classifier(out.hidden_states)  # (B, T, 2)
        probability = torch.softmax(logits.float(), dim=-1)[:, position, 1].cpu().numpy()
        weights = out.attentions[-1].attention_weights[0].float().mean(0)[position, :position]  # (position,)
        ranked = torch.argsort(weights, descending=True)[:top_k].cpu().numpy()
        top = []
        for token in ranked:
            row = account_rows.iloc[first_row + int(token)]
            top.append(
                {
                    "transaction_id": str(row["transaction_id"]),
                    "timestamp": row["timestamp"].isoformat(),
                    "amount": float(row["amount"]),
                    "merchant_id": str(row["merchant_id"]),
                    "weight": float(weights[token]),
                }
            )
        effects = [
            {"field": name, "effect": float(probability[0] - probability[k + 1])}
            for k, name in enumerate(OCCLUSION_GROUPS)
        ]
        effects.sort(key=lambda e: -abs(e["effect"]))
        return {
            "transaction_id": str(transaction_id),
            "account_id": str(account),
            "score": float(probability[0]),
            "threshold": float(self.threshold_),
            "is_alert": bool(probability[0] >= self.threshold_),
            "top_transactions": top,
            "field_effects": effects,
            "milliseconds": round(1000 * (time.perf_counter() - started), 1),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the model directory (config.json, model.safetensors, app.json, metrics.json, labels)."""
        self._check_fitted()
        meta = {
            "app": APP_NAME,
            "schema_version": SCHEMA_VERSION,
            "encoder": self.encoder_.to_meta(),
            "threshold": float(self.threshold_),
            "threshold_rule": self.threshold_rule_,
            "model_version": self.model_version_,
            "data_fingerprint": self.data_fingerprint_,
            "params": self.get_params(),
        }
        metrics = {**self.metrics_, "pr_curve": self.curve_, "score_histogram": self.score_histogram_}
        model_dir = save_checkpoint(self.model_, path, meta, metrics)
        events = self.label_events_.copy()
        events[LABEL_COLUMN] = events[LABEL_COLUMN].astype("int8")
        events.astype({"transaction_id": str, "merchant_id": str}).to_parquet(
            model_dir / LABELS_FILE, index=False
        )
        return model_dir

    def use_onnx_runtime(self, folder: str | Path) -> FraudDetector:
        """Score with ONNX Runtime: export the fp32 model to `folder` (once; reused while it matches) and use it.

        Scores equal the torch model's to about 1e-6 (tested at 1e-5); ONNX Runtime runs as many threads as
        torch. Explanations keep the torch model (they need attention weights). Training is not affected.

        Args:
            folder: Where the export lives (`load(backend="onnx")` uses `<model dir>/onnx`).

        Returns:
            self.
        """
        self._check_fitted()
        from core.compress import export_onnx
        from core.onnx_model import OnnxCoreModel

        folder = Path(folder)
        source = {"model_version": self.model_version_, "data_fingerprint": self.data_fingerprint_}
        marker = folder / ONNX_SOURCE_FILE
        if not (marker.is_file() and json.loads(marker.read_text()) == source):
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
                export_onnx(
                    getattr(self, "torch_model_", self.model_), [_export_sample()], tmp, with_explain=False
                )
            (tmp / ONNX_SOURCE_FILE).write_text(json.dumps(source))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        self.torch_model_ = getattr(self, "torch_model_", self.model_)
        self.model_ = OnnxCoreModel(folder, threads=torch.get_num_threads())
        return self

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", backend: str = "torch") -> FraudDetector:
        """Load a model directory written by `save`.

        Args:
            path: The model directory.
            device: torch device (backend "torch").
            backend: "torch", or "onnx" to score with ONNX Runtime on the CPU (see `use_onnx_runtime`; the
                export is cached in `<path>/onnx`).

        Raises:
            InputValidationError: Not a finance model directory.
            ConfigError: An unknown backend, or "onnx" with a device other than the CPU.
        """
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {list(BACKENDS)}; got {backend!r}")
        if backend == "onnx" and torch.device(device).type != "cpu":
            raise ConfigError(f"the onnx backend runs on the CPU, not on {device!r}")
        model, meta = load_checkpoint(path, device)
        if meta.get("app") != APP_NAME:
            raise InputValidationError(
                f"{path}: a model directory of app {meta.get('app')!r}, expected {APP_NAME!r}"
            )
        if not (Path(path) / LABELS_FILE).is_file():
            raise InputValidationError(
                f"{path}: {LABELS_FILE} missing; retrain with `verticals finance train`"
            )
        from core.train import load_metrics

        params = dict(meta.get("params", {}))
        params["device"] = device
        detector = cls(**params)
        detector.model_ = model
        detector.config_ = model.config
        detector.encoder_ = FeatureEncoder.from_meta(meta["encoder"])
        detector.threshold_ = float(meta["threshold"])
        detector.threshold_rule_ = meta["threshold_rule"]
        detector.model_version_ = meta["model_version"]
        detector.data_fingerprint_ = meta["data_fingerprint"]
        metrics = load_metrics(path)
        detector.curve_ = metrics.pop("pr_curve", {})
        detector.score_histogram_ = metrics.pop("score_histogram", [])
        detector.metrics_ = metrics
        events = pd.read_parquet(Path(path) / LABELS_FILE)
        events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
        detector.label_events_ = events
        if backend == "onnx":
            detector.use_onnx_runtime(Path(path) / ONNX_DIR)
        return detector

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments (scikit-learn convention)."""
        names = [
            "hidden_size",
            "num_layers",
            "num_heads",
            "history_window",
            "label_delay_days",
            "epochs",
            "pretrain_epochs",
            "batch_size",
            "learning_rate",
            "max_steps",
            "loss",
            "target_precision",
            "alert_budget",
            "validation_share",
            "use_moe",
            "seed",
        ]
        return {name: getattr(self, name) for name in names}


def _occlude(example: dict[str, Any], position: int, parts: Sequence[str]) -> dict[str, Any]:
    """A copy of the example with the given fields of one token replaced by unknown / missing."""
    from apps.finance.config import CATEGORICAL_FIELDS, NUMERIC_FIELDS

    out = {
        "categorical": {k: v.copy() for k, v in example["categorical"].items()},
        "numeric": example["numeric"].copy(),
        "numeric_mask": example["numeric_mask"].copy(),
        "time_delta": example["time_delta"].copy(),
        "domain_ids": example["domain_ids"],
    }
    for part in parts:
        kind, name = part.split(":") if ":" in part else (part, "")
        if kind == "cat":
            assert name in CATEGORICAL_FIELDS
            out["categorical"][name][position] = UNKNOWN_ID
        elif kind == "num":
            j = NUMERIC_FIELDS.index(name)
            out["numeric"][position, j] = 0.0
            out["numeric_mask"][position, j] = False
        else:
            out["time_delta"][position] = 0.0
    return out


def _export_sample(length: int = 8) -> dict[str, Any]:
    """A small valid example (unknown ids, zero values) to trace the ONNX export with."""
    from apps.finance.config import CATEGORICAL_FIELDS, NUMERIC_FIELDS

    return {
        "categorical": {name: np.full(length, UNKNOWN_ID, np.int64) for name in CATEGORICAL_FIELDS},
        "numeric": np.zeros((length, len(NUMERIC_FIELDS)), np.float32),
        "numeric_mask": np.ones((length, len(NUMERIC_FIELDS)), bool),
        "time_delta": np.zeros(length, np.float32),
        "domain_ids": np.zeros(length, np.int64),
    }


def _frame_fingerprint(df: pd.DataFrame) -> str:
    ids = df["transaction_id"].astype(str).str.cat(sep="\n")
    return fingerprint(ids, str(len(df)), code_version())

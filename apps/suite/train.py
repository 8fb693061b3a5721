"""Joint training of the suite model: one shared trunk, each app's embedder and head, two stages.

Each app prepares its training exactly as its own `fit` does (`prepare_fit`: reading, validation split,
encoders, examples, config), with the suite's trunk fields. The apps' models are tied to one trunk
(`core.multitask`), every token is tagged with its app as domain id, and `transformers.Trainer` runs stage 1
(masked-field modelling on every app) and stage 2 (every app's task); an app with a stage 0 of its own (the
medical CT stem, `Diagnoser.pretrain_stem`) runs it first, on its part alone, as its own `fit` does. By default the apps' batches take turns,
one optimizer step each (`SuiteSettings.interleave`): summed into one step, the gradient clip and Adam's
scaling of the shared trunk are set by the app with the largest gradients (medical), which starves the others
(fraud's loss stayed ~0.04 above its own model's). Each app thus gets the batches and the optimizer updates
on them of a single-app run, and the shared trunk one update per app batch; with AdamW's moments kept per app
(`SuiteSettings.optimizer_state`, `core.multitask.TaskAdamW`) each of those updates is the one AdamW makes from
that app's gradients alone.
After training, each MoE layer's selection bias is settled on the served (eval-mode) routing of the apps'
training examples (`SuiteSettings.settle_steps`, `settle_floor`). Each app's part is then exported as a normal model directory of that app (`export_task_model` keeps the
domain the suite gave its tokens), finished and evaluated by the app's own predictor (`finish_fit`, the
app's validation metrics) and saved with the app's own `save`. `suite.json` lists the parts, the expert
groups, the metrics and the routing statistics measured on the validation data.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apps.suite.config import BATCH_SIZES, GENERAL_GROUP, SUITE_DOMAINS, expert_groups, trunk_overrides
from core.errors import InputValidationError
from core.train import SUITE_FILE, TrainingPlan, code_version, fingerprint

logger = logging.getLogger(__name__)

SUITE_SCHEMA_VERSION = 1


@dataclass
class AppRun:
    """One app inside a suite run: its predictor, its training plan and its validation data."""

    name: str
    predictor: Any
    plan: TrainingPlan
    validation: Any
    batch_size: int
    metrics: dict[str, float] = field(default_factory=dict)

    def training_transform(self) -> Any:
        """A new instance of the training augmentation the app's own `fit` applies (None: none)."""
        make = getattr(self.predictor, "training_transform", None)
        return make() if make is not None else None


@dataclass(frozen=True)
class SuiteSettings:
    """Training settings of a suite run (the same for a single-app run, for a like-for-like comparison).

    Attributes:
        epochs: stage-2 (task) epochs, counted in rounds of the app with the most batches.
        pretrain_epochs: stage-1 (masked-field) epochs; 0 skips stage 1.
        learning_rate: AdamW peak learning rate.
        seed: seeds everything.
        max_steps: cap on task batches per app (-1: by epochs), finishing steps included; joint, one step is
            a batch of every app.
        pretrain_max_steps: the same cap for stage 1 when it differs from `max_steps` (None: `max_steps`).
        medical_preset: the medical preset (`"small"`, `"cnn"`: with the CT stem and its stage 0, `"tiny"`).
        finish_steps: stage-2 steps of an app after the joint steps, in which only that app's embedders,
            heads and domain expert group train (`MultiTaskModel.finishing`), one app after the other; the
            app parts keep one shared trunk. An int: every app; a mapping app -> steps: those apps (the
            others 0; `parse_finish_steps` reads "32" or "medical=32"). 0 skips it. Budget-neutral per
            app: an app with K finishing steps gets K fewer joint task batches (`finish_schedule`), so each
            app's task batches add up to those of its own run; its joint batches are spread evenly over the
            joint stage (`core.multitask.RoundRobinDataset` caps), so the other apps' batches keep their
            place in the joint stage's learning-rate schedule. Each app's finishing is a Trainer run of its
            own: the same warmup share and cosine decay from the peak learning rate over its K steps.
        loss_balance: how the joint steps add the apps' losses (`core.multitask.LOSS_BALANCES`).
        interleave: one optimizer step per app batch (the apps in turn) instead of one per round of a batch
            of every app; `max_steps` and `pretrain_max_steps` still count each app's batches, so every app
            gets as many batches and as many optimizer steps on them as a single-app run.
        balance_scope: aux-free balancing of the routed experts: "all" (towards the mean load of all
            experts) or "group" (that, plus a step towards the mean load of the expert's own group: each
            domain's group and the general group; `DomainMoE.set_balance_groups`), which evens out the load
            inside a group whose experts all sit on one side of the global mean; or "within" (the group step,
            plus a target per app: its group moves towards an even spread of the app's tokens over its group
            and the general experts; `DomainMoE.set_balance_targets`). A domain group's load is
            set by how many tokens its domain has, so the global term can only even it out by raising the
            bias of a quiet domain's experts until a busy domain's tokens leak into them (off their group,
            and onto one or two of them, which leaves the others cold).
        balance_mix: the domain mix the aux-free balancing evens the load for: "tokens" (each app weighted by
            its share of the tokens in the suite's data, the mix the suite serves when it scores its apps'
            data and the one the routing report counts; `DomainMoE.set_balance_mix`) or "batches" (the
            tokens of the training batches as they come: a batch of every app per round, so a small app
            weighs as much as its batch size and length give it, whatever its share of the data).
        balance_load: the passes whose routing the aux-free balancing counts during training: "train" (the
            training passes) or "serving" (each training batch is also run once as the model serves it, eval
            mode without dropout, and only that pass is counted; `core.moe.serving_load_pass`; one more
            forward pass per batch). With dropout (finance and education: 0.1) a token's router input in
            training is a noisy copy of the served one, which spreads the training load over more experts
            than serving does.
        settle_steps: after training, every MoE layer's selection bias takes this many updates on the served
            routing (eval mode) of all the apps' training examples, with the router fixed
            (`core.multitask.settle_served_balance`); 0 skips it. Served (no dropout), a finance window's
            tokens mostly share one expert pair, so an update during training, on a few batches, moves the
            whole load at once and the bias ends wherever the last updates left it, which left an expert of
            a group nearly idle on the served data in some seeds.
        settle_floor: the settling only lifts the experts below this share of their balance group's served
            load, on the mix of `balance_mix` (`DomainMoE.settle_bias`), so it moves as few tokens as that
            takes away from the routing the experts were trained with. Four times the routing report's 2%:
            the report counts held-out data, whose share of an expert can be a fraction of its training share
            (other examples; a later period of finance windows, which carry their history). At 4%, seed 114
            (bench/suite_bench.py) left a general expert with 6.2% of its group's training load and 1.5% of
            the validation load. None: the full balance rule (groups, targets, mix), which moves many more
            tokens.
        settle_resamples: with `settle_floor`, the floor must hold on this many bootstrap resamples of the
            training examples (each app's within the app) but for `settle_quantile` of them, not only on the
            examples themselves (`DomainMoE.settle_bias`); 0: on the examples. An expert can take its share
            of a group from a few examples whose tokens are alike (a CT volume's patches): then other
            examples, the validation data the routing report counts, can leave it idle (seed 12: 5.4% of the
            medical group's training load, from 17 of the 48 training cases, and 0.8% of the validation
            load).
        settle_quantile: see `settle_resamples`.
        optimizer_state: "per_app" (AdamW moments kept per app, `core.multitask.TaskAdamW`: each app's update
            of the shared trunk is the one AdamW makes from that app's gradients alone, as in its own run) or
            "shared" (one AdamW state for every step, mixing the apps' momentum and gradient scales).
        trunk: changes to the trunk fields of `apps.suite.config.TRUNK`.
        batch_sizes: per-app batch sizes (default `BATCH_SIZES`).
        device: "cpu" or "cuda".
        show_progress: Trainer progress bars.
    """

    epochs: float = 3.0
    pretrain_epochs: float = 1.0
    learning_rate: float = 2e-3
    seed: int = 0
    max_steps: int = -1
    pretrain_max_steps: int | None = None
    medical_preset: str = "small"
    finish_steps: int | Mapping[str, int] = 0
    loss_balance: str = "sum"
    balance_scope: str = "within"
    balance_mix: str = "tokens"
    balance_load: str = "train"
    settle_steps: int = 300
    settle_floor: float | None = 0.08
    settle_resamples: int = 200
    settle_quantile: float = 0.05
    optimizer_state: str = "per_app"
    interleave: bool = True
    trunk: Mapping[str, Any] = field(default_factory=dict)
    batch_sizes: Mapping[str, int] = field(default_factory=lambda: dict(BATCH_SIZES))
    device: str = "cpu"
    show_progress: bool = False


# ---------------------------------------------------------------------- per-app preparation


def _prepare_finance(source: Path, settings: SuiteSettings, overrides: dict[str, Any]) -> AppRun:
    from apps.finance.adapters import read_source, validate
    from apps.finance.predictor import FraudDetector

    frame, _ = validate(read_source(str(source), format="canonical"))
    frame = frame.sort_values("timestamp", kind="stable")
    sizes = {k: overrides.pop(k) for k in ("hidden_size", "num_layers", "num_heads", "use_moe")}
    detector = FraudDetector(
        **sizes,
        batch_size=settings.batch_sizes["finance"],
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        device=settings.device,
    )
    plan = detector.prepare_fit(frame, config_overrides=overrides)
    return AppRun("finance", detector, plan, None, settings.batch_sizes["finance"])


def _finish_finance(run: AppRun, model: Any, out: Path, training: Mapping[str, Any]) -> dict[str, float]:
    # finish_fit scores the validation period (threshold and metrics): the routing statistics come from it.
    detector = run.predictor.finish_fit(model, run.plan, training)
    detector.save(out)
    return {k: float(v) for k, v in detector.metrics_.items() if isinstance(v, int | float)}


def _prepare_medical(source: Path, settings: SuiteSettings, overrides: dict[str, Any]) -> AppRun:
    from apps.medical.adapters import read_cases
    from apps.medical.predictor import Diagnoser
    from apps.medical.service import split_cases

    train, validation = split_cases(read_cases(source))
    diagnoser = Diagnoser(
        settings.medical_preset,
        batch_size=settings.batch_sizes["medical"],
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        device=settings.device,
        show_progress=settings.show_progress,
    )
    plan = diagnoser.prepare_fit(train, config_overrides=overrides)
    return AppRun("medical", diagnoser, plan, validation, settings.batch_sizes["medical"])


def _finish_medical(run: AppRun, model: Any, out: Path, training: Mapping[str, Any]) -> dict[str, float]:
    from apps.medical.predictor import classification_metrics

    diagnoser = run.predictor.finish_fit(model, run.plan, training)
    _reset_routing(model)  # the prototypes were computed on training cases: measure validation only
    known = [c for c in run.validation if c.label in diagnoser.labels_]
    metrics: dict[str, float] = {}
    if known:
        metrics = classification_metrics(
            [c.label for c in known], diagnoser.predict_proba(known), diagnoser.classes_
        )
    diagnoser.save(out, metrics=metrics)
    return metrics


def _prepare_education(source: Path, settings: SuiteSettings, overrides: dict[str, Any]) -> AppRun:
    from apps.education.adapters import read_interactions
    from apps.education.predictor import KnowledgeTracer

    frame = read_interactions(source, format="canonical", on_invalid="raise").frame
    # The education CLI's split: a seeded tenth of the students is held out.
    users = frame["user_id"].drop_duplicates().to_numpy()
    rng = np.random.default_rng(settings.seed)
    held = set(rng.choice(users, size=int(len(users) * 0.1), replace=False).tolist())
    tracer = KnowledgeTracer(
        "small",
        batch_size=settings.batch_sizes["education"],
        learning_rate=settings.learning_rate,
        seed=settings.seed,
        device=settings.device,
    )
    plan = tracer.prepare_fit(frame[~frame["user_id"].isin(held)], config_overrides=overrides)
    return AppRun(
        "education", tracer, plan, frame[frame["user_id"].isin(held)], settings.batch_sizes["education"]
    )


def _finish_education(run: AppRun, model: Any, out: Path, training: Mapping[str, Any]) -> dict[str, float]:
    tracer = run.predictor.finish_fit(model, run.plan, dict(training))
    metrics: dict[str, float] = {}
    if len(run.validation):
        metrics = {f"valid_{k}": float(v) for k, v in tracer.evaluate(run.validation).items()}
    tracer.save(out, metrics=metrics)
    return metrics


PREPARE: Mapping[str, Callable[[Path, SuiteSettings, dict[str, Any]], AppRun]] = {
    "finance": _prepare_finance,
    "medical": _prepare_medical,
    "education": _prepare_education,
}
FINISH: Mapping[str, Callable[[AppRun, Any, Path, Mapping[str, Any]], dict[str, float]]] = {
    "finance": _finish_finance,
    "medical": _finish_medical,
    "education": _finish_education,
}
HEADLINE_METRICS: Mapping[str, str] = {
    "finance": "average_precision",
    "medical": "auroc_macro",
    "education": "valid_auc",
}
"""The metric each app is judged by (fraud AP, diagnosis macro AUROC, knowledge-tracing AUC)."""


# ---------------------------------------------------------------------- joint training


def _reset_routing(model: Any) -> None:
    for moe in model.moe_layers():
        moe.reset_routing_stats()


def _tagged(examples: Sequence[Mapping[str, Any]], domain_id: int) -> list[dict[str, Any]]:
    """The examples with every token (and CT patch) tagged with the suite domain of their app."""
    return [{**example, "domain_ids": np.int64(domain_id)} for example in examples]


def _suite_config(plan: TrainingPlan, groups: Mapping[str, list[int]]) -> Any:
    from core.config import CoreConfig

    values = plan.config.to_dict()
    values.update(domains=list(SUITE_DOMAINS), domain_expert_groups=dict(groups))
    return CoreConfig.from_dict(values)


def _routing_stats(parts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer, each app's routed assignments and probability mass per expert, summed over its own domains."""
    layers: list[dict[str, Any]] = []
    for name, model in parts.items():
        for index, moe in enumerate(model.moe_layers()):
            stats = moe.routing_stats()
            while len(layers) <= index:
                layers.append({"counts": {}, "mass": {}, "tokens": {}})
            layers[index]["counts"][name] = stats["counts"].sum(axis=0).tolist()
            layers[index]["mass"][name] = stats["mass"].sum(axis=0).tolist()
            layers[index]["tokens"][name] = int(stats["tokens"].sum())
    return layers


def train_suite(
    sources: Mapping[str, str | Path], out: str | Path, settings: SuiteSettings | None = None
) -> dict[str, Any]:
    """Train the suite model on the given apps' data and write the suite directory.

    Stage 1 (masked-field) and stage 2 (task) are joint: one batch of every app per step. With
    `settings.finish_steps`, an app's last task steps are alone, on its own embedders, head and domain
    expert group (the shared trunk stays as the joint steps left it), taken out of its joint steps.

    Args:
        sources: app name -> its training data (finance: a transactions file; medical: a folder with
            cases.csv; education: an interactions CSV). One app alone trains a single-app model with the
            suite's architecture and schedule (the baseline of the suite's figures).
        out: the suite directory: `suite.json` and one model directory per app (`out/<app>`).
        settings: training settings.

    Returns:
        The contents of `suite.json`.

    Raises:
        InputValidationError: no app, an unknown app name, or invalid settings (balance scope, loss
            balance, finishing steps); the apps' own errors on bad data.
    """
    from transformers import set_seed

    from core.model import CoreModel
    from core.multitask import (
        MultiTaskModel,
        RoundCollator,
        RoundRobinDataset,
        export_task_model,
        settle_served_balance,
    )
    from core.train import MaskedFieldCollator, TaskCollator, default_training_args

    settings = settings or SuiteSettings()
    if not sources:
        raise InputValidationError(
            "suite train: give at least one app's data (--finance, --medical, --education)"
        )
    unknown = sorted(set(sources) - set(SUITE_DOMAINS))
    if unknown:
        raise InputValidationError(f"suite train: unknown apps {unknown}; known: {list(SUITE_DOMAINS)}")
    _check_settings(settings)
    names = [name for name in SUITE_DOMAINS if name in sources]
    out = Path(out)
    started = time.perf_counter()
    trunk = trunk_overrides(**dict(settings.trunk))
    groups = expert_groups(trunk["n_routed_experts"])

    set_seed(settings.seed)
    runs = {name: PREPARE[name](Path(sources[name]), settings, dict(trunk)) for name in names}
    set_seed(settings.seed)
    models = {name: CoreModel(_suite_config(run.plan, groups)) for name, run in runs.items()}
    suite = MultiTaskModel(models, loss_balance=settings.loss_balance, balance_load=settings.balance_load)
    _set_balance_scope(suite, settings.balance_scope, groups, trunk["n_routed_experts"])
    served = {name: data_tokens(run.plan.task_examples, run.plan.config) for name, run in runs.items()}
    if settings.balance_mix == "tokens":
        _set_balance_mix(suite, [float(served.get(name, 0)) for name in SUITE_DOMAINS])
    # Interleaved, a step holds one app's batch: balance on the load of a whole round of the apps.
    _set_balance_every(suite, len(names) if settings.interleave else 1)
    domain_ids = {name: SUITE_DOMAINS.index(name) for name in names}
    batch_sizes = {name: run.batch_size for name, run in runs.items()}
    common = dict(
        learning_rate=settings.learning_rate,
        batch_size=1,  # one item of RoundRobinDataset (a round, or one app's batch when interleaved) per step
        seed=settings.seed,
        max_steps=trainer_steps(settings.max_steps, len(names), settings.interleave),
        # Interleaved items must run in order (app 1, 2, 3, 1, ...) so that a step cap gives every app exactly
        # its share; the dataset shuffles each app's batches itself, every epoch.
        train_sampling_strategy="sequential" if settings.interleave else "random",
        use_cpu=settings.device == "cpu",
        logging_steps=10,
        disable_tqdm=not settings.show_progress,
    )
    training: dict[str, dict[str, float]] = {}
    transforms = {n: t for n, r in runs.items() if (t := r.training_transform()) is not None}
    with tempfile.TemporaryDirectory(prefix="suite-train-") as work:
        for name, run in runs.items():  # stage 0 of an app that has one (the medical CT stem), alone
            pretrain_stem = getattr(run.predictor, "pretrain_stem", None)
            if pretrain_stem is not None:
                set_seed(settings.seed)
                stem_metrics = pretrain_stem(models[name], run.plan, Path(work) / f"stem_{name}")
                if stem_metrics is not None:
                    training[f"stem_{name}"] = stem_metrics
        if settings.pretrain_epochs > 0:
            set_seed(settings.seed)
            dataset = RoundRobinDataset(
                {n: _tagged(r.plan.pretrain_examples, domain_ids[n]) for n, r in runs.items()},
                batch_sizes,
                seed=settings.seed,
                interleave=settings.interleave,
                transforms=transforms,
            )
            collator = RoundCollator({n: MaskedFieldCollator(seed=settings.seed) for n in names})
            pretrain_steps = (
                settings.max_steps if settings.pretrain_max_steps is None else settings.pretrain_max_steps
            )
            pretrain_steps = trainer_steps(pretrain_steps, len(names), settings.interleave)
            args = default_training_args(
                Path(work) / "pretrain",
                epochs=settings.pretrain_epochs,
                **{**common, "max_steps": pretrain_steps},
            )
            training["pretrain"] = _run_stage(suite, dataset, args, collator, settings.optimizer_state)
        set_seed(settings.seed)
        task_examples = {n: _tagged(r.plan.task_examples, domain_ids[n]) for n, r in runs.items()}

        def task_dataset(caps: Mapping[str, int] | None = None) -> RoundRobinDataset:
            return RoundRobinDataset(
                task_examples,
                batch_sizes,
                seed=settings.seed,
                interleave=settings.interleave,
                transforms=transforms,
                caps=caps,
            )

        dataset = task_dataset()
        task_common = dict(common)
        finishing = finish_plan(settings, names)
        if any(finishing.values()):
            schedule = finish_schedule(settings, dataset.task_batch_counts(), finishing)
            dataset = task_dataset(caps={n: schedule[n]["joint"] for n in names})
            task_common["max_steps"] = len(dataset)  # the whole capped schedule, once
            training["schedule"] = {f"{n}_{k}": v for n, plan in schedule.items() for k, v in plan.items()}
        collator = RoundCollator({n: TaskCollator() for n in names})
        args = default_training_args(Path(work) / "task", epochs=settings.epochs, **task_common)
        training["task"] = _run_stage(suite, dataset, args, collator, settings.optimizer_state)
        for name, run in runs.items():
            if finishing[name] > 0:
                set_seed(settings.seed)
                training[f"finish_{name}"] = _finish_stage(
                    suite,
                    name,
                    run,
                    domain_ids[name],
                    groups.get(name, []),
                    finishing[name],
                    settings,
                    common,
                    Path(work),
                )
    if settings.settle_steps > 0:
        settle_served_balance(
            suite,
            {n: _tagged(r.plan.task_examples, domain_ids[n]) for n, r in runs.items()},
            steps=settings.settle_steps,
            floor=settings.settle_floor,
            resamples=settings.settle_resamples,
            quantile=settings.settle_quantile,
        )
    suite.eval()

    out.mkdir(parents=True, exist_ok=True)
    parts, metrics = {}, {}
    for name, run in runs.items():
        part = export_task_model(models[name], run.plan.config, domain_ids[name])
        parts[name] = part
        metrics[name] = FINISH[name](run, part, out / name, training)
        run.metrics = metrics[name]
    # Each part was saved after its validation pass, so its saved statistics are these.
    routing = _routing_stats(parts)

    summary = {
        "schema_version": SUITE_SCHEMA_VERSION,
        "domains": names,
        "suite_domains": list(SUITE_DOMAINS),
        "expert_groups": {**groups, GENERAL_GROUP: _general(groups, trunk["n_routed_experts"])},
        "trunk": {k: v for k, v in trunk.items()},
        "metrics": metrics,
        "headline_metrics": {n: HEADLINE_METRICS[n] for n in names},
        "routing": {"data": "validation", "layers": routing},
        "training": {
            stage: {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
            for stage, values in training.items()
        },
        "settings": {
            "epochs": settings.epochs,
            "pretrain_epochs": settings.pretrain_epochs,
            "learning_rate": settings.learning_rate,
            "seed": settings.seed,
            "max_steps": settings.max_steps,
            "pretrain_max_steps": settings.pretrain_max_steps,
            "medical_preset": settings.medical_preset,
            "finish_steps": settings.finish_steps,
            "loss_balance": settings.loss_balance,
            "balance_scope": settings.balance_scope,
            "balance_mix": settings.balance_mix,
            "balance_load": settings.balance_load,
            "settle_steps": settings.settle_steps,
            "settle_floor": settings.settle_floor,
            "settle_resamples": settings.settle_resamples,
            "settle_quantile": settings.settle_quantile,
            "optimizer_state": settings.optimizer_state,
            "data_tokens": served,
            "interleave": settings.interleave,
            "batch_sizes": batch_sizes,
        },
        "data_fingerprints": {n: r.predictor.data_fingerprint_ for n, r in runs.items()},
        "data_fingerprint": fingerprint(*[r.predictor.data_fingerprint_ for r in runs.values()]),
        "code_version": code_version(),
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    (out / SUITE_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def trainer_steps(steps: int, n_apps: int, interleave: bool) -> int:
    """The Trainer's step cap for a cap of `steps` batches per app (-1 stays -1: no cap).

    Interleaved, one Trainer step is one app's batch, so every app gets `steps` batches in
    `steps * n_apps` steps; otherwise one step is a batch of every app.
    """
    return steps * n_apps if interleave and steps > 0 else steps


BALANCE_SCOPES = ("all", "group", "within")
BALANCE_MIXES = ("tokens", "batches")
OPTIMIZER_STATES = ("per_app", "shared")


def _check_settings(settings: SuiteSettings) -> None:
    from core.moe import BALANCE_LOAD_SOURCES
    from core.multitask import LOSS_BALANCES

    choices = {
        "balance_scope": BALANCE_SCOPES,
        "balance_mix": BALANCE_MIXES,
        "balance_load": BALANCE_LOAD_SOURCES,
        "optimizer_state": OPTIMIZER_STATES,
        "loss_balance": LOSS_BALANCES,
    }
    for name, allowed in choices.items():
        value = getattr(settings, name)
        if value not in allowed:
            raise InputValidationError(f"suite: {name} must be one of {allowed}, got {value!r}")
    if settings.settle_steps < 0:
        raise InputValidationError(f"suite: settle_steps must be >= 0, got {settings.settle_steps}")
    if settings.settle_resamples < 0 or not 0.0 < settings.settle_quantile < 1.0:
        raise InputValidationError(
            f"suite: settle_resamples must be >= 0 and settle_quantile in (0, 1), got "
            f"{settings.settle_resamples} and {settings.settle_quantile}"
        )
    if settings.settle_floor is not None and not 0.0 < settings.settle_floor < 1.0:
        raise InputValidationError(
            f"suite: settle_floor must be in (0, 1) or None, got {settings.settle_floor}"
        )
    finishing = finish_plan(settings, SUITE_DOMAINS)  # raises on a bad value
    too_many = {app: k for app, k in finishing.items() if 0 < settings.max_steps <= k}
    if too_many:
        raise InputValidationError(
            f"suite: finish_steps {too_many} must be below max_steps ({settings.max_steps}), which includes them"
        )


def parse_finish_steps(text: str) -> int | dict[str, int]:
    """`SuiteSettings.finish_steps` from its command-line form: "32" (every app) or "medical=32" /
    "medical=32,finance=8" (those apps).

    Raises:
        InputValidationError: neither form, an unknown app, an app named twice, or a negative count.
    """
    text = text.strip()
    try:
        if "=" not in text:
            value: int | dict[str, int] = int(text)
        else:
            pairs = [part.split("=") for part in text.split(",")]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(text)
            value = {app.strip(): int(steps) for app, steps in pairs}
    except ValueError:
        raise InputValidationError(
            f"suite: finish steps must be a count (every app) or APP=COUNT[,APP=COUNT], got {text!r}"
        ) from None
    if isinstance(value, dict) and len(value) != len(pairs):
        raise InputValidationError(f"suite: finish steps {text!r} name an app twice")
    finish_plan(SuiteSettings(finish_steps=value), SUITE_DOMAINS)
    return value


def finish_plan(settings: SuiteSettings, names: Sequence[str]) -> dict[str, int]:
    """Finishing steps of each of `names` (`SuiteSettings.finish_steps`: an int for every app, or per app).

    Raises:
        InputValidationError: a count that is not a non-negative int, or an app outside `SUITE_DOMAINS`.
    """
    steps = settings.finish_steps
    per_app = dict(steps) if isinstance(steps, Mapping) else dict.fromkeys(SUITE_DOMAINS, steps)
    unknown = sorted(set(per_app) - set(SUITE_DOMAINS))
    if unknown:
        raise InputValidationError(
            f"suite: finish_steps names unknown apps {unknown}; known: {list(SUITE_DOMAINS)}"
        )
    for app, count in per_app.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InputValidationError(f"suite: finish_steps of {app} must be an int >= 0, got {count!r}")
    return {name: per_app.get(name, 0) for name in names}


def finish_schedule(
    settings: SuiteSettings, epoch_batches: Mapping[str, int], finishing: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Each app's task batches: {"joint": in the joint stage, "finish": alone after it}, budget-neutral.

    An app's budget is `settings.max_steps` when set, else what the joint stage gives it by epochs
    (`ceil(epochs * epoch_batches[app])`, every app alike when interleaved or joint); its finishing steps
    are taken out of it.

    Raises:
        InputValidationError: an app whose finishing steps leave it no joint batch.
    """
    schedule = {}
    for name, finish in finishing.items():
        budget = (
            settings.max_steps if settings.max_steps > 0 else math.ceil(settings.epochs * epoch_batches[name])
        )
        if finish >= budget:
            raise InputValidationError(
                f"suite: finish_steps of {name} ({finish}) must be below its task batches ({budget}: "
                "max_steps, or the epochs' batches), which include them"
            )
        schedule[name] = {"joint": budget - finish, "finish": finish}
    return schedule


def _set_balance_scope(suite: Any, scope: str, groups: Mapping[str, list[int]], n_routed: int) -> None:
    from core.moe import DomainMoE

    general = _general(groups, n_routed)
    balance_groups = None if scope == "all" else [*groups.values(), general]
    # Within groups only, nothing else keeps an app on its own group: a target at an even spread of its tokens
    # over the experts it may use (its group and the general one).
    targets = {
        SUITE_DOMAINS.index(name): (list(experts), len(experts) / (len(experts) + len(general)))
        for name, experts in groups.items()
    }
    for module in suite.modules():
        if isinstance(module, DomainMoE):
            module.set_balance_groups(balance_groups, with_global=scope != "within")
            module.set_balance_targets(targets if scope == "within" else None)


def data_tokens(examples: Sequence[Mapping[str, Any]], config: Any) -> int:
    """Routed tokens of encoded examples: every field token, plus the CT patch tokens of a present volume."""
    from core.data import example_length

    total = 0
    for example in examples:
        total += example_length(example)
        if example.get("volume_present", False) and example.get("volume") is not None:
            shape = np.asarray(example["volume"]).shape[1:]  # (D, H, W) of a (C, D, H, W) volume
            total += int(
                np.prod([size // patch for size, patch in zip(shape, config.volume_patch_size, strict=True)])
            )
    return total


def _set_balance_mix(suite: Any, weights: list[float]) -> None:
    from core.moe import DomainMoE

    for module in suite.modules():
        if isinstance(module, DomainMoE):
            module.set_balance_mix(weights)


def _run_stage(suite: Any, dataset: Any, args: Any, collator: Any, optimizer_state: str) -> dict[str, float]:
    """One Trainer run of the suite (`core.train.run_stage`), with `TaskAdamW` when the state is per app."""
    from core.train import run_stage

    if optimizer_state == "shared":
        return run_stage(suite, dataset, args, collator)
    from transformers import Trainer

    from core.moe import MoEBalanceCallback
    from core.multitask import TaskAdamW

    adam = {
        "multitask": suite,  # not "model": the Trainer takes that key out of the optimizer's arguments
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    trainer = Trainer(
        model=suite,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[MoEBalanceCallback()],
        optimizer_cls_and_kwargs=(TaskAdamW, adam),
    )
    return dict(trainer.train().metrics)


def _set_balance_every(suite: Any, calls: int) -> None:
    from core.moe import DomainMoE

    for module in suite.modules():
        if isinstance(module, DomainMoE):
            module.set_balance_every(calls)


def _finish_stage(
    suite: Any,
    name: str,
    run: AppRun,
    domain_id: int,
    experts: list[int],
    steps: int,
    settings: SuiteSettings,
    common: Mapping[str, Any],
    work: Path,
) -> dict[str, float]:
    """`steps` task steps of one app alone, on its private parameters and expert group (its own Trainer run:
    warmup and cosine decay from the peak learning rate over these steps).

    The joint steps fit the shared trunk to every app at once; this lets the app's embedders, head and
    own experts adapt to the trunk they ended with, without moving anything another app's part uses.
    """
    from core.multitask import RoundCollator, RoundRobinDataset
    from core.train import TaskCollator, default_training_args

    # Another shuffle than the joint stage's first batches (which this app's batches started with).
    seed = settings.seed + 1 + domain_id
    dataset = RoundRobinDataset(
        {name: _tagged(run.plan.task_examples, domain_id)},
        {name: run.batch_size},
        seed=seed,
        transforms={name: transform} if (transform := run.training_transform()) is not None else None,
    )
    common = {**common, "max_steps": steps}
    args = default_training_args(work / f"finish-{name}", epochs=settings.epochs, **common)
    with suite.finishing(name, experts):
        collator = RoundCollator({name: TaskCollator()})
        return _run_stage(suite, dataset, args, collator, settings.optimizer_state)


def _general(groups: Mapping[str, list[int]], n_routed_experts: int) -> list[int]:
    grouped = {e for experts in groups.values() for e in experts}
    return [e for e in range(n_routed_experts) if e not in grouped]


def read_suite(model_dir: str | Path) -> dict[str, Any]:
    """The `suite.json` of a suite directory.

    Raises:
        InputValidationError: the folder has no suite.json (names it and how to make one).
    """
    path = Path(model_dir) / SUITE_FILE
    if not path.is_file():
        raise InputValidationError(
            f"{model_dir}: not a suite model directory ({SUITE_FILE} missing); train one with "
            "`verticals suite train --finance DATA --medical DATA --education DATA --out DIR`"
        )
    return json.loads(path.read_text())

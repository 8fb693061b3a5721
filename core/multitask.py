"""Joint training of several CoreModels over one shared trunk: tying, a round-robin dataset and its collator.

Each task keeps its own `CoreModel` (its own config: embedders, heads, causal or bidirectional attention),
while the trunk (every layer's norms, attention projections and output gate, the DomainMoE blocks with
their router, experts and balancing state, and the final norm) is one set of modules shared by all of
them. A training step (`MultiTaskModel.forward`) runs one batch per task through its own model and adds
the losses (plain or balanced, see `LOSS_BALANCES`), so one optimizer step and one aux-free balance update
see every task; no batch mixes tasks, since their embedders differ. With `RoundRobinDataset(interleave=True)`
a step holds one task's batch instead (the tasks take turns), so each task's gradient is clipped on its own,
and with `TaskAdamW` (AdamW moments per task) also Adam-scaled on its own, as in a single-task run. `MultiTaskModel.finishing` trains one task's private
parameters (and its expert group) alone, leaving everything the other tasks use unchanged.
`settle_served_balance` settles the trained trunk's selection biases on the routing the tasks' examples get
when served (eval mode).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from core.config import CoreConfig
from core.data import collate
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel, CoreOutput
from core.moe import BALANCE_LOAD_SOURCES, DomainMoE, captured_router_logits, serving_load_pass

__all__ = [
    "LOSS_BALANCES",
    "TRUNK_FIELDS",
    "MultiTaskModel",
    "RoundCollator",
    "RoundRobinDataset",
    "TaskAdamW",
    "settle_served_balance",
    "tie_trunk",
    "trunk_parameters",
]

LOSS_BALANCES = ("sum", "relative")
"""How `MultiTaskModel.forward` adds the task losses.

- "sum": the plain sum. A task whose loss is small by nature (a rare-positive BCE such as fraud, ~0.1 against
  a 6-class cross-entropy's ~1) then has small gradients, and the shared trunk, whose Adam step is
  normalised by the summed gradient, follows the other tasks.
- "relative": task i's loss is weighted by `mean_j L_j / L_i` (both detached), so every task's gradient is
  that of `mean_j L_j * log L_i`: each task moves the trunk by its relative, not absolute, loss change. The
  weights sum to the number of tasks, and with one task the loss is unchanged.
"""

TRUNK_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "ffn_size",
    "layer_norm_eps",
    "position_encoding",
    "rope_theta",
    "output_gate",
    "use_moe",
    "n_routed_experts",
    "n_shared_experts",
    "moe_top_k",
    "domains",
    "balance",
    "bias_update_rate",
    "router_domain_prior",
    "domain_expert_groups",
    "domain_group_prior",
)
"""CoreConfig fields that every task sharing a trunk must agree on."""

_ATTENTION_SHARED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")


def check_trunk_configs(configs: Mapping[str, CoreConfig]) -> None:
    """Raise `ConfigError` naming the first trunk field on which two task configs disagree."""
    names = list(configs)
    reference = configs[names[0]]
    for name in names[1:]:
        for field in TRUNK_FIELDS:
            ours, theirs = getattr(reference, field, None), getattr(configs[name], field, None)
            if ours != theirs:
                raise ConfigError(
                    f"shared trunk: task {name!r} has {field}={theirs!r} but task {names[0]!r} has {ours!r}; "
                    "every task of one trunk needs the same trunk fields"
                )


def tie_trunk(models: Mapping[str, CoreModel]) -> None:
    """Make every model use the trunk modules of the first one (in place).

    Shared: per layer the two RMS norms, the attention projections, output gate and `gating_factor`, and the
    feed-forward block (DomainMoE or dense); the final norm. Each model keeps its own embedders, heads,
    dropout modules and attention settings (causality, block sizes), which hold no weights.

    Raises:
        ConfigError: fewer than one model, or configs that disagree on a `TRUNK_FIELDS` field.
    """
    if not models:
        raise ConfigError("tie_trunk: expected at least one model")
    check_trunk_configs({name: model.config for name, model in models.items()})
    reference, *others = list(models.values())
    for model in others:
        for ours, theirs in zip(reference.layers, model.layers, strict=True):
            theirs.attention_norm = ours.attention_norm
            theirs.ffn_norm = ours.ffn_norm
            theirs.ffn = ours.ffn
            for name in _ATTENTION_SHARED:
                setattr(theirs.attention, name, getattr(ours.attention, name))
            theirs.attention.gating_factor = ours.attention.gating_factor
        model.final_norm = reference.final_norm


def trunk_parameters(model: CoreModel) -> list[nn.Parameter]:
    """The parameters of `model` that `tie_trunk` shares: per layer the norms, attention projections, output
    gate, `gating_factor` and feed-forward block, and the final norm (each parameter once)."""
    modules: list[nn.Module] = [model.final_norm]
    params: list[nn.Parameter] = []
    for layer in model.layers:
        modules += [layer.attention_norm, layer.ffn_norm, layer.ffn]
        modules += [m for m in (getattr(layer.attention, n) for n in _ATTENTION_SHARED) if m is not None]
        params.append(layer.attention.gating_factor)
    return _unique([q for m in modules for q in m.parameters()] + params)


def _unique(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class MultiTaskModel(nn.Module):
    """Several CoreModels over one shared trunk, trained together by `transformers.Trainer`.

    Args:
        models: task name -> its CoreModel; the trunks are tied here (see `tie_trunk`).
        loss_balance: how the task losses are added, one of `LOSS_BALANCES`.
        balance_load: the load the aux-free balancing evens out (`core.moe.BALANCE_LOAD_SOURCES`): "train"
            (the training passes) or "serving" (each training batch is also run once as served, eval mode
            and no gradient, and only that pass is counted; it costs a forward pass per batch).

    Raises:
        ConfigError: configs that disagree on the trunk, an unknown `loss_balance` or `balance_load`.

    Attributes:
        tasks: the per-task models (`nn.ModuleDict`); parameters shared between them appear once in
            `parameters()`, so the optimizer updates each once.
    """

    def __init__(
        self, models: Mapping[str, CoreModel], loss_balance: str = "sum", balance_load: str = "train"
    ) -> None:
        super().__init__()
        tie_trunk(models)
        if loss_balance not in LOSS_BALANCES:
            raise ConfigError(
                f"MultiTaskModel: loss_balance must be one of {LOSS_BALANCES}, got {loss_balance!r}"
            )
        if balance_load not in BALANCE_LOAD_SOURCES:
            raise ConfigError(
                f"MultiTaskModel: balance_load must be one of {BALANCE_LOAD_SOURCES}, got {balance_load!r}"
            )
        self.tasks = nn.ModuleDict(dict(models))
        self.loss_balance = loss_balance
        self.balance_load = balance_load
        for module in self.modules():
            if isinstance(module, DomainMoE):
                module.set_balance_load_source(balance_load)
        #: The tasks of the last forward pass (the step being trained), read by `TaskAdamW`.
        self.step_tasks: tuple[str, ...] = ()

    def forward(self, task_batches: Mapping[str, Mapping[str, Any]]) -> CoreOutput:
        """Run each task's batch through its model; the loss adds the task losses (see `LOSS_BALANCES`).

        Args:
            task_batches: task name -> the keyword arguments of `CoreModel.forward` (a collated `Batch`).

        Returns:
            `CoreOutput` with `loss` (the balanced task losses plus the router balancing losses) and
            `aux_loss` (summed router balancing losses, if any).

        Raises:
            InputValidationError: an unknown task, or a task batch without a loss (no targets).
        """
        losses, aux = [], []
        self.step_tasks = tuple(task_batches)
        for name, batch in task_batches.items():
            if name not in self.tasks:
                raise InputValidationError(
                    f"MultiTaskModel: unknown task {name!r}; known: {list(self.tasks)}"
                )
            if self.training and self.balance_load == "serving":
                with serving_load_pass(self.tasks[name]):
                    self.tasks[name](**batch)  # counted in the aux-free load; its outputs are not used
            out = self.tasks[name](**batch)
            if out.loss is None:
                raise InputValidationError(f"MultiTaskModel: the batch of task {name!r} produced no loss")
            if out.aux_loss is not None:
                aux.append(out.aux_loss)
                losses.append(out.loss - out.aux_loss)  # the balancing loss is added once, unweighted
            else:
                losses.append(out.loss)
        if not losses:
            raise InputValidationError("MultiTaskModel: no task batch given")
        task_losses = torch.stack(losses)  # (n_tasks,)
        if self.loss_balance == "relative":
            detached = task_losses.detach()
            # Floor: a task that reached ~0 loss must not get an unbounded weight.
            weights = detached.mean() / torch.maximum(detached, 1e-3 * detached.mean() + 1e-12)
            task_losses = task_losses * weights
        loss = task_losses.sum()
        aux_loss = torch.stack(aux).sum() if aux else None
        return CoreOutput(loss=loss if aux_loss is None else loss + aux_loss, aux_loss=aux_loss)

    def private_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters of `task` outside the shared trunk: its embedders and heads.

        Raises:
            InputValidationError: an unknown task.
        """
        model = self._task(task)
        trunk = {id(p) for p in trunk_parameters(model)}
        return [p for p in model.parameters() if id(p) not in trunk]

    def expert_parameters(self, task: str, experts: Sequence[int]) -> list[nn.Parameter]:
        """The parameters of the routed experts `experts` in every MoE layer of `task`'s trunk.

        Raises:
            InputValidationError: an unknown task, or an expert id outside a layer's experts.
        """
        params = []
        for index, moe in enumerate(self._task(task).moe_layers()):
            for expert in experts:
                if not 0 <= expert < moe.num_experts:
                    raise InputValidationError(
                        f"MultiTaskModel: expert {expert} outside [0, {moe.num_experts}) in MoE layer {index}"
                    )
                params.extend(moe.experts[expert].parameters())
        return params

    @contextmanager
    def finishing(self, task: str, experts: Sequence[int] = ()) -> Iterator[list[nn.Parameter]]:
        """Within the block only `task`'s private parameters and the routed `experts` are trainable.

        Everything else (attention, norms, router and domain prior, shared and other routed experts, the
        other tasks' embedders and heads) has `requires_grad=False`. Aux-free balancing goes on among
        `experts` only (from this task's loads, which are the only loads then), so the selection bias of
        every other expert, which the other tasks' routing reads, stays as it is. On exit every parameter's
        `requires_grad` and every MoE layer's balance groups are restored.

        Args:
            task: the task to finish.
            experts: routed expert ids (in every MoE layer) trained with it, e.g. its domain's expert group.

        Yields:
            The trainable parameters.

        Raises:
            InputValidationError: an unknown task, or an expert id outside a layer's experts.
        """
        trainable = self.private_parameters(task) + self.expert_parameters(task, experts)
        chosen = {id(p) for p in trainable}
        saved = {id(p): p.requires_grad for p in self.parameters()}
        moe_layers = [m for m in self.modules() if isinstance(m, DomainMoE)]
        balance_groups = [(m.balance_groups, m.balance_global, m.balance_every) for m in moe_layers]
        try:
            for p in self.parameters():
                p.requires_grad_(id(p) in chosen)
            for moe in moe_layers:
                moe.set_balance_groups([list(experts)], with_global=False)
                moe.set_balance_every(1)
            yield trainable
        finally:
            for p in self.parameters():
                p.requires_grad_(saved[id(p)])
            for moe, (groups, with_global, every) in zip(moe_layers, balance_groups, strict=True):
                moe.balance_groups, moe.balance_global = groups, with_global
                moe.set_balance_every(every)

    def _task(self, task: str) -> CoreModel:
        if task not in self.tasks:
            raise InputValidationError(f"MultiTaskModel: unknown task {task!r}; known: {list(self.tasks)}")
        return self.tasks[task]


@torch.no_grad()
def settle_served_balance(
    multitask: MultiTaskModel,
    task_examples: Mapping[str, Sequence[Mapping[str, Any]]],
    steps: int = 300,
    batch_size: int = 64,
    floor: float | None = None,
    resamples: int = 0,
    quantile: float = 0.05,
) -> int:
    """Settle every MoE layer's selection bias on the routing the model serves (`DomainMoE.settle_bias`).

    Layer by layer (a layer's routing changes the next layer's input): every task's examples run through its
    model in eval mode (as served: no dropout), the layer's router logits of their real tokens are kept, and
    the layer's bias takes `steps` aux-free updates on the load of all of them, with the balance groups,
    targets and domain mix set on the layer. Nothing but the selection biases changes (the routing
    statistics neither); the training mode of every module is restored.

    Args:
        multitask: the trained model.
        task_examples: task name -> encoded examples (with the domain ids they are served with), e.g. the
            training examples.
        steps: updates per layer.
        batch_size: examples per forward pass.
        floor: None (the full balance rule) or a share: only lift the experts below it of their balance
            group's load (`DomainMoE.settle_bias`).
        resamples: with a floor, bootstrap resamples of the examples (each task's within the task) on which
            the floor must hold but for a `quantile` of them (`DomainMoE.settle_bias`); 0: these examples.
        quantile: see `resamples`.

    Returns:
        The number of MoE layers settled.

    Raises:
        InputValidationError: an unknown task or no examples.
    """
    if not task_examples or not any(task_examples.values()):
        raise InputValidationError("settle_served_balance: no examples")
    names = list(task_examples)
    models = {name: multitask._task(name) for name in names}
    layers = models[names[0]].moe_layers()  # the same modules in every task's model (one trunk)
    sizes = [len(task_examples[name]) for name in names]
    first = {name: sum(sizes[:i]) for i, name in enumerate(names)}  # each task's first example's index
    modes = [(module, module.training) for module in multitask.modules()]
    tracking = [(moe, moe.track_routing) for moe in layers]
    multitask.eval()
    try:
        for moe in layers:
            moe.track_routing = False
        for moe in layers:
            offsets = []  # the index of each batch's first example among all the tasks' examples
            with captured_router_logits(moe, rows=True) as captured:
                for name in names:
                    model, examples = models[name], list(task_examples[name])
                    for start in range(0, len(examples), batch_size):
                        batch = collate(examples[start : start + batch_size]).to(model.device)
                        offsets.append(first[name] + start)
                        model(**batch.to_dict())
            logits = torch.cat([c[0] for c in captured])  # (N, E)
            ids = None if any(c[1] is None for c in captured) else torch.cat([c[1] for c in captured])  # (N,)
            example_ids = torch.cat(
                [c[2] + offset for c, offset in zip(captured, offsets, strict=True)]
            )  # (N,)
            moe.settle_bias(
                logits,
                ids,
                steps=steps,
                floor=floor,
                example_ids=example_ids,
                resamples=resamples,
                quantile=quantile,
            )
    finally:
        for moe, track in tracking:
            moe.track_routing = track
        for module, training in modes:
            module.training = training
    return len(layers)


class TaskAdamW(torch.optim.Optimizer):
    """AdamW whose moment estimates are kept per task, so the tasks taking turns never share them.

    One AdamW over a shared trunk trained by tasks in turn (`RoundRobinDataset(interleave=True)`) mixes the
    tasks in its state: the first moment carries the last ~1 / (1 - beta1) steps of every task into each
    task's update, and the second moment scales each task's step by the RMS gradient of all the tasks, so a
    task whose trunk gradients are smaller than the others' moves the trunk less than it would alone. Here
    every parameter keeps one (step, exp_avg, exp_avg_sq) per task of the step (`MultiTaskModel.step_tasks`):
    each task's update of the trunk is the one AdamW makes from that task's gradients alone, with its own
    bias correction; a parameter only one task trains has one state, and the update is AdamW's
    (`torch.optim.AdamW`, decoupled weight decay; parameters without a gradient are left as they are). A
    step of several tasks at once (joint rounds) keeps one state for that set of tasks: plain AdamW.

    Args:
        params: parameters or parameter groups, as for `torch.optim.AdamW`.
        multitask: the `MultiTaskModel` trained; its `step_tasks` names the state each step uses.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW`.

    Raises:
        ConfigError: a step before any forward pass of `multitask` (no task to key the state by).
    """

    def __init__(
        self,
        params: Any,
        multitask: MultiTaskModel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.multitask = multitask

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One AdamW update of every parameter with a gradient, from the state of the step's tasks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = "+".join(self.multitask.step_tasks)
        if not key:
            raise ConfigError("TaskAdamW.step: the model has run no forward pass (no task to update for)")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param].setdefault(
                    key,
                    {
                        "step": 0,
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    },
                )
                state["step"] += 1
                grad = param.grad
                param.mul_(1.0 - lr * decay)
                state["exp_avg"].lerp_(grad, 1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                correction1 = 1.0 - beta1 ** state["step"]
                correction2 = 1.0 - beta2 ** state["step"]
                denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(correction2)).add_(eps)
                param.addcdiv_(state["exp_avg"], denominator, value=-lr / correction1)
        return loss


class RoundRobinDataset(Dataset):
    """Rounds of one batch per task: item i is {task: examples of its i-th batch}.

    Each task's examples are shuffled and cut into batches of its own size; an epoch has as many rounds as
    the task with the most batches, and the smaller tasks start over (reshuffled) when they run out. Use it
    with `per_device_train_batch_size=1` and `RoundCollator`.

    With `interleave=True` every round is spread over as many items as there are tasks, one task each
    (item i is task `i % n_tasks`'s batch of round `i // n_tasks`): one optimizer step per task batch
    instead of one per round, so every task's batch gets its own step, clipped and scaled on its own, as
    in a single-task run of the same number of batches; the shared trunk gets n_tasks times the steps.

    With `caps` (task name -> its number of batches), the dataset is one fixed schedule instead of epochs:
    `max(caps)` rounds, and a task with fewer batches than that is left out of some rounds, spread evenly
    (task t is in round r when `ceil((r + 1) * cap_t / R) > ceil(r * cap_t / R)`: in the first round), so every
    task's k-th batch sits at about the same fraction `k / cap_t` of the schedule, and a task at the
    largest cap is in every round, with the batches it would get in epoch 0 without caps. Run it for
    `len(dataset)` steps (one epoch). E.g. a task trained `K` further steps alone afterwards gets `K` fewer
    batches here, while the others' batches and their place in the learning-rate schedule stay as they were.

    Args:
        task_examples: task name -> encoded examples (see `core.data`).
        batch_sizes: task name -> examples per batch.
        seed: seeds the shuffles (and `set_epoch` reshuffles reproducibly).
        interleave: one task per item instead of one batch of every task.
        transforms: task name -> applied to each of that task's examples when read (training-time
            augmentation, as `core.train.ExampleDataset`'s `transform`).
        caps: task name -> its batches in the whole schedule (every task, each >= 1), or None (epochs).

    Raises:
        InputValidationError: no tasks, a task without examples, a missing / non-positive batch size, or
            caps that do not give every task a positive integer.
    """

    def __init__(
        self,
        task_examples: Mapping[str, Sequence[Mapping[str, Any]]],
        batch_sizes: Mapping[str, int],
        seed: int = 0,
        interleave: bool = False,
        transforms: Mapping[str, Callable[[Mapping[str, Any]], Mapping[str, Any]]] | None = None,
        caps: Mapping[str, int] | None = None,
    ) -> None:
        if not task_examples:
            raise InputValidationError("RoundRobinDataset: no tasks")
        if caps is not None:
            bad = {
                name: caps.get(name)
                for name in task_examples
                if not isinstance(caps.get(name), int) or isinstance(caps.get(name), bool) or caps[name] < 1
            }
            extra = sorted(set(caps) - set(task_examples))
            if bad or extra:
                raise InputValidationError(
                    f"RoundRobinDataset: caps need a positive integer for every task and no other names; "
                    f"got {dict(caps)} for tasks {list(task_examples)}"
                )
        for name, examples in task_examples.items():
            if not examples:
                raise InputValidationError(f"RoundRobinDataset: task {name!r} has no examples")
            size = batch_sizes.get(name)
            if not isinstance(size, int) or size < 1:
                raise InputValidationError(
                    f"RoundRobinDataset: task {name!r} needs a positive batch size, got {size!r}"
                )
        self.task_examples = {name: list(examples) for name, examples in task_examples.items()}
        self.batch_sizes = dict(batch_sizes)
        self.seed = seed
        self.interleave = interleave
        self.transforms = dict(transforms or {})
        self.caps = None if caps is None else {name: int(caps[name]) for name in self.task_examples}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the batches of every task (called by the Trainer's data loader at each epoch)."""
        self._epoch = epoch
        self._shuffles: dict[int, dict[str, list[list[int]]]] = {}
        self._cycles: dict[tuple[int, str, int], list[list[int]]] = {}
        self._batches = self._epoch_batches(epoch)
        # Rounds of an epoch without caps: the batches of the task with the most.
        self._epoch_rounds = max(len(b) for b in self._batches.values())
        if self.caps is None:
            self._rounds = self._epoch_rounds
            self._schedule = None
        else:
            self._rounds = max(self.caps.values())
            self._schedule = capped_schedule(self.caps, self.interleave)

    def task_batch_counts(self) -> dict[str, int]:
        """Batches of every task in one pass over the dataset (an epoch, or the capped schedule)."""
        if self._schedule is None:
            return {name: self._rounds for name in self._batches}
        counts = dict.fromkeys(self._batches, 0)
        for item in self._schedule:
            for name, _ in item:
                counts[name] += 1
        return counts

    def _epoch_batches(self, epoch: int) -> dict[str, list[list[int]]]:
        """Every task's batches of its first pass in `epoch` (one seeded shuffle per epoch)."""
        if epoch not in self._shuffles:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            batches = {}
            for name, examples in self.task_examples.items():
                order = list(range(len(examples)))
                rng.shuffle(order)
                batches[name] = self._cut(name, order)
            self._shuffles[epoch] = batches
        return self._shuffles[epoch]

    def _cut(self, name: str, order: list[int]) -> list[list[int]]:
        size = self.batch_sizes[name]
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _task_batches(self, name: str, cycle: int, epoch: int) -> list[list[int]]:
        """The batches of `name`'s `cycle`-th pass over its examples in `epoch` (each pass reshuffled)."""
        if cycle == 0:
            return self._epoch_batches(epoch)[name]
        if (epoch, name, cycle) not in self._cycles:
            order = list(range(len(self.task_examples[name])))
            random.Random(f"{self.seed}/{epoch}/{name}/{cycle}").shuffle(order)
            self._cycles[(epoch, name, cycle)] = self._cut(name, order)
        return self._cycles[(epoch, name, cycle)]

    def _batch(self, name: str, number: int) -> list[int]:
        """Example indices of `name`'s batch `number` of this epoch, or with caps of the schedule: the batch
        that number would be without caps (epoch `number // rounds`, with the later epochs' reshuffles), so
        a task in every round gets exactly the batches of an uncapped run."""
        epoch = self._epoch
        if self._schedule is not None:
            epochs_per_pass = -(-self._rounds // self._epoch_rounds)
            epoch = self._epoch * epochs_per_pass + number // self._epoch_rounds
            number %= self._epoch_rounds
        passes = len(self._epoch_batches(epoch)[name])
        return self._task_batches(name, number // passes, epoch)[number % passes]

    def __len__(self) -> int:
        if self._schedule is not None:
            return len(self._schedule)
        return self._rounds * len(self._batches) if self.interleave else self._rounds

    def __getitem__(self, index: int) -> dict[str, list[Mapping[str, Any]]]:
        if self._schedule is not None:
            draws = self._schedule[index]  # (task, its batch number)
        else:
            names = list(self._batches)
            if self.interleave:
                names, index = [names[index % len(names)]], index // len(names)
            draws = [(name, index) for name in names]
        item = {}
        for name, number in draws:
            chosen = self._batch(name, number)
            examples = [self.task_examples[name][i] for i in chosen]
            transform = self.transforms.get(name)
            item[name] = examples if transform is None else [transform(e) for e in examples]
        return item


def capped_schedule(caps: Mapping[str, int], interleave: bool) -> list[list[tuple[str, int]]]:
    """The items of a capped `RoundRobinDataset`: per item, (task, the task's batch number) pairs.

    `R = max(caps)` rounds; task t is in round r when `ceil((r + 1) * cap_t / R) > ceil(r * cap_t / R)`
    (its batches spread evenly over the rounds, every round for a task at the largest cap), and its k-th
    appearance draws its batch k. Interleaved, each round is one item per task in it, in the order of
    `caps`; else one item per round.
    """
    rounds = max(caps.values())
    drawn = dict.fromkeys(caps, 0)
    items: list[list[tuple[str, int]]] = []
    for r in range(rounds):
        present = [name for name, cap in caps.items() if -(-(r + 1) * cap // rounds) > -(-r * cap // rounds)]
        draws = []
        for name in present:
            draws.append((name, drawn[name]))
            drawn[name] += 1
        items.extend([[draw] for draw in draws] if interleave else [draws])
    return items


class RoundCollator:
    """Collates one round of `RoundRobinDataset` with a collator per task (e.g. `TaskCollator`).

    Args:
        collators: task name -> a callable mapping a list of examples to `CoreModel.forward` kwargs.
    """

    def __init__(
        self, collators: Mapping[str, Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]]
    ) -> None:
        self.collators = dict(collators)

    def __call__(self, rounds: Sequence[Mapping[str, Sequence[Mapping[str, Any]]]]) -> dict[str, Any]:
        if len(rounds) != 1:
            raise ConfigError(
                f"RoundCollator: expected one round per step (per_device_train_batch_size=1), got {len(rounds)}"
            )
        (item,) = rounds
        return {"task_batches": {name: self.collators[name](examples) for name, examples in item.items()}}


def export_task_model(model: CoreModel, config: CoreConfig, domain_id: int) -> CoreModel:
    """A standalone copy of one task's model whose every domain behaves as domain `domain_id` of `model`.

    The task's own inputs carry their own domain ids (channels, modalities, clusters: `config.domains`);
    in the shared trunk all of its tokens carried `domain_id`. Copying that row of the domain embedding and
    of every layer's router prior into each of `config.domains` gives a model that computes exactly what
    `model` computes with `domain_id`, from the task's unchanged inputs. Routing statistics start at zero.

    Args:
        model: the task's model inside a `MultiTaskModel` (trunk domains).
        config: the same architecture with the task's own domains (and no expert groups).
        domain_id: the task's row in `model.config.domains`.

    Returns:
        The new model in eval mode, on `model`'s device.

    Raises:
        ConfigError: `domain_id` outside the trunk's domains, or a config whose tensors differ from `model`'s
            anywhere but in the number of domains.
    """
    if not 0 <= domain_id < model.config.num_domains:
        raise ConfigError(
            f"export_task_model: domain_id {domain_id} outside [0, {model.config.num_domains}) "
            f"(domains {model.config.domains})"
        )
    exported = CoreModel(config).to(model.device)
    target = exported.state_dict()
    state = {}
    for key, value in model.state_dict().items():
        if key not in target:
            raise ConfigError(
                f"export_task_model: {key!r} of the trained model is missing in the export config"
            )
        if key == "field_embedder.domain.weight" or key.endswith("ffn.domain_prior.weight"):
            value = value[domain_id].unsqueeze(0).expand_as(target[key])  # (D_task, ...) copies of one row
        elif key.endswith("domain_expert_counts") or key.endswith("domain_expert_mass"):
            value = torch.zeros_like(target[key])
        if value.shape != target[key].shape:
            raise ConfigError(
                f"export_task_model: {key!r} has shape {tuple(value.shape)} in the trained model and "
                f"{tuple(target[key].shape)} in the export config"
            )
        state[key] = value.detach().clone()
    exported.load_state_dict(state, strict=True)
    return exported.eval()

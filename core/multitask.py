"""Joint training of several CoreModels over one shared trunk: tying, a round-robin dataset and its collator.

Each task keeps its own `CoreModel` (its own config: embedders, heads, causal or bidirectional attention),
while the trunk (every layer's norms, attention projections and output gate, the DomainMoE blocks with
their router, experts and balancing state, and the final norm) is one set of modules shared by all of
them. A training step (`MultiTaskModel.forward`) runs one batch per task through its own model and sums
the losses, so one optimizer step and one aux-free balance update see every task; no batch mixes tasks,
since their embedders differ.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from core.config import CoreConfig
from core.errors import ConfigError, InputValidationError
from core.model import CoreModel, CoreOutput

__all__ = ["TRUNK_FIELDS", "MultiTaskModel", "RoundCollator", "RoundRobinDataset", "tie_trunk"]

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


class MultiTaskModel(nn.Module):
    """Several CoreModels over one shared trunk, trained together by `transformers.Trainer`.

    Args:
        models: task name -> its CoreModel; the trunks are tied here (see `tie_trunk`).

    Attributes:
        tasks: the per-task models (`nn.ModuleDict`); parameters shared between them appear once in
            `parameters()`, so the optimizer updates each once.
    """

    def __init__(self, models: Mapping[str, CoreModel]) -> None:
        super().__init__()
        tie_trunk(models)
        self.tasks = nn.ModuleDict(dict(models))

    def forward(self, task_batches: Mapping[str, Mapping[str, Any]]) -> CoreOutput:
        """Run each task's batch through its model; the loss is the sum of the task losses.

        Args:
            task_batches: task name -> the keyword arguments of `CoreModel.forward` (a collated `Batch`).

        Returns:
            `CoreOutput` with `loss` (the sum) and `aux_loss` (summed router balancing losses, if any).

        Raises:
            InputValidationError: an unknown task, or a task batch without a loss (no targets).
        """
        losses, aux = [], []
        for name, batch in task_batches.items():
            if name not in self.tasks:
                raise InputValidationError(
                    f"MultiTaskModel: unknown task {name!r}; known: {list(self.tasks)}"
                )
            out = self.tasks[name](**batch)
            if out.loss is None:
                raise InputValidationError(f"MultiTaskModel: the batch of task {name!r} produced no loss")
            losses.append(out.loss)
            if out.aux_loss is not None:
                aux.append(out.aux_loss)
        if not losses:
            raise InputValidationError("MultiTaskModel: no task batch given")
        return CoreOutput(loss=torch.stack(losses).sum(), aux_loss=torch.stack(aux).sum() if aux else None)


class RoundRobinDataset(Dataset):
    """Rounds of one batch per task: item i is {task: examples of its i-th batch}.

    Each task's examples are shuffled and cut into batches of its own size; an epoch has as many rounds as
    the task with the most batches, and the smaller tasks start over (reshuffled) when they run out. Use it
    with `per_device_train_batch_size=1` and `RoundCollator`.

    Args:
        task_examples: task name -> encoded examples (see `core.data`).
        batch_sizes: task name -> examples per batch.
        seed: seeds the shuffles (and `set_epoch` reshuffles reproducibly).

    Raises:
        InputValidationError: no tasks, a task without examples, or a missing / non-positive batch size.
    """

    def __init__(
        self,
        task_examples: Mapping[str, Sequence[Mapping[str, Any]]],
        batch_sizes: Mapping[str, int],
        seed: int = 0,
    ) -> None:
        if not task_examples:
            raise InputValidationError("RoundRobinDataset: no tasks")
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
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the batches of every task (called by the Trainer's data loader at each epoch)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = {}
        for name, examples in self.task_examples.items():
            order = list(range(len(examples)))
            rng.shuffle(order)
            size = self.batch_sizes[name]
            batches[name] = [order[i : i + size] for i in range(0, len(order), size)]
        self._batches = batches
        self._rounds = max(len(b) for b in batches.values())

    def __len__(self) -> int:
        return self._rounds

    def __getitem__(self, index: int) -> dict[str, list[Mapping[str, Any]]]:
        item = {}
        for name, batches in self._batches.items():
            chosen = batches[index % len(batches)]
            item[name] = [self.task_examples[name][i] for i in chosen]
        return item


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

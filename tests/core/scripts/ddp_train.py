"""Two-stage training under torchrun (run by tests/core/test_distributed.py): prints rank, losses, expert bias."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from core.config import CoreConfig
from core.model import CoreModel
from core.train import ExampleDataset, default_training_args, fit_two_stage


def main(output_dir: str) -> None:
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(64):
        length = int(rng.integers(4, 16))
        tokens = rng.integers(2, 20, length)
        examples.append({"categorical": {"token": tokens}, "labels": int(7 in tokens)})
    config = CoreConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=16,
        block_size=4,
        dense_below=0,
        dense_tail_layers=0,
        n_routed_experts=4,
        categorical_fields={"token": 20},
        num_labels=2,
        causal=True,
        classifier_pooling="last",
        bias_update_rate=0.01,
    )
    torch.manual_seed(0)
    model = CoreModel(config)
    dataset = ExampleDataset(examples)
    args = {"max_steps": 4, "batch_size": 8, "disable_tqdm": True, "use_cpu": True}
    metrics = fit_two_stage(
        model,
        dataset,
        output_dir,
        pretrain_dataset=dataset,
        pretrain_args=default_training_args(f"{output_dir}/p", **args),
        task_args=default_training_args(f"{output_dir}/t", **args),
    )
    bias = model.moe_layers()[0].expert_bias.tolist()
    record = {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "pretrain_loss": metrics["pretrain"]["train_loss"],
        "task_loss": metrics["task"]["train_loss"],
        "expert_bias": bias,
    }
    print("RESULT " + json.dumps(record), flush=True)
    # Left to interpreter shutdown, gloo's threads can be torn down mid-run ("terminate called without an
    # active exception", SIGABRT): end the process group first, once every rank is done.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

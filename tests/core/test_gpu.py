"""GPU paths (FlexAttention backend, bf16 training); skipped where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

from core.attention import DynamicAttention
from core.config import CoreConfig
from core.model import CoreModel
from core.train import ExampleDataset, default_training_args, fit_two_stage

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("causal", [False, True])
def test_flex_backend_matches_gather_backend_forward_and_backward(causal: bool) -> None:
    config = CoreConfig(
        hidden_size=128,
        num_heads=2,
        block_size=128,
        top_k_blocks=1,
        dense_below=0,
        dense_below_gpu=0,
        dense_tail_layers=0,
        causal=causal,
        num_layers=1,
    )
    flex = DynamicAttention(CoreConfig(**{**config.to_dict(), "attention_backend": "flex"})).cuda()
    gather = DynamicAttention(CoreConfig(**{**config.to_dict(), "attention_backend": "gather"})).cuda()
    gather.load_state_dict(flex.state_dict())
    hidden = torch.randn(2, 1024, 128, device="cuda", requires_grad=True)
    out_flex, _ = flex(hidden)
    out_gather, _ = gather(hidden)
    torch.testing.assert_close(out_flex, out_gather, atol=2e-3, rtol=2e-3)  # TF32 inside the fused kernel
    (g_flex,) = torch.autograd.grad(out_flex.sum(), hidden)
    (g_gather,) = torch.autograd.grad(out_gather.sum(), hidden)
    torch.testing.assert_close(g_flex, g_gather, atol=2e-3, rtol=2e-3)


def test_two_stage_training_runs_in_bf16_on_gpu(tmp_path) -> None:
    config = CoreConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        ffn_size=32,
        block_size=128,
        dense_below_gpu=256,
        n_routed_experts=4,
        categorical_fields={"token": 50},
        num_labels=2,
        causal=True,
        classifier_pooling="last",
    )
    generator = torch.Generator().manual_seed(0)
    examples = [
        {"categorical": {"token": torch.randint(2, 50, (512,), generator=generator).numpy()}, "labels": i % 2}
        for i in range(16)
    ]
    model = CoreModel(config)
    args = default_training_args(tmp_path, max_steps=2, batch_size=4, disable_tqdm=True)
    assert args.bf16
    metrics = fit_two_stage(
        model,
        ExampleDataset(examples),
        tmp_path,
        pretrain_dataset=ExampleDataset(examples),
        pretrain_args=default_training_args(tmp_path / "p", max_steps=2, batch_size=4, disable_tqdm=True),
        task_args=args,
    )
    assert metrics["task"]["train_loss"] > 0
    assert next(model.parameters()).is_cuda


def test_moe_grouped_gemm_dispatch_on_cuda_bf16_matches_the_loop() -> None:
    from core.moe import DomainMoE

    config = CoreConfig(hidden_size=128, ffn_size=64, num_heads=2, n_routed_experts=16, domains=("a", "b"))
    moe = DomainMoE(config).cuda()
    hidden = torch.randn(4, 256, 128, device="cuda")
    mask = torch.ones(4, 256, dtype=torch.bool, device="cuda")
    mask[1, 100:] = False
    outputs = {}
    for mode in ("loop", "grouped"):
        moe.dispatch = mode
        moe.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = moe(hidden, None, mask)
        out.float().pow(2).mean().backward()
        outputs[mode] = (out.float(), moe.experts[0].w1.weight.grad.float().clone())
    torch.testing.assert_close(outputs["grouped"][0], outputs["loop"][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(outputs["grouped"][1], outputs["loop"][1], atol=3e-2, rtol=5e-2)

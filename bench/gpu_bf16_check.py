"""Per-step losses of a tiny causal CoreModel in bf16 on CUDA, per attention backend (a NaN hunt).

python bench/gpu_bf16_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import CoreConfig
from core.data import collate
from core.model import CoreModel


def main() -> None:
    for backend in ("gather", "flex"):
        for dense_below in (256, 10**9):
            config = CoreConfig(
                hidden_size=64,
                num_layers=2,
                num_heads=2,
                ffn_size=32,
                block_size=128,
                dense_below_gpu=dense_below,
                n_routed_experts=4,
                categorical_fields={"token": 50},
                num_labels=2,
                causal=True,
                classifier_pooling="last",
                attention_backend=backend,
            )
            torch.manual_seed(0)
            model = CoreModel(config).cuda()
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
            g = torch.Generator().manual_seed(0)
            examples = [
                {"categorical": {"token": torch.randint(2, 50, (512,), generator=g).numpy()}, "labels": i % 2}
                for i in range(4)
            ]
            batch = {
                k: (v.cuda() if torch.is_tensor(v) else {n: t.cuda() for n, t in v.items()})
                for k, v in collate(examples).to_dict().items()
            }
            losses = []
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(**batch)
                losses.append(float(out.loss))
                out.loss.backward()
                grad_ok = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
                optimizer.step()
                optimizer.zero_grad()
            print(f"backend={backend} dense_below_gpu={dense_below} losses={losses} grads_finite={grad_ok}")


if __name__ == "__main__":
    main()

"""How learnable the generator's CT findings are: a plain 3-D CNN reads the lesion pattern from the CT alone.

Not one of the issue's figures: a diagnostic of the semi-synthetic data. The diagnoser's image-only model
stays near chance on a few hundred cases; this probe tells whether that is the data (lesions a few voxels
wide among vessels and anatomy that vary as much) or the model. It generates cases in memory
(`apps.medical.synthetic.make_case`), resamples each CT to the `small` preset's grid (32 x 64 x 64, window
channels), and trains a small CNN (three stages of two 3x3x3 convolutions with GroupNorm, global max
pooling) to predict the *pattern* (none, solid nodule, spiculated mass, ground glass, cavity, miliary) for
several training-set sizes, reporting macro one-vs-rest AUROC and lesion-vs-none AUROC on held-out cases.

Usage:
    python bench/medical_ct_probe.py --device cuda --cases 3000 --sizes 400,1200,2400 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.medical.config import grid_for  # noqa: E402
from apps.medical.imaging import stack_windows  # noqa: E402
from apps.medical.synthetic import PATTERNS, make_case  # noqa: E402

SEED = 7


def _case(index: int, windows: tuple[str, ...]) -> tuple[np.ndarray, int]:
    torch.set_num_threads(1)
    grid = grid_for("small")
    case = make_case(index, SEED)
    hu = torch.as_tensor(case.hu)[None, None]
    resampled = F.interpolate(hu, size=grid.shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return stack_windows(resampled, windows).astype(np.float16), PATTERNS.index(case.pattern)


def _cnn(width: int, channels: int) -> nn.Sequential:
    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv3d(cin, cout, 3, padding=1),
            nn.GroupNorm(4, cout),
            nn.GELU(),
            nn.Conv3d(cout, cout, 3, padding=1),
            nn.GroupNorm(4, cout),
            nn.GELU(),
        ]

    return nn.Sequential(
        *stage(channels, width),
        nn.MaxPool3d((1, 2, 2)),
        *stage(width, 2 * width),
        nn.MaxPool3d(2),
        *stage(2 * width, 4 * width),
        nn.AdaptiveMaxPool3d(1),
        nn.Flatten(),
        nn.Linear(4 * width, len(PATTERNS)),
    )


def _scores(model: nn.Module, volumes: torch.Tensor, device: str) -> np.ndarray:
    model.eval()
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
        return (
            torch.cat(
                [model(volumes[k : k + 50].float()).float().softmax(-1) for k in range(0, len(volumes), 50)]
            )
            .cpu()
            .numpy()
        )


def probe(volumes: torch.Tensor, patterns: torch.Tensor, n_train: int, n_test: int, args) -> dict:
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    device = args.device
    train_x, train_y = volumes[:n_train].to(device), patterns[:n_train].to(device)
    test_x, test_y = volumes[-n_test:].to(device), patterns[-n_test:].numpy()
    model = _cnn(args.width, train_x.shape[1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((n_train + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n_train, device=device)
        for first in range(0, n_train, args.batch_size):
            index = order[first : first + args.batch_size]
            batch = train_x[index].float()
            if torch.rand(1).item() < 0.5:
                batch = batch.flip(-1)  # left-right
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
                loss = F.cross_entropy(model(batch), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            scores = _scores(model, test_x, device)
            per_pattern = {
                PATTERNS[k]: float(roc_auc_score(test_y == k, scores[:, k]))
                for k in range(len(PATTERNS))
                if 0 < (test_y == k).sum() < len(test_y)
            }
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss.item(),
                    "macro_auroc": float(np.mean(list(per_pattern.values()))),
                    "lesion_vs_none_auroc": float(roc_auc_score(test_y != 0, 1.0 - scores[:, 0])),
                    "per_pattern": per_pattern,
                }
            )
            print(f"train {n_train}: epoch {epoch + 1} {json.dumps(history[-1])}", flush=True)
    return {"train_cases": n_train, "seconds": time.perf_counter() - start, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000, help="cases generated (the last --test held out)")
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--sizes", default="400,1200,2400", help="training-set sizes, comma-separated")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument(
        "--windows",
        default=",".join(grid_for("small").windows),
        help="input channels: window presets and derived channels (default: the small grid's)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) + args.test > args.cases:
        parser.error(f"--cases {args.cases} is fewer than the largest size {max(sizes)} + --test {args.test}")
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        windows = tuple(args.windows.split(","))
        rows = list(pool.map(partial(_case, windows=windows), range(args.cases), chunksize=16))
    print(f"generated {args.cases} cases in {time.perf_counter() - start:.0f}s", flush=True)
    volumes = torch.tensor(np.stack([r[0] for r in rows]))
    patterns = torch.tensor([r[1] for r in rows])
    runs = [probe(volumes, patterns, size, args.test, args) for size in sizes]
    report = {
        "device": args.device,
        "cases": args.cases,
        "test_cases": args.test,
        "epochs": args.epochs,
        "windows": args.windows.split(","),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "medical_ct_probe.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| training cases | macro AUROC (pattern) | lesion vs none AUROC | best epoch's macro | seconds |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        last, best = run["history"][-1], max(h["macro_auroc"] for h in run["history"])
        lines.append(
            f"| {run['train_cases']} | {last['macro_auroc']:.3f} | {last['lesion_vs_none_auroc']:.3f} | "
            f"{best:.3f} | {run['seconds']:.0f} |"
        )
    (args.out / "medical_ct_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

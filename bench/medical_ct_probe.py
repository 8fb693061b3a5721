"""How learnable the generator's CT findings are: a plain 3-D CNN reads the lesion pattern from the CT alone.

Not one of the issue's figures: a diagnostic of the semi-synthetic data. The diagnoser's image-only model
stays near chance on a few hundred cases; this probe tells whether that is the data (lesions a few voxels
wide among vessels and anatomy that vary as much) or the model. It generates cases in memory
(`apps.medical.synthetic.make_case`), resamples each CT to the `small` preset's grid (32 x 64 x 64, window
channels), and trains a small CNN (three stages of two 3x3x3 convolutions with GroupNorm, global max
pooling) to predict the *pattern* (none, solid nodule, spiculated mass, ground glass, cavity, miliary) for
several training-set sizes, reporting macro one-vs-rest AUROC and lesion-vs-none AUROC on held-out cases.

With ``--target diagnosis`` it predicts the diagnosis instead (what the Diagnoser's stage 0 learns from),
``--pool maxmean`` pools as stage 0 does, ``--seeds`` repeats each size with other initialisations (whether
a run leaves the plateau varies with them).

Usage:
    python bench/medical_ct_probe.py --device cuda --cases 3000 --sizes 400,1200,2400 --epochs 30
    python bench/medical_ct_probe.py --device cuda --cases 1800 --sizes 1200 --target diagnosis --seeds 0,1,2
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
from apps.medical.synthetic import LABELS, PATTERNS, make_case  # noqa: E402

SEED = 7


def _case(index: int, windows: tuple[str, ...]) -> tuple[np.ndarray, int, int]:
    torch.set_num_threads(1)
    grid = grid_for("small")
    case = make_case(index, SEED)
    hu = torch.as_tensor(case.hu)[None, None]
    resampled = F.interpolate(hu, size=grid.shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    volume = stack_windows(resampled, windows).astype(np.float16)
    return volume, PATTERNS.index(case.pattern), LABELS.index(case.label)


class _MaxMean(nn.Module):
    """Global max and mean of each channel, concatenated (the Diagnoser's stage-0 pooling)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)
        return torch.cat([flat.amax(-1), flat.mean(-1)], dim=-1)


def _cnn(width: int, channels: int, classes: int, pool: str = "max") -> nn.Sequential:
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
        *([nn.AdaptiveMaxPool3d(1), nn.Flatten()] if pool == "max" else [_MaxMean()]),
        nn.Linear(4 * width * (1 if pool == "max" else 2), classes),
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


def probe(
    volumes: torch.Tensor,
    targets: torch.Tensor,
    patterns: torch.Tensor,
    n_train: int,
    n_test: int,
    args,
    seed=0,
) -> dict:
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    device = args.device
    names = PATTERNS if args.target == "pattern" else LABELS
    train_x, train_y = volumes[:n_train].to(device), targets[:n_train].to(device)
    test_x, test_y = volumes[-n_test:].to(device), targets[-n_test:].numpy()
    test_pattern = patterns[-n_test:].numpy()
    model = _cnn(args.width, train_x.shape[1], len(names), args.pool).to(device)
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
            per_class = {
                names[k]: float(roc_auc_score(test_y == k, scores[:, k]))
                for k in range(len(names))
                if 0 < (test_y == k).sum() < len(test_y)
            }
            # Class 0 is "none" (pattern) or "normal" (diagnosis): both mean no lesion.
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss.item(),
                    "macro_auroc": float(np.mean(list(per_class.values()))),
                    "lesion_vs_none_auroc": float(roc_auc_score(test_pattern != 0, 1.0 - scores[:, 0])),
                    "per_class": per_class,
                }
            )
            print(f"train {n_train} seed {seed}: epoch {epoch + 1} {json.dumps(history[-1])}", flush=True)
    return {"train_cases": n_train, "seed": seed, "seconds": time.perf_counter() - start, "history": history}


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
    parser.add_argument(
        "--target", choices=("pattern", "diagnosis"), default="pattern", help="what the CNN predicts"
    )
    parser.add_argument("--pool", choices=("max", "maxmean"), default="max", help="global pooling")
    parser.add_argument("--seeds", default="0", help="initialisation seeds, comma-separated (one run each)")
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
    patterns, labels = torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])
    targets = patterns if args.target == "pattern" else labels
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [
        probe(volumes, targets, patterns, size, args.test, args, seed) for size in sizes for seed in seeds
    ]
    report = {
        "device": args.device,
        "cases": args.cases,
        "test_cases": args.test,
        "epochs": args.epochs,
        "lr": args.lr,
        "target": args.target,
        "pool": args.pool,
        "windows": args.windows.split(","),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "medical_ct_probe.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Target {args.target}, pool {args.pool}, lr {args.lr}, {args.epochs} epochs, {args.test} held-out cases.",
        "",
        "| training cases | seed | macro AUROC | lesion vs none AUROC | best epoch's macro | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        last, best = run["history"][-1], max(h["macro_auroc"] for h in run["history"])
        lines.append(
            f"| {run['train_cases']} | {run['seed']} | {last['macro_auroc']:.3f} | {last['lesion_vs_none_auroc']:.3f} | "
            f"{best:.3f} | {run['seconds']:.0f} |"
        )
    (args.out / "medical_ct_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

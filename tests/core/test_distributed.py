"""Two-stage training under torchrun with two CPU processes (gloo): DDP runs and MoE balance stays in sync."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_train_and_share_the_balance_bias(tmp_path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(SCRIPT),
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    # Two processes share stdout, so their lines may interleave: find each record on its own.
    results = [json.loads(match) for match in re.findall(r"RESULT (\{[^{}]*\})", done.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["pretrain_loss"] > 0 and r["task_loss"] > 0 for r in results)
    # update_balance() sums expert loads across ranks, so every rank moves its bias identically.
    assert results[0]["expert_bias"] == results[1]["expert_bias"]
    assert any(b != 0 for b in results[0]["expert_bias"])

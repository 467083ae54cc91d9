"""Multi-process training: a 2-process gloo run equals a single process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from numclip_cli.checkpoint import read_checkpoint
from numclip_cli.distributed import EpochOrder, World
from numclip_cli.synthetic import write_dataset
from numclip_cli.trainer import last_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rank_shares_of_a_batch_form_the_single_process_batch() -> None:
    single = list(EpochOrder(48, seed=5, world=World()))
    ranks = [list(EpochOrder(48, seed=5, world=World(rank=r, size=3))) for r in range(3)]
    per_rank = 4
    for j in range(48 // (per_rank * 3)):
        union = {i for shard in ranks for i in shard[j * per_rank:(j + 1) * per_rank]}
        assert union == set(single[j * per_rank * 3:(j + 1) * per_rank * 3])
    assert sorted(i for shard in ranks for i in shard) == list(range(48))


@pytest.mark.slow
def test_two_process_gloo_training_matches_one_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset("fill", data, n=64, seed=1)
    common = ["--data", str(data), "--model", "numclip-tiny", "--pretrained", "none", "--offline", "--device", "cpu",
              "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--image-lr", "1e-3", "--tune-context",
              "--workers", "0", "--seed", "3", "--val-split", "0.25", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "numclip_cli", "train", *common,
                          "--out", str(tmp_path / "ddp.safetensors")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = subprocess.run([str(Path(sys.executable).parent / "numclip"), "train", *common,
                             "--out", str(tmp_path / "one.safetensors")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a = read_checkpoint(last_path(tmp_path / "ddp.safetensors")).tensors
    b = read_checkpoint(last_path(tmp_path / "one.safetensors")).tensors
    assert a.keys() == b.keys()
    # 48 training images = 3 global batches of 16 per epoch; only the summation order differs (float32)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    assert ddp.stdout.count("best epoch") == 1  # only rank 0 reports

"""Multi-process training: a 2-process gloo run equals a single process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ddp_and_single_process_runs

from numclip_cli.distributed import EpochOrder, World


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
    a, b, stdout = ddp_and_single_process_runs(tmp_path, "cpu")
    # 48 training images = 3 global batches of 16 per epoch; only the summation order differs (float32)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    assert stdout.count("best epoch") == 1  # only rank 0 reports

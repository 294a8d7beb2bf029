"""nanprobe.watch under torchrun with FSDP: two gloo ranks on the CPU, a fault on rank 1 only.

Both FSDP2 (fully_shard) and FSDP1 (FullyShardedDataParallel) run on the CPU with gloo; each is run
once per module. The failing rank's dump must hold the full state (gathered from the shards) and
replay on one process with no process group.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES, assert_rank_1_dump_replays_alone, assert_rank_1_went_first, torchrun_ranks

FAULT_STEP = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


@pytest.fixture(scope="module", params=["fsdp2", "fsdp1"])
def ranks(request, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp(request.param)
    return out, torchrun_ranks(FIXTURES / "fsdp_watch_train.py", out, str(FAULT_STEP), request.param)


def test_both_ranks_stop_at_the_faulty_step_and_name_rank_1(ranks):
    _, results = ranks
    assert_rank_1_went_first(results, FAULT_STEP, "reduce-scatter")


def test_only_rank_1_dumps_the_full_state_from_before_the_step(ranks):
    out, results = ranks
    dumps = out / "dumps"
    assert results[0]["dump"] is None and not (dumps / "rank-0").exists()
    folder = Path(results[1]["dump"])
    assert folder == dumps / "rank-1" / f"step-{FAULT_STEP:06d}"
    (report,) = dumps.glob("report-step-*.txt")
    assert "on rank 1 of 2" in report.read_text()
    assert results[1]["replayed"] and "Replayed under the probe: fp16 (amp): nan" in results[1]["message"]

    sys.path.insert(0, str(FIXTURES))
    try:
        from tiny_models import TinyCritic
    finally:
        sys.path.remove(str(FIXTURES))
    shapes = {k: tuple(v.shape) for k, v in TinyCritic().state_dict().items()}
    critic = torch.load(folder / "checkpoint.pt")["critic"]
    assert {k: tuple(v.shape) for k, v in critic.items()} == shapes  # whole, not one rank's shard
    # From before the step: the weights after it are NaN on both ranks.
    assert all(bool(torch.isfinite(v).all()) for v in critic.values())
    opt = torch.load(folder / "optimizer.pt")
    assert opt["param_groups"][0]["params"] == [0, 1, 2, 3]
    by_index = [shapes[k] for k in shapes]
    assert [tuple(opt["state"][i]["exp_avg"].shape) for i in range(4)] == by_index
    assert {float(opt["state"][i]["step"]) for i in range(4)} == {float(FAULT_STEP)}
    assert all(math.isfinite(float(s["exp_avg_sq"].max())) for s in opt["state"].values())


def test_the_failing_rank_step_replays_on_one_process(ranks, monkeypatch):
    out, results = ranks
    assert_rank_1_dump_replays_alone(results, out, monkeypatch)

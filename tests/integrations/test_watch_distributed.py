"""nanprobe.watch under torchrun: two gloo ranks on the CPU, a fault on rank 1 only, caught by both at one step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES, assert_rank_1_dump_replays_alone, assert_rank_1_went_first, torchrun_ranks

FAULT_STEP = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun_ranks(FIXTURES / "ddp_watch_train.py", out, str(FAULT_STEP))


def test_both_ranks_stop_at_the_faulty_step_and_name_rank_1(ranks):
    _, results = ranks
    assert_rank_1_went_first(results, FAULT_STEP, "all-reduce")


def test_only_the_failing_rank_dumps_and_rank_0_writes_the_report(ranks):
    out, results = ranks
    dumps = out / "dumps"
    assert results[0]["dump"] is None and not (dumps / "rank-0").exists()
    assert Path(results[1]["dump"]) == dumps / "rank-1" / f"step-{FAULT_STEP:06d}"
    (report,) = dumps.glob("report-step-*.txt")
    text = report.read_text()
    assert "on rank 1 of 2" in text and f"rank 1: {dumps / 'rank-1'}" in text
    assert results[1]["replayed"] and "Replayed under the probe: fp16 (amp): nan" in results[1]["message"]


def test_the_failing_rank_step_replays_on_one_process(ranks, monkeypatch):
    out, results = ranks
    assert_rank_1_dump_replays_alone(results, out, monkeypatch)

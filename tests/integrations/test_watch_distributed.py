"""nanprobe.watch under torchrun: two gloo ranks on the CPU, a fault on rank 1 only, caught by both at one step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanprobe.cli import app
from tests.conftest import FIXTURES, torchrun_ranks

FAULT_STEP = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun_ranks(FIXTURES / "ddp_watch_train.py", out, str(FAULT_STEP))


def test_both_ranks_stop_at_the_faulty_step_and_name_rank_1(ranks):
    out, results = ranks
    assert [results[r]["step"] for r in (0, 1)] == [FAULT_STEP, FAULT_STEP]
    assert [results[r]["ranks"] for r in (0, 1)] == [[1], [1]]
    # Rank 1 went non-finite by its own forward; rank 0 only through the gradient all-reduce.
    assert results[1]["reason"].startswith("critic output, loss")
    assert results[0]["reason"] == "gradients, weights non-finite"
    culprit = results[1]["culprit"]
    assert (culprit["phase"], culprit["module"], culprit["op"], culprit["kind"]) == (
        "forward", "critic.net.0", "aten._to_copy.default", "overflow")
    assert results[0]["culprit"] is None  # a follower has no culprit of its own
    for r in (0, 1):
        assert f"step {FAULT_STEP} turned non-finite on rank 1 of 2 (critic output" in results[r]["message"]
        assert "rank 0 followed through the gradient all-reduce" in results[r]["message"]
    assert "critic.net.0 (forward)" in results[0]["message"]  # rank 0 names rank 1's op from the collective


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
    monkeypatch.chdir(out)
    result = CliRunner().invoke(app, ["diagnose", str(Path(results[1]["dump"]) / "config.yaml"), "--json", "-", "-q"])
    assert result.exit_code == 1, result.output
    runs = {r["precision"]: r for r in json.loads(result.stdout)["runs"]}
    assert runs["fp32"]["status"] == "ok"
    issue = runs["fp16"]["first_issue"]
    assert (runs["fp16"]["status"], issue["kind"], issue["phase"], issue["module"]) == (
        "nan", "overflow", "forward", "critic.net.0")

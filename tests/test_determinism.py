"""The same config and seed give the same report: byte-identical JSON, and the same verdicts on 1 and 2 threads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nanprobe

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "wgan_gp_fp16_underflow.yaml"


@pytest.fixture(scope="module")
def first():
    return nanprobe.diagnose(EXAMPLE, dtypes=["fp16"])


def _verdicts(report):
    out = []
    for run in report.runs:
        f = run.first_issue
        out.append((run.precision, run.status, f and (f.kind, f.op, f.module, f.phase, f.step, f.source),
                    tuple(fix.id for fix in run.fixes)))
    return out


def test_same_json_across_runs(first):
    again = nanprobe.diagnose(EXAMPLE, dtypes=["fp16"])
    assert again.to_json() == first.to_json()


def test_same_verdicts_on_one_and_two_threads(first):
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    torch.set_num_threads(other)
    try:
        report = nanprobe.diagnose(EXAMPLE, dtypes=["fp16"])
    finally:
        torch.set_num_threads(threads)
    assert _verdicts(report) == _verdicts(first)
    assert _verdicts(first)[0][1].value == "nan"  # the example still shows its failure


def test_same_json_with_a_data_file():
    # The replayed samples' check is part of the report: a wall time in it made every JSON differ.
    config = EXAMPLE.parent / "corrupt_data.yaml"
    a, b = (nanprobe.diagnose(config, dtypes=["fp16"], steps=1) for _ in range(2))
    assert a.data is not None and not a.data.ok
    assert a.to_json() == b.to_json()

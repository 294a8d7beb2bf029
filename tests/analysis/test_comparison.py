"""compare-precisions: the alignment, the errors, the tables, the range view, the JSON and the recommendation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

import nanprobe
from nanprobe.analysis import alignment, diagnosis, fixes
from nanprobe.analysis.alignment import compare_samples, zeroed_share
from nanprobe.analysis.comparison import Recorder, flushed_share, relative_error
from nanprobe.engine.probe import OpProbe
from nanprobe.enums import Phase, Precision
from nanprobe.formats.compare import comparison as render_comparison
from tests.conftest import small_gan_doc


@pytest.fixture(scope="module")
def gan_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compare") / "gan.yaml"
    path.write_text(yaml.safe_dump(small_gan_doc()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gan(gan_config):
    return nanprobe.compare_precisions(gan_config)


def by_precision(c) -> dict:
    return {s.precision.value: s for s in c.summaries}


# -- the error measures

def test_relative_error_is_normwise_and_flushes_count_fully():
    ref = torch.tensor([1e-3, -2e-3, 3.0, 4.0])
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(torch.zeros(4), ref) == pytest.approx(1.0)
    assert relative_error(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-3)
    assert relative_error(torch.tensor([1e-3, -2e-3, math.nan, 4.0]), ref) == math.inf
    assert relative_error(torch.ones(4), torch.zeros(4)) is None  # no scale to be relative to
    # Positions where fp32 itself is not finite are left out.
    assert relative_error(torch.tensor([5.0, 3.0]), torch.tensor([math.inf, 3.0])) == 0.0


def test_flushed_share_counts_zeros_below_the_smallest_normal_only():
    tiny = torch.finfo(torch.float16).smallest_normal
    ref = torch.tensor([1e-9, 1e-6, 0.5, 0.0])
    low = torch.tensor([0.0, 0.0, 0.0, 0.0])
    # 1e-9 and 1e-6 are below fp16's smallest normal and became 0: flushed; 0.5 -> 0 is not a range loss.
    assert flushed_share(low, ref, tiny) == pytest.approx(0.5)


def test_batched_sample_comparison_gives_each_pair_s_own_numbers_bit_for_bit(monkeypatch):
    # The alignment stacks samples of one length; a stacked row must reduce exactly as the row alone,
    # or the JSON of a replay would depend on which other ops shared its batch.
    g = torch.Generator().manual_seed(0)
    fp16_tiny, fp32_tiny = torch.finfo(torch.float16).smallest_normal, torch.finfo(torch.float32).smallest_normal
    items = []
    for n in (4096, 4096, 4096, 37, 37, 1):
        ref = torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, 3, (1,), generator=g).item()
        low = ref.half().float()
        items.append((low, ref, fp16_tiny))
    items.append((torch.zeros(4096), torch.zeros(4096), fp16_tiny))            # fp32 all zero: no scale
    items.append((torch.full((37,), math.nan), torch.ones(37), fp16_tiny))      # the low run went NaN
    with_inf = torch.randn(4096, generator=g)
    with_inf[7] = math.inf
    items.append((with_inf.half().float(), with_inf, fp32_tiny))               # fp32 not finite: left out
    got = compare_samples(items)
    want = [(relative_error(x, y), zeroed_share(x, y), flushed_share(x, y, tiny)) for x, y, tiny in items]
    assert got == want
    assert got[-3][0] is None and got[-2][0] == math.inf and got[-1][0] is not None and got[0][2] > 0
    monkeypatch.setattr(alignment, "_BATCH", 2)  # a large model's samples go in several batches
    assert compare_samples(items) == want


# -- the alignment

def _probe(critic, x, dtype=None):
    rec = Recorder()
    with OpProbe({"critic": critic}, on_record=rec.on_record) as probe:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            critic(x).sum().backward()
    return probe.events, rec


def test_autocast_casts_do_not_shift_the_comparison(tiny):
    torch.manual_seed(0)
    critic = tiny.TinyCritic(ch=4)
    x = torch.randn(2, 3, 8, 8)
    ref_events, ref_rec = _probe(critic, x)
    low_events, low_rec = _probe(critic, x, torch.float16)

    def convs(events):
        return [e for e in events if e.op == "aten.convolution.default"]

    casts = [e for e in low_events if e.op == "aten._to_copy.default" and e.phase is Phase.FORWARD]
    assert casts and not [e for e in ref_events if e.op == "aten._to_copy.default" and e.phase is Phase.FORWARD]
    # The casts push fp16's second convolution to a later index than fp32's: raw indices would mispair it.
    assert convs(low_events)[1].index != convs(ref_events)[1].index
    assert ref_events[convs(low_events)[1].index].op != "aten.convolution.default"

    aligned = diagnosis.align(low_events, ref_events)
    for low, ref in zip(convs(low_events), convs(ref_events)):
        assert aligned[low.index] is ref
        assert low.module == ref.module
        assert relative_error(low_rec.samples[low.index], ref_rec.samples[ref.index]) < 1e-2
    assert all(e.index not in aligned for e in casts)


def test_on_record_sees_each_recorded_event_with_its_outputs(tiny):
    seen = []
    critic = tiny.TinyCritic(ch=4)
    with OpProbe({"critic": critic}, on_record=lambda e, outs: seen.append((e.index, tuple(outs[0].shape)))) as probe:
        critic(torch.randn(2, 3, 8, 8))
    assert [i for i, _ in seen] == [e.index for e in probe.events]
    assert [s for _, s in seen] == [e.shape for e in probe.events]


# -- the comparison of a real model

def test_fp16_departs_at_the_penalty_input_gradient_while_bf16_stays_close(gan):
    s = by_precision(gan)
    assert list(s) == ["fp32", "fp16", "bf16"]
    assert (s["fp32"].status.value, s["fp16"].status.value, s["bf16"].status.value) == ("ok", "nan", "ok")
    d = s["fp16"].departs_at
    assert d is not None and d.phase is Phase.INPUT_GRAD and d.module.startswith("critic.net.")
    # The same op diagnose names: where the input gradient first holds zeros that fp32 does not.
    issue = s["fp16"].first_issue
    assert (d.module, d.phase, d.op, d.step) == (issue.module, issue.phase, issue.op, issue.step)
    assert d.flushed > 0
    assert s["bf16"].departs_at is None
    row = next(m for m in gan.modules if (m.module, m.phase) == (d.module, d.phase))
    assert row.span(Precision.FP16).flushed > 0 and row.span(Precision.BF16).flushed == 0
    # Headroom below the smallest normal is negative where fp16 holds subnormals.
    assert row.span(Precision.FP16).headroom_normal < 0 < row.span(Precision.BF16).headroom_normal


def test_summary_numbers(gan):
    s = by_precision(gan)
    assert s["fp32"].loss_rel_error is None and s["fp32"].grad_rel_error is None
    assert s["bf16"].loss_rel_error < 1e-2
    assert s["fp16"].grad_rel_error == math.inf  # its parameter gradients are NaN
    assert s["fp16"].nan_ops >= 1 and s["fp16"].underflow_ops >= 1
    assert s["bf16"].nan_ops == s["bf16"].overflow_ops == s["bf16"].underflow_ops == 0
    assert s["fp16"].headroom_max == 0.0  # the sqrt backward made -inf: no headroom left
    assert s["bf16"].headroom_max > 64
    assert s["fp16"].aligned < s["fp16"].ops  # autocast's casts have no fp32 counterpart
    assert [m.step for m in s["fp16"].metrics] == [0]


def test_modules_are_sorted_by_divergence(gan):
    divs = [m.divergence for m in gan.modules if m.divergence is not None]
    assert divs == sorted(divs, reverse=True)
    top = gan.modules[0]
    # The hand-written sqrt's backward makes inf from finite inputs: the most divergent op.
    assert top.span(Precision.FP16).rel_error == math.inf and top.phase is Phase.BACKWARD


@pytest.mark.parametrize("gp_precision, fix_id, setting", [
    ("autocast", "gp-fp32", "loss.gp_precision: fp32"),
    ("fp32", "grad-scaler", "train.grad_scaler: true"),
])
def test_recommendation_uses_the_catalogues_top_fix_for_fp16(tmp_path, gan, gp_precision, fix_id, setting):
    c = gan
    if gp_precision != "autocast":
        c = nanprobe.compare_precisions(tmp_path_config(tmp_path, small_gan_doc(gp_precision=gp_precision)))
    s = by_precision(c)
    rec = c.recommendation
    assert rec.use is Precision.BF16 and Precision.BF16 in rec.safe and Precision.FP16 not in rec.safe
    assert rec.fp16_fix.id == fix_id == next(f.id for f in s["fp16"].fixes if f.id != "bf16")
    assert fix_id in fixes.REGISTRY
    assert rec.line.startswith("use bf16")
    assert f"to make fp16 safe: {fix_id}" in rec.line and setting in rec.line


def tmp_path_config(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


# -- what the user sees

def test_terminal_output(gan):
    console = Console(record=True, width=100, color_system=None)
    render_comparison(gan, console, top=5)
    text = console.export_text()
    d = by_precision(gan)["fp16"].departs_at
    assert f"fp16 departs from fp32 at {d.module} · input-grad" in text
    assert "bf16 stays close to fp32" in text
    assert "per module: top 5 of" in text
    assert "◀" in text  # the departure row is marked
    for label in ("status", "loss per step", "penalty per step", "grad norm per step", "loss rel. error",
                  "param-grad rel. error", "ops over/underflow/nan", "headroom to max", "headroom to min normal"):
        assert label in text
    lines = text.splitlines()
    fp16_band = next(line for line in lines if line.startswith("fp16 ") and "█" in line)
    assert "▓" in fp16_band and "░" in fp16_band  # normal, subnormal and beyond-range bands
    deep = next(line for line in lines if line.startswith("critic.net.0 input-grad"))
    assert "░" in deep  # the first layer's input gradient sits below fp16's subnormals
    assert "recommendation: use bf16" in text


def test_json_carries_everything(gan):
    d = json.loads(gan.to_json())
    assert list(d)[:6] == ["schema", "config", "device", "torch", "steps", "sample"]
    assert [s["precision"] for s in d["summaries"]] == ["fp32", "fp16", "bf16"]
    fp16 = d["summaries"][1]
    assert fp16["status"] == "nan" and fp16["departs_at"]["phase"] == "input-grad"
    assert fp16["grad_rel_error"] == "inf" and fp16["first_issue"]["kind"] == "underflow"
    for key in ("metrics", "loss_rel_error", "penalty_rel_error", "overflow_ops", "underflow_ops", "nan_ops",
                "headroom_max", "headroom_normal", "ops", "aligned", "fixes"):
        assert key in fp16
    row = d["modules"][0]
    assert {"module", "phase", "values", "order", "divergence", "spans"} <= set(row)
    assert [s["precision"] for s in row["spans"]] == ["fp32", "fp16", "bf16"]
    assert {"rel_error", "added_error", "flushed", "headroom_max", "headroom_normal", "log2_min", "log2_max",
            "nonfinite_ops", "ops"} <= set(row["spans"][0])
    ranges = {r["precision"]: r for r in d["dtype_ranges"]}
    assert (ranges["fp16"]["log2_min_normal"], ranges["fp16"]["log2_min_subnormal"]) == (-14.0, -24.0)
    assert (ranges["bf16"]["log2_min_normal"], ranges["bf16"]["log2_min_subnormal"]) == (-126.0, -133.0)
    assert d["recommendation"]["use"] == "bf16" and d["recommendation"]["fp16_fix"]["id"] == "gp-fp32"
    assert d["settings"]["precision"]["dtypes"] == ["fp16", "bf16"]

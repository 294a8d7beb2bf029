"""Hand-built traces: an fp32 reference and a low-precision replay of the same few ops, as the probe records them.

Each op is given by what the probe would see: its statistics row in both precisions and the ops that
produced its inputs. The analysis then runs exactly as on a real replay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from nanprobe.analysis import diagnosis
from nanprobe.analysis.alignment import Recorder
from nanprobe.engine.probe import OpEvent
from nanprobe.engine.replay import Trace
from nanprobe.enums import Mode, Phase, Precision, Status
from nanprobe.model.report import StepMetrics


def row(n=64, mx=1.0, mn=0.5, zeros=0, sub=0, pinf=0, ninf=0, nan=0) -> list[float]:
    """A statistics row (see nanprobe.stats): numel, max |x|, min non-zero |x|, zeros, subnormals, +inf, -inf, NaN."""
    return [float(n), mx, mn if zeros < n else float("inf"), float(zeros), float(sub), float(pinf), float(ninf),
            float(nan)]


@dataclass
class Op:
    """One op in both replays."""

    op: str
    ref: list
    low: list
    producers: tuple = ()
    phase: Phase = Phase.FORWARD
    module: str = ""
    node: str | None = None
    scalars: tuple = ()
    low_dtype: str = "float16"
    ref_dtype: str = "float32"
    low_only: bool = False  # an op autocast adds (a cast): fp32 does not run it
    source: str | None = "train.py:10"
    param: str | None = None


@dataclass
class Built:
    ref: Trace
    low: Trace
    ref_rec: Recorder = field(default_factory=Recorder)
    low_rec: Recorder = field(default_factory=Recorder)


def build(ops: list[Op], precision=Precision.FP16, mode=Mode.AMP, metrics=None, ref_metrics=None,
          samples: dict | None = None, grads: dict | None = None, ref_grads: dict | None = None) -> Built:
    """Traces for the ops; producers index into `ops`. samples: op position -> (low tensor, fp32 tensor)."""
    low_events, ref_events, low_idx, ref_idx = [], [], {}, {}
    for k, o in enumerate(ops):
        i = len(low_events)
        low_idx[k] = i
        low_events.append(OpEvent(i, 0, 0, o.phase, o.module, o.op, o.source, o.node, o.low_dtype, (int(o.low[0]),),
                                  tuple(low_idx[p] for p in o.producers), o.param, row=list(o.low), scalars=o.scalars))
        if not o.low_only:
            j = len(ref_events)
            ref_idx[k] = j
            ref_events.append(OpEvent(j, 0, 0, o.phase, o.module, o.op, o.source, o.node, o.ref_dtype,
                                      (int(o.ref[0]),), tuple(ref_idx[p] for p in o.producers if p in ref_idx),
                                      o.param, row=list(o.ref), scalars=o.scalars))
    nonfinite = any(o.low[5] + o.low[6] + o.low[7] > 0 for o in ops)
    # A non-finite value that reaches nothing training sees is masked: these traces' losses inherit theirs.
    metrics = metrics or [StepMetrics(0, float("nan") if nonfinite else 1.0, 10.0, float("nan") if nonfinite else 1.0)]
    ref_metrics = ref_metrics or [StepMetrics(0, 1.0, 10.0, 1.0)]
    b = Built(Trace(Precision.FP32, mode, ref_events, list(ref_metrics)),
              Trace(precision, mode, low_events, list(metrics)))
    for k, (x, y) in (samples or {}).items():
        b.low_rec.samples[low_idx[k]] = x
        b.ref_rec.samples[ref_idx[k]] = y
    if grads is not None:
        b.low_rec.grads[0] = grads
        b.ref_rec.grads[0] = ref_grads
    return b


SETTINGS = {"loss_kind": "custom", "gp_fp32": False, "grad_scaler": False, "grad_clip": None, "optimizer": "adam",
            "eps": 1e-8, "lr": 1e-4, "init_ratios": {}, "device": "cuda", "init_checks": (), "fp32_modules": ()}


def diagnose(b: Built, **settings):
    """The RunReport of the low-precision replay, through the same pipeline as nanprobe.diagnose."""
    ref = diagnosis.measure_against(b.ref, b.ref_rec, None)
    low = diagnosis.measure_against(b.low, b.low_rec, ref)
    analyses = diagnosis.analyse_all({Precision.FP32: ref, b.low.precision: low})
    ctx = {"fp32_status": analyses[Precision.FP32].status,
           "statuses": {Precision.FP32: analyses[Precision.FP32].status,
                        b.low.precision: analyses[b.low.precision].status,
                        Precision.BF16: Status.OK},
           "fix_settings": {**SETTINGS, **settings}}
    return diagnosis.build_run(analyses[b.low.precision], ctx)


@pytest.fixture
def synth():
    return SimpleNamespace(row=row, Op=Op, build=build, diagnose=diagnose, torch=torch)

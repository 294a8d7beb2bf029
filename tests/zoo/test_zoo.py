"""The failure-mode zoo: one small scenario per row of the failure-mode catalogue, plus healthy set-ups.

Each scenario is user code in `cases/<name>.py` (models and, where users write their own, the critic
step) with its config `cases/<name>.yaml`, written the way GAN code is written in the wild, not shaped
to nanprobe. `ZOO` below is the single table of what an expert would sign for each one, decided from
the numerical mechanism (what the dtype does to the values under CUDA's autocast lists, the default
`precision.policy: cuda`) and checked by hand against plain PyTorch:

- `status`: the verdict per precision replayed (ok / underflow / overflow / nan / error);
- `kind`, `phase`, `module`, `ops`: the first issue of the run named in `at` (the root cause, not the
  first harmless rounding): `module` is exact, or a prefix when it ends with "." (where the flush
  builds up over several layers of a gradient chain, the layer it crosses the tolerance at is not
  part of the mechanism); `ops` are acceptable short aten names; None leaves a field unchecked;
- `fixes`: at least one of these ids among the first two fixes of that run (None: no fix expected);
- healthy rows (`healthy=True`) must have no finding at `--fail-on underflow`.

Rows the current engine gets wrong are marked `xfail(strict=True)` with what it gets wrong, so that a
fixed row fails until its mark is removed. Data files are written into tmp_path, never into the repo.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import nanprobe
from nanprobe.model.verdict import failing
from tests.conftest import line_of

CASES = Path(__file__).resolve().parent / "cases"
LOW = ("fp16", "bf16")


@dataclass(frozen=True)
class Row:
    """One scenario and the verdict an expert would sign for it."""

    row: str
    """Catalogue row (failure-modes.md), or H1..H6 for the healthy set-ups."""
    case: str
    """cases/<case>.yaml."""
    status: dict
    """precision -> expected status."""
    at: str = "fp16"
    """The run whose first issue and fixes are checked."""
    kind: str | None = None
    """First issue's kind (underflow / overflow / nan); None: not checked."""
    phase: str | None = None
    """First issue's phase."""
    module: str | None = None
    """First issue's module: exact, or a prefix ending in "."; "" is outside any module."""
    ops: tuple = ()
    """Acceptable short aten names of the first issue's op; () leaves it unchecked."""
    fixes: tuple = ()
    """At least one of these among the first two fixes; () means none is expected."""
    healthy: bool = False
    """No finding at all at --fail-on underflow."""
    data: str | None = None
    """Data fixture written into tmp_path and passed as data.path."""
    line: str | None = None
    """Text of the line in cases/<case>.py that the first issue's source must point at; None: not checked."""
    min_step: int = 0
    """The first issue's step is at least this (failures that need steps to build up)."""
    scaler: str | None = None
    """fp16 with a GradScaler: "recovers" (a skipped first step, then fine) or "collapses" (every step skipped)."""
    xfail: str | None = None
    """What the current engine gets wrong (strict xfail), or None."""
    native: dict | None = None
    """Where the CPU's native fp16/bf16 kernels reach another verdict than the GPU-like emulated ones: the
    status per precision they give (docs/concepts.md, "Kernels", says why); None: the same verdict."""


OK3 = {"fp32": "ok", "fp16": "ok", "bf16": "ok"}

ZOO: list[Row] = [
    Row("1", "zero_centred_gp", {"fp32": "nan", "fp16": "nan", "bf16": "nan"}, at="fp32",
        kind="nan", phase="backward", module="", ops=("div",), fixes=("safe-norm",), data="frames",
        line="torch.sqrt(torch.sum(g ** 2"),
    Row("2", "pixelnorm_half", {"fp32": "ok", "fp16": "nan"},
        kind="underflow", phase="forward", module="critic.norm", ops=("add",), fixes=("fp32-module",),
        line="x * torch.rsqrt("),
    Row("3", "gp_fp16_no_scaling", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="underflow", phase="input-grad", module="critic.", ops=("convolution_backward", "leaky_relu_backward"),
        fixes=("gp-fp32", "gp-scaled")),
    Row("4", "gp_scaler_unscaled", {"fp32": "ok", "fp16": "underflow"},
        kind="underflow", phase="input-grad", module="critic.", ops=("convolution_backward", "leaky_relu_backward"),
        fixes=("gp-scaled",)),
    Row("5", "scaler_first_skip", OK3, healthy=True, scaler="recovers"),
    Row("6", "scale_collapse", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="underflow", phase="input-grad", module="critic.", ops=("convolution_backward", "leaky_relu_backward"),
        fixes=("gp-scaled",), scaler="collapses"),
    Row("7", "adam_eps_half", {"fp32": "ok", "fp16": "nan"},
        # v flushes to 0 (addcmul_), but the inf is made where addcdiv_ divides by sqrt(v) + eps == 0:
        # the eps that rounds to 0 in fp16 is what failed, so that op is the cause.
        kind="overflow", phase="optimizer", module="critic.net.2", ops=("addcdiv_",),
        fixes=("adam-eps", "master-weights")),
    Row("8", "lost_updates_bf16", {"fp32": "ok", "bf16": "underflow"}, at="bf16",
        kind="underflow", phase="optimizer", module="critic.0", ops=("addcdiv_",), fixes=("master-weights",)),
    Row("9", "bce_sigmoid", {"fp32": "ok", "fp16": "error", "bf16": "error"},
        phase="forward", module="", ops=("binary_cross_entropy",), fixes=("logits-loss",),
        line="errD_real = criterion(output, label)"),
    Row("10", "log_sigmoid", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="underflow", phase="forward", module="", ops=("sigmoid",), fixes=("logits-loss",),
        line="d_real = torch.sigmoid(D(x))"),
    Row("11", "attention_logits", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="overflow", phase="forward", module="critic.attn", ops=("div",), fixes=("fp32-module",),
        line="attn = torch.softmax("),
    Row("12", "activation_growth", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="overflow", phase="forward", module="critic.blocks.7", ops=("mul",), fixes=("fp32-module",),
        line="F.leaky_relu(self.conv(x), 0.2) * self.gain"),
    Row("13", "critic_drift", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="overflow", phase="forward", module="critic.score", ops=("addmm", "_to_copy"),
        fixes=("fp32-module",)),
    Row("14", "mbstd_half", {"fp32": "ok", "fp16": "nan"},
        kind="underflow", phase="forward", module="critic.mbstd", ops=("add",), fixes=("fp32-module",),
        line="y = (y + 1e-8).sqrt()"),
    Row("15", "normalize_zero_half", {"fp32": "ok", "fp16": "nan"},
        kind="underflow", phase="forward", module="critic", ops=("clamp_min",), fixes=("fp32-module",),
        line="h = F.normalize(self.enc(x), dim=1)",
        data="frames"),
    Row("16", "instancenorm_flat", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="overflow", phase="backward", module="critic.model.3", ops=("pow",), fixes=("fp32-module", "data")),
    Row("17a", "corrupt_data", {"fp32": "nan", "fp16": "nan", "bf16": "nan"}, at="fp32",
        kind="nan", phase="data", module="data", fixes=("data",), data="corrupt"),
    Row("17b", "minmax_constant", {"fp32": "nan", "fp16": "nan", "bf16": "nan"}, at="fp32",
        kind="nan", phase="forward", module="", ops=("div",), fixes=("data",), data="constant",
        line="return 2 * (x - lo) / (hi - lo) - 1"),
    Row("18", "tf_init", {"fp32": "ok", "fp16": "nan", "bf16": "ok"},
        kind="overflow", phase="forward", module="critic.net.", ops=("convolution",), fixes=("init",)),
    Row("19", "high_lr", {"fp32": "ok", "fp16": "overflow", "bf16": "ok"},
        kind="overflow", fixes=("lower-lr",), min_step=1),
    Row("H1", "healthy_gp_fp32_scaler", OK3, healthy=True),
    Row("H2", "healthy_r1_lazy", OK3, healthy=True),
    # The CPU's native fp16 convolution_backward rounds partial results (about twice the error of cuDNN's one
    # rounding of an fp32 sum, tests/engine/test_emulate.py), so the bias gradients are 6.4% off (3.4%
    # emulated). Each is the sum of a real and a fake term that cancel to 1/2-1/3 of their size, which allows
    # that much more rounding: ok with either kernels, as on a GPU.
    Row("H3", "healthy_hinge_sn", OK3, healthy=True),
    Row("H4", "healthy_stylegan", OK3, healthy=True),
    Row("H5", "healthy_bf16", {"fp32": "ok", "bf16": "ok"}, healthy=True),
    Row("H6", "healthy_small_init_scaled", OK3, healthy=True, scaler="recovers"),
    # A conv bias before each InstanceNorm: the norm removes it, so its gradient is rounding noise in every
    # precision (1e-8 in fp32, 1e-4 in fp16); their relative error of ~1e3 must not count as an effect.
    # Native CPU kernels: their convolution_backward roundings put two weight gradients 4.4-4.5% off (3.4% at
    # most emulated) with no cancelling sum to explain it, and subnormals lie on their path.
    Row("H7", "healthy_instancenorm_bias", OK3, healthy=True, native={"fp32": "ok", "fp16": "underflow", "bf16": "ok"}),
    # H7's critic at half the width: fp16 rounding alone puts weight gradients 3.4-3.8% off, over the tolerance,
    # with subnormals on their path; each is a real and a fake term cancelling to 1/2-1/3, so it is rounding.
    Row("H8", "healthy_instancenorm_narrow", OK3, healthy=True),
]


def _frames(path: Path) -> None:
    # A black frame (letterboxing, a failed decode turned to zeros) among ordinary images.
    x = np.random.default_rng(0).uniform(-1, 1, size=(8, 3, 16, 16)).astype(np.float32)
    x[2] = 0.0
    np.save(path, x)


def _corrupt(path: Path) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, size=(8, 3, 8, 8)).astype(np.float32)
    x[1, 0, 2, 3] = np.nan
    np.save(path, x)


def _constant(path: Path) -> None:
    x = np.random.default_rng(1).uniform(0, 1, size=(8, 3, 8, 8)).astype(np.float32)
    x[2] = 0.5
    np.save(path, x)


DATA = {"frames": _frames, "corrupt": _corrupt, "constant": _constant}

_reports: dict = {}


def diagnose(row: Row, tmp_path_factory, kernels: str = "emulated"):
    key = (row.case, kernels)
    if key not in _reports:
        overrides = {"kernels": kernels}
        if row.data is not None:
            path = tmp_path_factory.mktemp("zoo") / f"{row.data}.npy"
            DATA[row.data](path)
            overrides["data.path"] = str(path)
        _reports[key] = nanprobe.diagnose(CASES / f"{row.case}.yaml", **overrides)
    return _reports[key]


def short_op(op: str) -> str:
    return op.removeprefix("aten.").split(".")[0]


def _params():
    for r in ZOO:
        marks = [pytest.mark.xfail(strict=True, reason=f"verdicts: {r.xfail}")] if r.xfail else []
        yield pytest.param(r, id=f"{r.row}-{r.case}", marks=marks)


@pytest.mark.parametrize("row", _params())
def test_zoo(row: Row, tmp_path_factory):
    check(row, diagnose(row, tmp_path_factory))


def verdict(report) -> list:
    """What a user acts on, per precision: the status, the first issue (or the error) and the first fix."""
    out = []
    for run in report.runs:
        f = run.first_issue if run.error is None else _as_finding(run.error)
        issue = None if f is None else (f.kind and f.kind.value, f.phase.value, f.module, short_op(f.op), f.step)
        out.append((run.precision.value, run.status.value, issue, run.fixes[0].id if run.fixes else None))
    return out


@pytest.mark.parametrize("row", _params())
def test_zoo_native_kernels_reach_the_same_verdict(row: Row, tmp_path_factory):
    """The CPU's own fp16/bf16 kernels and the emulated ones (the default) must lead a user to the same place.

    The emulated kernels compute as a GPU does (fp32, one rounding per output); the CPU's native ones
    accumulate some ops in the low dtype. Each row is checked against the expert's verdict under
    both, and the two verdicts must match to the step and the first fix.
    """
    native = diagnose(row, tmp_path_factory, kernels="native")
    assert all(r.kernels.value == "native" for r in native.runs if r.precision.value != "fp32")
    if row.native is not None:  # a known difference, explained where the row is
        assert {r.precision.value: r.status.value for r in native.runs} == row.native
        return
    check(row, native)
    assert verdict(native) == verdict(diagnose(row, tmp_path_factory))


def check(row: Row, report) -> None:
    """Assert the report is the verdict the row's expert signed."""
    runs = {r.precision.value: r for r in report.runs}
    assert {p: runs[p].status.value for p in runs} == row.status
    errors = {p for p, st in row.status.items() if st == "error"}
    assert errors <= {r.precision.value for r in failing(report, "nan")}  # an error counts at every level
    if row.scaler == "recovers":
        assert runs["fp16"].skipped and runs["fp16"].scale_collapse is None
    if row.scaler == "collapses":
        assert runs["fp16"].scale_collapse is not None
    if row.healthy:
        assert failing(report, "underflow") == ()
        assert all(r.first_issue is None and not r.fixes for r in report.runs)
        return
    run = runs[row.at]
    # A replay that raised has no first issue: the exception, where it was raised, is the finding.
    f = run.first_issue if run.error is None else _as_finding(run.error)
    if row.kind is not None or row.phase is not None or row.module is not None or row.ops:
        assert f is not None, f"{row.at}: no first issue"
    if row.kind is not None:
        assert f.kind is not None and f.kind.value == row.kind
    if row.phase is not None:
        assert f.phase.value == row.phase
    if row.module is not None:
        assert f.module.startswith(row.module) if row.module.endswith(".") else f.module == row.module
    if row.ops:
        assert short_op(f.op) in row.ops
    if row.line is not None:
        expected = f"{row.case}.py:{line_of(CASES / f'{row.case}.py', row.line)}"
        assert f.source is not None and f.source.endswith(expected)
    if row.min_step:
        assert f.step >= row.min_step
    top = [x.id for x in run.fixes[:2]]
    if row.fixes:
        assert set(top) & set(row.fixes), f"{row.at}: first fixes {top}, expected one of {row.fixes}"
    if row.status.get("fp32") not in (None, "ok"):
        assert not run.precision_problem  # fp32 fails too: no precision setting is the cause


def _as_finding(error) -> SimpleNamespace:
    op = (error.op or "").replace("torch.nn.functional.", "aten.") + ".default"
    return SimpleNamespace(kind=None, phase=error.phase, module="", op=op, source=error.source, step=error.step)


def _row(case: str) -> Row:
    return next(r for r in ZOO if r.case == case)


@pytest.mark.parametrize("case", ["zero_centred_gp", "lost_updates_bf16", "scaler_first_skip"])
def test_zoo_json(case, tmp_path_factory):
    """What a CI job reads from --json says the same as the report."""
    row = _row(case)
    doc = json.loads(diagnose(row, tmp_path_factory).to_json())
    runs = {r["precision"]: r for r in doc["runs"]}
    assert {p: r["status"] for p, r in runs.items()} == row.status
    if row.healthy:
        assert all(r["first_issue"] is None for r in doc["runs"])
        assert runs["fp16"]["skipped"], "the first step at scale 65536 is skipped once"
        return
    first = runs[row.at]["first_issue"]
    assert (first["kind"], first["phase"], first["module"]) == (row.kind, row.phase, row.module)
    assert set(x["id"] for x in runs[row.at]["fixes"][:2]) & set(row.fixes)


@pytest.mark.parametrize("case", ["gp_fp16_no_scaling"])
def test_zoo_reproducible(case):
    """A penalty that draws its interpolation weights from numpy, as PyTorch-GAN's does, replays the same.
    (gp_scaler_unscaled draws from `random`, but its one alpha per batch barely moves that critic's numbers:
    two unseeded runs can print the same JSON, so it would not show the bug reliably.)"""
    runs = [nanprobe.diagnose(CASES / f"{case}.yaml", dtypes=["fp32"], steps=1).to_json() for _ in range(2)]
    assert runs[0] == runs[1]


def test_zoo_table_names_known_fixes():
    """Every fix id the table expects is in the catalogue, and every case file has its row: a typo or a renamed
    fix would otherwise pass for an engine bug."""
    from nanprobe.analysis.fixes import REGISTRY

    assert {fix for row in ZOO for fix in row.fixes} <= set(REGISTRY)
    assert {row.case for row in ZOO} == {p.stem for p in CASES.glob("*.yaml")}

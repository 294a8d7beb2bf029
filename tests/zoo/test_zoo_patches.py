"""Patch proofs on zoo scenarios written as user code (cases/<name>/: models file, step file, config):
the fix's diff applies with `git apply --check` in a copy of the case folder, the patched code runs, and
--verify-fix marks it ✓. Where the fix lives in the config (nanprobe builds the optimizer and casts the
models from train.* and precision.mode), the config change is what is proven: no patch, and the config
with the change applied runs ok."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import nanprobe
from nanprobe.enums import FixCheck

CASES = Path(__file__).resolve().parent / "cases"
GIT = shutil.which("git")


def _fix(run, fix_id):
    return next(f for f in run.fixes if f.id == fix_id)


def _copy(case: str, tmp_path: Path) -> Path:
    copy = tmp_path / case
    shutil.copytree(CASES / case, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_gp_scaled_patch_applies_runs_and_is_verified(tmp_path):
    """The AMP bug: a GradScaler scales the loss, but the penalty's autograd.grad takes critic_out.sum()
    unscaled; the global-average-pooled critic's input gradients (~1e-8) flush in fp16. The recipe's scale
    lifts them into range, and the tangents of its double backward (not divided by the pooling) stay in it."""
    report = nanprobe.diagnose(CASES / "gp_scaled_amp" / "config.yaml", verify_fix=True, verify_top=1)
    run = report.runs[-1]
    assert run.status.value != "ok" and run.first_issue.phase.value == "input-grad"
    fix = _fix(run, "gp-scaled")
    assert fix.check is FixCheck.OK and fix.verified is True, fix.verification
    assert fix.patch.startswith("--- a/train.py\n+++ b/train.py\n")
    assert "scaler.scale(critic_out.sum()) if scaler is not None else critic_out.sum()" in fix.patch
    assert "def critic_loss(netD, netG, real, noise, lambda_gp=10.0, scaler=None):" in fix.patch
    copy = _copy("gp_scaled_amp", tmp_path)
    (copy / "fix.diff").write_text(fix.patch)
    for args in (["--check"], []):
        done = subprocess.run([GIT, "apply", *args, "fix.diff"], cwd=copy, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    patched = nanprobe.diagnose(copy / "config.yaml").runs[-1]
    assert patched.status.value == "ok" and patched.fixes == ()  # the applied patch runs clean
    # What is left is rounding: the critic's real and fake terms cancel in the fp16 sum of the last layer's
    # weight gradient (to 1/580 of their size), which no loss scale changes and which is not an underflow.
    assert any("within rounding:" in n and "critic.score.weight (1/5" in n for n in patched.notes), patched.notes


def test_adam_eps_falls_back_to_the_config_and_is_verified(tmp_path):
    """Pure fp16 weights and Adam's eps 1e-8 (0 in fp16): m / (sqrt(v) + 0) is inf where v flushed. nanprobe
    builds the optimizer from train.*, and nothing in the case's files builds one: no patch, the config
    change train.eps: 1e-4 is what is replayed and proven."""
    report = nanprobe.diagnose(CASES / "adam_eps_fp16" / "config.yaml", verify_fix=True, verify_top=1)
    run = report.runs[-1]
    assert run.status.value == "nan" and run.first_issue.op == "aten.addcdiv_.default"
    fix = _fix(run, "adam-eps")
    assert fix.patch is None and fix.overrides == {"train.eps": 1.0e-4}
    assert fix.check is FixCheck.OK and fix.verified is True, fix.verification
    copy = _copy("adam_eps_fp16", tmp_path)
    doc = yaml.safe_load((copy / "config.yaml").read_text())
    doc["train"]["eps"] = 1.0e-4
    (copy / "config.yaml").write_text(yaml.safe_dump(doc))
    assert nanprobe.diagnose(copy / "config.yaml").runs[-1].status.value == "ok"


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_master_weights_patch_removes_the_half_cast_and_is_verified(tmp_path):
    """build_critic's .half() and Adam at lr 1e-5: updates below half an ulp of the fp16 weights."""
    report = nanprobe.diagnose(CASES / "master_weights_fp16" / "config.yaml", verify_fix=True, verify_top=2)
    run = report.runs[-1]
    fix = _fix(run, "master-weights")
    assert fix.patch is not None and "-    return Critic(ch).half()\n+    return Critic(ch)\n" in fix.patch
    copy = _copy("master_weights_fp16", tmp_path)
    (copy / "fix.diff").write_text(fix.patch)
    done = subprocess.run([GIT, "apply", "--check", "fix.diff"], cwd=copy, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # fp32 weights under fp16 autocast still need their loss scaled: without it the backward underflows.
    assert fix.overrides == {"precision.mode": "amp", "train.grad_scaler": True}
    assert fix.check is FixCheck.OK and fix.verified is True, fix.verification


# The CPU's native fp16 kernels against the emulated (GPU-like) ones on these cases: the status they give
# where it differs, None where it is the same. gp_scaled_amp's input gradients sit deep in fp16's
# subnormals; the native convolution_backward rounds partial results (tests/engine/test_emulate.py) and
# flushes more of them (170 zeros against 132), enough to zero one sample's whole gradient: its norm is 0
# and the sqrt's backward makes a NaN. The culprit and the fix are the same (docs/concepts.md, Kernels).
NATIVE = {"gp_scaled_amp": "nan", "adam_eps_fp16": None, "master_weights_fp16": None}


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_native_kernels_name_the_same_culprit_and_fix(case):
    runs = {k: nanprobe.diagnose(CASES / case / "config.yaml", kernels=k).runs[-1] for k in ("emulated", "native")}
    emulated, native = runs["emulated"], runs["native"]
    a, b = emulated.first_issue, native.first_issue
    assert (a.kind, a.phase, a.module, a.op, a.step) == (b.kind, b.phase, b.module, b.op, b.step)
    assert emulated.fixes[0].id == native.fixes[0].id
    assert native.status.value == (NATIVE[case] or emulated.status.value)

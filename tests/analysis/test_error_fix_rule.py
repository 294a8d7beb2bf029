"""The catalogue's rule for a replay that raised: BCE refused under autocast points at logits-loss."""
from __future__ import annotations

import pytest

from nanprobe.analysis import fixes
from nanprobe.enums import FailOn, Mode, Phase, Precision, Status
from nanprobe.model.report import ReplayError

REFUSED = ("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.")


def _ctx(error: ReplayError, precision=Precision.FP16, **kw) -> fixes.FixContext:
    return fixes.FixContext(precision=precision, mode=Mode.AMP, status=Status.ERROR, issue=None, nonfinite=None,
                            error=error, loss_kind="custom", device="cpu", **kw)


@pytest.mark.parametrize("op", ["torch.nn.functional.binary_cross_entropy", "aten.binary_cross_entropy.default"])
def test_bce_refused_under_autocast_proposes_logits_loss_first(op):
    error = ReplayError("RuntimeError", REFUSED, "train.py:41", op, Phase.FORWARD, 0)
    ranked = fixes.rank(_ctx(error, other={Precision.FP32: Status.OK, Precision.BF16: Status.ERROR}))
    assert [f.id for f in ranked] == ["logits-loss"]
    assert "BCEWithLogitsLoss" in ranked[0].snippet and ranked[0].apply is None


def test_an_unrelated_error_gets_no_logits_fix():
    error = ReplayError("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (4x8 and 9x1)", "train.py:12",
                        "aten.mm.default", Phase.FORWARD, 0)
    assert "logits-loss" not in [f.id for f in fixes.rank(_ctx(error, other={Precision.BF16: Status.ERROR}))]


def test_bce_with_logits_is_never_mistaken_for_bce():
    error = ReplayError("RuntimeError", "something about autocast", "train.py:41",
                        "torch.nn.functional.binary_cross_entropy_with_logits", Phase.FORWARD, 0)
    assert "logits-loss" not in [f.id for f in fixes.rank(_ctx(error, other={Precision.BF16: Status.ERROR}))]


@pytest.mark.parametrize("level", list(FailOn))
def test_error_fails_at_every_fail_on_level(level):
    assert level.fails(Status.ERROR)
    assert Status.ERROR.severity > Status.NAN.severity

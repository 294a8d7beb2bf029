"""nanprobe.analysis.rescaled: an underflow's effect checked against a replay with the loss scaled by 2^16."""
from __future__ import annotations

from pathlib import Path

import nanprobe
from nanprobe.analysis.effect import Effect, ParamEffect, ScalarEffect
from nanprobe.analysis.rescaled import _cleared
from nanprobe.enums import Precision

CASE = Path(__file__).resolve().parents[1] / "zoo" / "cases" / "healthy_instancenorm_bias.yaml"


def _effect(params, loss=None):
    return Effect(Precision.FP16, 0.031, loss, None, tuple(params), None)


def test_what_stays_as_far_from_fp32_without_the_underflow_is_rounding_and_what_comes_back_is_not():
    effect = _effect([ParamEffect("critic.a.weight", 0, 0.038, 0.0, True),
                      ParamEffect("critic.b.weight", 0, 0.300, 0.0, True),
                      ParamEffect("critic.c.weight", 0, 0.010, 0.0, False)],
                     loss=ScalarEffect("loss", 0, 1.04, 1.0, 0.04, True))
    scaled = _effect([ParamEffect("critic.a.weight", 0, 0.037, 0.0, True),      # the same: rounding
                      ParamEffect("critic.b.weight", 0, 0.012, 0.0, False),     # back within tolerance
                      ParamEffect("critic.c.weight", 0, 0.010, 0.0, False)],
                     loss=ScalarEffect("loss", 0, 1.01, 1.0, 0.01, False))
    cleared = _cleared(effect, scaled)
    assert [q.param for q in cleared.off_params] == ["critic.b.weight"]
    assert cleared.rounding == ("critic.a.weight",)
    assert cleared.loss.off  # 0.04 -> 0.01 without the underflow: it was the underflow's
    assert "critic.a.weight (rounding, not the underflow)" in cleared.summary()


def test_an_instance_norm_critic_whose_gradients_are_as_far_off_with_a_grad_scaler_is_ok():
    # At this width its weight gradients are 3-4% off fp32 in fp16 (tolerance 3.1%), with subnormals in
    # the penalty's double backward of the norm; a GradScaler removes the subnormals and not the error.
    report = nanprobe.diagnose(CASE, dtypes=["fp16"], **{"model.critic_args": {"dim": 32}})
    run = next(r for r in report.runs if r.precision is Precision.FP16)
    assert run.status.value == "ok"
    assert any("(rounding, not the underflow)" in n for n in run.notes)


def test_a_run_with_a_grad_scaler_already_is_not_replayed_again():
    report = nanprobe.diagnose(CASE, dtypes=["fp16"], **{"train.grad_scaler": True, "model.critic_args": {"dim": 32}})
    run = next(r for r in report.runs if r.precision is Precision.FP16)
    assert run.status.value == "ok"
    assert not any("rounding, not the underflow" in n for n in run.notes)

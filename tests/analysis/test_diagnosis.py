"""Root cause by provenance and underflow by its effect, on hand-built traces of the cases issue 11 lists."""
from __future__ import annotations

import pytest
import torch

from nanprobe.enums import Mode, Phase
from nanprobe.model.report import StepMetrics

IG, BW, FW, OPT = Phase.INPUT_GRAD, Phase.BACKWARD, Phase.FORWARD, Phase.OPTIMIZER


def test_sqrt_penalty_nan_is_blamed_on_the_input_grad_flush_not_an_early_forward_subnormal(synth):
    """DCGAN critic at small init, hand-written sqrt(sum(g**2)) under fp16 autocast."""
    r, Op = synth.row, synth.Op
    ops = [
        # A forward conv with 6% subnormal activations: harmless, and earlier than everything else.
        Op("aten.convolution.default", r(1000, 0.5, 1e-6), r(1000, 0.5, 1e-6, sub=60), module="critic.net.0"),
        Op("aten.leaky_relu.default", r(1000, 0.5, 1e-6), r(1000, 0.5, 1e-6, sub=60), (0,), module="critic.net.1"),
        # The penalty's input gradient: ~1e-9 in fp32, flushed to zero in fp16.
        Op("aten.convolution_backward.default", r(96, 1e-7, 1e-10), r(96, 1e-7, 6e-8, zeros=90, sub=6), (1,),
          phase=IG, module="critic.net.0", node="ConvolutionBackward0"),
        Op("aten.pow.Tensor_Scalar", r(96, 1e-14, 1e-20), r(96, 0.0, 0.0, zeros=96), (2,), phase=FW, scalars=(2.0,)),
        Op("aten.sum.dim_IntList", r(8, 1e-13, 1e-14), r(8, 0.0, 0.0, zeros=8), (3,)),
        Op("aten.sqrt.default", r(8, 3e-7, 1e-7), r(8, 0.0, 0.0, zeros=8), (4,)),
        Op("aten.mul.Tensor", r(8, 2.5, 2.5), r(8, 2.5, 2.5), (), phase=BW, node="SqrtBackward0"),
        Op("aten.div.Tensor", r(8, 1e7, 1e6), r(8, 0.0, 0.0, ninf=8), (6, 5), phase=BW, node="SqrtBackward0"),
        Op("aten.mul.Tensor", r(96, 1e-3, 1e-9), r(96, 0.0, 0.0, nan=96), (7, 2), phase=BW, node="PowBackward0"),
    ]
    run = synth.diagnose(synth.build(ops))
    assert run.status.value == "nan"
    issue = run.first_issue
    assert (issue.kind.value, issue.phase.value, issue.module, issue.op) == (
        "underflow", "input-grad", "critic.net.0", "aten.convolution_backward.default")
    assert run.first_nonfinite.node == "SqrtBackward0"
    assert [c.op.split(".")[1] for c in run.chain] == ["convolution_backward", "pow", "sum", "sqrt", "div"]
    assert {f.id for f in run.fixes[:3]} >= {"gp-fp32", "safe-norm"}
    # The early forward subnormals are not the headline: a note at most.
    assert "forward" not in issue.phase.value


def test_half_adam_with_eps_1e8_names_addcdiv_not_an_earlier_backward_underflow(synth):
    """StyleGAN2-like critic cast .half(), Adam eps=1e-8: sqrt(v) + eps == 0 in fp16."""
    r, Op = synth.row, synth.Op
    p = "critic.b4.conv.weight"
    ops = [
        # Minibatch-stddev backward: 20% subnormal gradients (an underflow, but not what makes the NaN).
        Op("aten.div.Tensor", r(64, 1e-3, 1e-8), r(64, 1e-3, 6e-8, sub=13, zeros=2), phase=BW, module="critic.mbstd",
          node="SqrtBackward0"),
        Op("aten.convolution_backward.default", r(64, 1e-4, 1e-7), r(64, 1e-4, 1e-7), phase=BW,
           module="critic.b4.conv"),
        Op("aten.lerp_.Scalar", r(64, 1e-5, 1e-8), r(64, 1e-5, 1e-7, sub=10), (1,), phase=OPT, module="critic.b4.conv",
          source=None, param=p, scalars=(0.1,)),
        Op("aten.addcmul_.default", r(64, 1e-11, 1e-14), r(64, 0.0, 0.0, zeros=64), (1,), phase=OPT,
          module="critic.b4.conv", source=None, param=p),
        Op("aten.sqrt.default", r(64, 3e-6, 1e-7), r(64, 0.0, 0.0, zeros=64), (3,), phase=OPT, module="critic.b4.conv",
          source=None, param=p),
        Op("aten.div.Tensor", r(64, 1e-4, 3e-6), r(64, 0.0, 0.0, zeros=64), (4,), phase=OPT, module="critic.b4.conv",
          source=None, param=p),
        Op("aten.add_.Tensor", r(64, 1e-4, 1e-8), r(64, 0.0, 0.0, zeros=64), (5,), phase=OPT, module="critic.b4.conv",
          source=None, param=p, scalars=(1e-8,)),
        Op("aten.addcdiv_.default", r(64, 0.1, 1e-3), r(64, 0.0, 0.0, nan=3, pinf=30, ninf=31), (2, 6), phase=OPT,
          module="critic.b4.conv", source=None, param=p, scalars=(-1e-4,)),
    ]
    run = synth.diagnose(synth.build(ops, mode=Mode.HALF), eps=1e-8)
    issue = run.first_issue
    assert issue.phase is OPT and issue.op == "aten.addcdiv_.default" and issue.kind.value == "nan"
    assert issue.numbers["eps"] == 1e-8 and "rounds to 0" in issue.detail
    assert [c.op.split(".")[1] for c in run.chain][-2:] == ["add_", "addcdiv_"]
    assert {f.id for f in run.fixes[:2]} == {"adam-eps", "master-weights"}
    assert "safe-norm" not in [f.id for f in run.fixes]


def test_log_of_one_plus_exp_names_the_overflow_on_the_fake_branch(synth):
    """log(1 + exp(x)) under the CPU's own autocast: exp underflows on one branch, overflows on the other."""
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.convolution.default", r(8, 30.0, 1.0), r(8, 30.0, 1.0), module="critic.out"),       # D(real) < 0
        Op("aten.exp.default", r(8, 1e-6, 1e-13), r(8, 1e-6, 6e-8, zeros=3, sub=5), (0,), source="loss.py:3"),
        Op("aten.add.Tensor", r(8, 1.0, 1.0), r(8, 1.0, 1.0), (1,), source="loss.py:3"),
        Op("aten.log.default", r(8, 1e-6, 1e-13), r(8, 0.0, 0.0, zeros=8), (2,), source="loss.py:3"),
        Op("aten.convolution.default", r(8, 15.0, 12.0), r(8, 15.0, 12.0), module="critic.out"),     # D(fake) ~ 12
        Op("aten.exp.default", r(8, 3.2e6, 1.6e5), r(8, 6e4, 6e4, pinf=6), (4,), source="loss.py:4"),
        Op("aten.add.Tensor", r(8, 3.2e6, 1.6e5), r(8, 6e4, 6e4, pinf=6), (5,), source="loss.py:4"),
        Op("aten.log.default", r(8, 15.0, 12.0), r(8, 11.0, 11.0, pinf=6), (6,), source="loss.py:4"),
    ]
    for o in ops:
        o.low_dtype = "float16" if o.op != "aten.convolution.default" else "float16"
    run = synth.diagnose(synth.build(ops))
    issue = run.first_issue
    assert (issue.kind.value, issue.op, issue.source) == ("overflow", "aten.exp.default", "loss.py:4")
    assert run.fixes[0].id == "logits-loss" and "fp32-op" in [f.id for f in run.fixes[:3]]


def test_penalty_critic_with_small_effect_is_not_underflow_only_notes(synth):
    """WGAN-GP/R1 critic in fp16: its input gradient is 30% subnormal, the penalty moves 6e-4, gradients < 1%."""
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.convolution.default", r(64, 1.0, 1e-3), r(64, 1.0, 1e-3), module="critic.net.0"),
        Op("aten.convolution_backward.default", r(64, 1e-4, 1e-9), r(64, 1e-4, 6e-8, sub=20, zeros=1), (0,), phase=IG,
          module="critic.net.0"),
        Op("aten.convolution_backward.default", r(64, 1e-2, 1e-6), r(64, 1e-2, 1e-6), (1,), phase=BW,
          module="critic.net.0"),
    ]
    g = torch.linspace(-1, 1, 256)
    grads = {"critic.net.0.weight": g * 1.008}
    b = synth.build(ops, metrics=[StepMetrics(0, 1.0, 10.006, 1.0)], ref_metrics=[StepMetrics(0, 1.0, 10.0, 1.0)],
                    grads=grads, ref_grads={"critic.net.0.weight": g})
    run = synth.diagnose(b)
    assert run.status.value == "ok" and run.first_issue is None and run.fixes == ()
    (note,) = run.notes
    assert "no measurable effect" in note and "critic.net.0 input-grad" in note and "penalty 0.0006" in note


def test_gradients_zeroed_by_an_unscaled_backward_are_underflow_with_the_effect_shown(synth):
    """fp16 autocast with no GradScaler: a layer's weight gradient flushes to zero in the backward."""
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.convolution.default", r(64, 1.0, 1e-3), r(64, 1.0, 1e-3), module="critic.net.0"),
        Op("aten.leaky_relu_backward.default", r(64, 1e-6, 1e-10), r(64, 1e-6, 6e-8, zeros=40, sub=20), phase=BW,
          module="critic.net.1"),
        Op("aten.convolution_backward.default", r(64, 1e-7, 1e-11), r(64, 0.0, 0.0, zeros=64), (1, 0), phase=BW,
          module="critic.net.0"),
        Op("aten._to_copy.default", r(64, 1e-7, 1e-11), r(64, 0.0, 0.0, zeros=64), (2,), phase=BW,
          module="critic.net.0", low_dtype="float32", low_only=True),
    ]
    g = torch.linspace(1e-9, 1e-7, 256)
    b = synth.build(ops, grads={"critic.net.0.weight": torch.zeros(256)}, ref_grads={"critic.net.0.weight": g})
    run = synth.diagnose(b)
    assert run.status.value == "underflow"
    issue = run.first_issue
    assert (issue.phase, issue.module, issue.op) == (BW, "critic.net.1", "aten.leaky_relu_backward.default")
    assert "100.0% of critic.net.0.weight's gradient zeroed" in issue.detail
    assert run.fixes[0].id == "grad-scaler"


def _summary(precision, status="ok", loss=None, penalty=None, grad=None):
    from nanprobe.enums import Precision, Status
    from nanprobe.model.comparison import PrecisionSummary

    return PrecisionSummary(Precision(precision), Mode.AMP, Status(status), None, (), loss, penalty, grad, 0, 0, 0,
                            None, None, None, 0, 0)


def test_recommendation_ranks_safe_precisions_by_measured_error_not_by_habit():
    from nanprobe.analysis.comparison import recommend

    # bf16's gradients are 10x further from fp32 than fp16's, and fp16 is safe: fp16 first.
    rec = recommend((_summary("fp32"), _summary("fp16", loss=1e-4, penalty=6e-4, grad=0.008),
                     _summary("bf16", loss=2e-3, penalty=4e-3, grad=0.08)))
    assert [p.value for p in rec.safe] == ["fp16", "bf16"] and rec.use.value == "fp16"
    # The penalty counts as much as the gradients.
    rec = recommend((_summary("fp32"), _summary("fp16", grad=0.001, penalty=0.3), _summary("bf16", grad=0.01)))
    assert rec.use.value == "bf16"
    # An unsafe fp16 is never recommended, whatever its error.
    rec = recommend((_summary("fp32"), _summary("fp16", "nan", grad=0.0), _summary("bf16", grad=0.5)))
    assert [p.value for p in rec.safe] == ["bf16"]


def test_a_nan_that_a_later_op_masks_is_a_note_not_a_finding(synth):
    """F.normalize's backward at a zero vector: 0/0 inside the norm's backward, masked before the gradient."""
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.linalg_vector_norm.default", r(8, 2.0, 1.0, zeros=1), r(8, 2.0, 1.0, zeros=1), module="critic"),
        Op("aten.div.Tensor", r(64, 1.0, 0.1), r(64, 1.0, 0.1, nan=8), (0,), phase=BW, module="critic",
          node="LinalgVectorNormBackward0"),
        Op("aten.masked_fill.Scalar", r(64, 1.0, 0.1, zeros=8), r(64, 1.0, 0.1, zeros=8), (1,), phase=BW,
          module="critic", node="LinalgVectorNormBackward0"),
    ]
    finite = [StepMetrics(0, 1.0, None, 1.0)]
    b = synth.build(ops, metrics=finite, ref_metrics=finite)
    b.ref.events[1].row = list(b.low.events[1].row)  # fp32 makes the same masked 0/0
    run = synth.diagnose(b)
    assert run.status.value == "ok" and run.first_issue is None and run.first_nonfinite is None and run.fixes == ()
    assert any("masked" in n for n in run.notes)


def _weight_sum(synth, ref_values, low_values, module="critic.score"):
    """A Linear weight's gradient under AMP: the real and the fake term (fp16 mm outputs of ~1000) added by the
    autograd engine in fp16. fp32's sum is ~1: the terms cancel."""
    r, Op = synth.row, synth.Op
    n = ref_values.numel()
    zeros = int(((low_values == 0) & (ref_values != 0)).sum())
    ops = [
        Op("aten.mm.default", r(n, 1000.0, 100.0), r(n, 1000.0, 100.0), phase=BW, module=module),
        Op("aten.mm.default", r(n, 1000.0, 100.0), r(n, 1000.0, 100.0), phase=BW, module=module),
        Op("aten.add.Tensor", r(n, float(ref_values.abs().max()), float(ref_values.abs()[ref_values != 0].min())),
           r(n, float(low_values.abs().max()), 2.0, zeros=zeros), (0, 1), phase=BW, module=module,
           node="TBackward0"),
    ]
    param = f"{module}.weight"
    return synth.build(ops, samples={2: (low_values, ref_values)}, grads={param: low_values},
                       ref_grads={param: ref_values})


def test_zeros_of_a_cancelling_sum_at_normal_values_are_rounding_not_underflow(synth):
    """WGAN critic at init under AMP: the fake and real halves of a weight's gradient nearly cancel, and fp16's
    sum of the rounded terms is 0 where fp32's is 0.01-1.3. One of those values (4.3e-5) is below fp16's smallest
    normal, but rounding 4.3e-5 gives a subnormal, not 0: no zero here is the range's."""
    from nanprobe.analysis import diagnosis

    ref_values = torch.tensor([4.3e-5] + [0.013, 0.08, 0.19, 0.27, 0.6, 1.3, 0.9, 1.1] * 3)
    low_values = torch.tensor([0.0] + [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0] * 3)
    b = _weight_sum(synth, ref_values, low_values)
    run = synth.diagnose(b)
    assert run.status.value == "ok" and run.first_issue is None and run.fixes == ()
    ref = diagnosis.measure_against(b.ref, b.ref_rec, None)
    measured = diagnosis.measure_against(b.low, b.low_rec, ref)
    # 16 of 25 values are 0, but only the one at 4.3e-5 could be the range's: not an underflow candidate.
    assert measured.alignment.delta(2).candidate is False and measured.alignment.delta(2).lost < 0.05
    effect = measured.effect
    ((name, factor),) = effect.cancelling
    assert effect.off_params == () and name == "critic.score.weight" and factor == pytest.approx(1000.0 / 1.3)


def test_zeros_where_fp32_is_below_the_smallest_normal_are_still_an_underflow(synth):
    """An unscaled backward: both terms are ~1e-5, below fp16's smallest normal (6.1e-5), and flush; their sum is
    0 where fp32's is 1e-8 to 2e-6. The terms are only 10 times the sum, so the 100% error is not their rounding."""
    r, Op = synth.row, synth.Op
    ref_values = torch.tensor([1e-8, 2e-8, 4e-8, 1e-7, 3e-7, 5e-7, 1e-6, 2e-6] * 3)
    low_values = torch.zeros(24)
    ops = [
        Op("aten.mm.default", r(24, 2e-5, 1e-9), r(24, 0.0, 0.0, zeros=24), phase=BW, module="critic.score"),
        Op("aten.mm.default", r(24, 2e-5, 1e-9), r(24, 0.0, 0.0, zeros=24), phase=BW, module="critic.score"),
        Op("aten.add.Tensor", r(24, 2e-6, 1e-8), r(24, 0.0, 0.0, zeros=24), (0, 1), phase=BW, module="critic.score",
           node="TBackward0"),
    ]
    b = synth.build(ops, samples={2: (low_values, ref_values)}, grads={"critic.score.weight": low_values},
                    ref_grads={"critic.score.weight": ref_values})
    run = synth.diagnose(b)
    assert run.status.value == "underflow" and run.fixes[0].id == "grad-scaler"
    assert (run.first_issue.module, run.first_issue.op) == ("critic.score", "aten.mm.default")


def test_a_walk_ending_at_zeros_that_are_mostly_normal_values_is_not_an_underflow(synth):
    """A gradient 84% off whose path ends at a sum with one value below fp16's smallest normal among 16 zeros
    at normal values: one flush does not make the zeros the range's. The status stays ok and the note says the
    difference is rounding (its terms are too close to the sum, 2.5x, for a cancelling sum to explain it)."""
    r, Op = synth.row, synth.Op
    ref_values = torch.tensor([4.3e-5] + [0.013, 0.08, 0.19, 0.27, 0.6, 1.3, 0.9, 1.1] * 3)
    low_values = torch.tensor([0.0] + [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0] * 3)
    ops = [
        Op("aten.mm.default", r(25, 3.0, 0.1), r(25, 3.0, 0.1), phase=BW, module="critic.score"),
        Op("aten.mm.default", r(25, 3.0, 0.1), r(25, 3.0, 0.1), phase=BW, module="critic.score"),
        Op("aten.add.Tensor", r(25, 1.3, 4.3e-5), r(25, 2.0, 2.0, zeros=16), (0, 1), phase=BW,
           module="critic.score", node="TBackward0"),
    ]
    b = synth.build(ops, samples={2: (low_values, ref_values)}, grads={"critic.score.weight": low_values},
                    ref_grads={"critic.score.weight": ref_values})
    run = synth.diagnose(b)
    assert run.status.value == "ok" and run.first_issue is None and run.fixes == ()
    assert run.notes[0].startswith("differs from fp32 beyond tolerance with no underflow, overflow or NaN on its "
                                   "path: the dtype's rounding, not its range")
    assert ("parameter gradients up to 0.84 (critic.score.weight), 64.0% of critic.score.weight's gradient "
            "zeroed") in run.notes[0]

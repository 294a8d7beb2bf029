"""Each fix rule is a pattern over the culprit and its chain (casts and views looked through), tested on small
hand-built traces; a fix already in place is never proposed."""
from __future__ import annotations

from nanprobe.analysis import fixes as fx
from nanprobe.enums import Mode, Phase, Precision, Status
from nanprobe.model.report import Finding

IG, BW, FW, OPT = Phase.INPUT_GRAD, Phase.BACKWARD, Phase.FORWARD, Phase.OPTIMIZER


def _ids(run) -> list[str]:
    return [f.id for f in run.fixes]


def test_log_of_sigmoid_through_an_autocast_cast_is_logits_loss(synth):
    """Under the cuda policy log runs in fp32: a cast sits between sigmoid (fp16) and log."""
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.addmm.default", r(8, 20.0, 18.0), r(8, 20.0, 18.0), module="critic.fc"),
        Op("aten.sigmoid.default", r(8, 1.0, 1e-9), r(8, 1.0, 1e-4, zeros=4), (0,), source="loss.py:7"),
        Op("aten._to_copy.default", r(8, 1.0, 1e-9), r(8, 1.0, 1e-4, zeros=4), (1,), source="loss.py:7",
          low_dtype="float32", low_only=True),
        Op("aten.log.default", r(8, 20.7, 1e-9), r(8, 9.2, 1e-4, ninf=4), (2,), source="loss.py:7"),
    ]
    run = synth.diagnose(synth.build(ops))
    assert run.first_issue.op == "aten.sigmoid.default" and run.first_issue.kind.value == "underflow"
    assert _ids(run)[0] == "logits-loss"
    assert "bf16" not in _ids(run)[:1]


def test_log_of_one_minus_sigmoid_is_logits_loss(synth):
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.addmm.default", r(8, 20.0, 18.0), r(8, 20.0, 18.0), module="critic.fc"),
        Op("aten.sigmoid.default", r(8, 1.0, 1.0), r(8, 1.0, 1.0), (0,), source="loss.py:8"),
        Op("aten.rsub.Scalar", r(8, 1e-8, 1e-9), r(8, 0.0, 0.0, zeros=8), (1,), source="loss.py:8"),
        Op("aten.log.default", r(8, 20.7, 18.0), r(8, 0.0, 0.0, ninf=8), (2,), source="loss.py:8"),
    ]
    run = synth.diagnose(synth.build(ops))
    assert run.first_issue.op == "aten.rsub.Scalar"
    assert _ids(run)[0] == "logits-loss"


def test_pixelnorm_in_a_half_model_is_safe_norm(synth):
    """ProGAN PixelNorm x * rsqrt(mean(x*x) + 1e-8) with .half(): x*x flushes, the eps is 0, rsqrt is inf."""
    r, Op = synth.row, synth.Op
    m = "G.pixelnorm"
    ops = [
        Op("aten.addmm.default", r(64, 1e-3, 1e-5), r(64, 1e-3, 1e-5), module="G.fc"),
        Op("aten.mul.Tensor", r(64, 1e-6, 1e-10), r(64, 0.0, 0.0, zeros=64), (0, 0), module=m),
        Op("aten.mean.dim", r(4, 1e-7, 1e-8), r(4, 0.0, 0.0, zeros=4), (1,), module=m),
        Op("aten.add.Tensor", r(4, 1e-7, 1e-8), r(4, 0.0, 0.0, zeros=4), (2,), module=m, scalars=(1e-8,)),
        Op("aten.rsqrt.default", r(4, 1e4, 3e3), r(4, 0.0, 0.0, pinf=4), (3,), module=m),
    ]
    run = synth.diagnose(synth.build(ops, mode=Mode.HALF))
    issue = run.first_issue
    # The user's `+ 1e-8`, which rounds to 0 in fp16, is the culprit; the chain shows x*x flushing into it.
    assert (issue.op, issue.module, issue.kind.value) == ("aten.add.Tensor", m, "underflow")
    assert [c.op.split(".")[1] for c in run.chain] == ["mul", "mean", "add", "rsqrt"]
    assert _ids(run)[:2] == ["safe-norm", "fp32-module"]
    assert "1e-08" in issue.detail and "rounds to 0" in issue.detail


def test_exp_overflow_is_the_op_in_fp32(synth):
    r, Op = synth.row, synth.Op
    ops = [
        Op("aten.bmm.default", r(64, 40.0, 1.0), r(64, 40.0, 1.0), module="attn"),
        Op("aten.exp.default", r(64, 2.4e17, 2.0), r(64, 6e4, 2.0, pinf=3), (0,), module="attn"),
        Op("aten.sum.dim_IntList", r(8, 2.4e17, 3.0), r(8, 6e4, 3.0, pinf=3), (1,), module="attn"),
    ]
    run = synth.diagnose(synth.build(ops))
    assert run.first_issue.op == "aten.exp.default" and run.first_issue.kind.value == "overflow"
    assert "fp32-op" in _ids(run)[:2] and "logits-loss" not in _ids(run)
    fix = next(f for f in run.fixes if f.id == "fp32-op")
    assert "exp" in fix.title and "float" in fix.snippet


def test_adam_addcdiv_with_a_surviving_eps_is_not_told_adam_eps(synth):
    """eps=1e-4 survives fp16: an inf in addcdiv_ comes from somewhere else, and adam-eps is already in place."""
    r, Op = synth.row, synth.Op
    p = "critic.fc.weight"
    ops = [
        Op("aten.lerp_.Scalar", r(8, 1e5, 1.0), r(8, 6e4, 1.0, pinf=1), phase=OPT, module="critic.fc", source=None,
          param=p),
        Op("aten.add_.Tensor", r(8, 1.0, 1e-4), r(8, 1.0, 1e-4), phase=OPT, module="critic.fc", source=None, param=p,
          scalars=(1e-4,)),
        Op("aten.addcdiv_.default", r(8, 1.0, 1e-2), r(8, 1.0, 1e-2, pinf=1), (0, 1), phase=OPT, module="critic.fc",
          source=None, param=p),
    ]
    run = synth.diagnose(synth.build(ops, mode=Mode.HALF), eps=1e-4)
    assert "adam-eps" not in _ids(run) and "safe-norm" not in _ids(run)


def _ctx(**kw) -> fx.FixContext:
    issue = Finding(None, "aten.div.Tensor", "", BW, 0, None, "", node="SqrtBackward0")
    base = dict(precision=Precision.FP16, mode=Mode.AMP, status=Status.NAN, issue=issue, nonfinite=issue)
    return fx.FixContext(**{**base, **kw})


def test_a_sqrt_guarded_by_an_eps_that_survives_gets_no_safe_norm():
    chain = (fx.ChainOp("add", None, "float16", FW, "", (1e-4,), kept_eps=1e-4),
             fx.ChainOp("sqrt", None, "float16", FW, ""),
             fx.ChainOp("div", "SqrtBackward0", "float16", BW, "", nonfinite=True))
    assert "safe-norm" not in [f.id for f in fx.rank(_ctx(chain=chain))]
    unguarded = (fx.ChainOp("sum", None, "float16", FW, "", zeroed=True), *chain[1:])
    assert "safe-norm" in [f.id for f in fx.rank(_ctx(chain=unguarded))]


def test_a_penalty_already_in_fp32_is_not_told_to_scale_or_move_to_fp32():
    issue = Finding(None, "aten.div.Tensor", "", IG, 0, None, "", node="SqrtBackward0")
    ctx = _ctx(issue=issue, unscaled_penalty=True, penalty_fp32=True, grad_scaler=True)
    ids = [f.id for f in fx.rank(ctx)]
    assert "gp-scaled" not in ids and "gp-fp32" not in ids and "grad-scaler" not in ids
    # The same finding with the penalty under fp16 autocast gets both.
    ids = [f.id for f in fx.rank(_ctx(issue=issue, penalty_fp32=False))]
    assert {"gp-fp32", "gp-scaled"} <= set(ids)


def test_every_rule_lives_in_the_one_catalogue():
    ids = [f.id for f in fx.CATALOGUE]
    assert (len(ids) == len(set(ids))
            and {"logits-loss", "safe-norm", "fp32-op", "adam-eps", "master-weights"} <= set(ids))

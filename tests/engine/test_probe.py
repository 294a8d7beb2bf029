import math

import pytest
import torch
from torch import nn

from nanprobe.engine.probe import OpProbe
from nanprobe.enums import Phase


def _critic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))


def _penalty_step(probe, critic, x):
    x = x.clone().requires_grad_(True)
    out = critic(x)
    g = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)[0]
    loss = out.mean() + ((g.norm(2, dim=1) - 1) ** 2).mean()
    probe.phase = Phase.BACKWARD
    loss.backward()


def test_phases_modules_and_double_backward_attribution():
    critic = _critic()
    with OpProbe({"critic": critic}) as probe:
        _penalty_step(probe, critic, torch.randn(3, 4))
    by_phase = {}
    for e in probe.events:
        by_phase.setdefault(e.phase, []).append(e)
    assert {Phase.FORWARD, Phase.INPUT_GRAD, Phase.BACKWARD} <= set(by_phase)
    assert {e.module for e in by_phase[Phase.FORWARD]} >= {"critic.0", "critic.1", "critic.2"}
    grad_ops = {(e.module, e.node) for e in by_phase[Phase.INPUT_GRAD]}
    assert ("critic.1", "LeakyReluBackward0") in grad_ops
    # The double backward of the LeakyReLU's backward still points at the LeakyReLU.
    assert any(e.node == "LeakyReluBackwardBackward0" and e.module == "critic.1" for e in by_phase[Phase.BACKWARD])
    # Backward ops carry the source line of their forward op (this file).
    assert all(e.source and "test_probe.py" in e.source for e in by_phase[Phase.INPUT_GRAD])


def test_no_view_ops_and_data_flow_links():
    critic = _critic()
    with OpProbe({"critic": critic}) as probe:
        critic(torch.randn(2, 4)).t().sum()
    ops = [e.op for e in probe.events]
    assert "aten.t.default" not in ops and "aten.sum.default" in ops
    total = next(e for e in probe.events if e.op == "aten.sum.default")
    producer = probe.events[total.producers[0]]
    assert producer.module == "critic.2"  # linked through the view


def test_hooks_removed_and_train_mode_restored_even_on_error():
    critic = _critic().train()
    try:
        with OpProbe({"critic": critic}):
            critic.eval()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert critic.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in critic.modules())
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None


def test_paused_records_nothing_and_stats_are_per_op():
    with OpProbe({}) as probe:
        with probe.paused():
            torch.ones(3) * 2
        y = torch.tensor([1.0, 0.0, 3.0]) * torch.tensor([2.0, 1e-30, 1.0])
    assert len(probe.events) == 1
    row = probe.events[0].row
    assert row[0] == 3 and row[1] == 3.0 and row[3] == 1
    assert y.shape == (3,)


def test_fills_and_copies_get_the_rows_measuring_would_give():
    from nanprobe.engine import stats as st
    with OpProbe({}) as probe:
        torch.zeros_like(torch.ones(6))
        torch.full((4,), 1e-9, dtype=torch.float16)  # 1e-9 is 0 in fp16
        x = torch.tensor([0.0, 2.0, -1e-40, 3.0]) * 1.0
        x.clone()
        torch.empty(4).copy_(x)
    by_op = {}
    for e in probe.events:
        by_op.setdefault(e.op, e)
    assert by_op["aten.zeros_like.default"].row == st.device_row(torch.zeros(6)).tolist()
    assert by_op["aten.full.default"].row[st.ZEROS] == 4
    measured = by_op["aten.mul.Tensor"].row
    assert by_op["aten.clone.default"].row == measured
    assert by_op["aten.copy_.default"].row == measured
    assert measured[st.ZEROS] == 1 and measured[st.SUBNORMAL] == 1


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_casts_get_the_rows_measuring_would_give(low):
    # Casts are told from their input's row where that is exact: an autocast backward's fp16 -> fp32
    # (an fp16 subnormal is normal in fp32, a bf16 one stays one) and autocast's casts down that
    # neither overflow nor flush. The rest are measured, and so is a cast of part of a recorded
    # output (a slice, an expand) or of one output of several (batch norm's).
    from nanprobe.engine import stats as st
    tiny = torch.finfo(low).smallest_normal
    bn = torch.nn.BatchNorm1d(3)
    with OpProbe({}) as probe:
        x = torch.tensor([0.0, 2.0, tiny / 4, -3.0, math.inf], dtype=low) * 1.0
        y = torch.tensor([1e-3, 70000.0, -2.5, 0.0, 1e-9]) * 1.0
        casts = [x.float(), (y[:3] * 1.0).to(low), y.to(low), y[:3].double(), y[:1].expand(4).double(),
                 bn(torch.randn(4, 3)).double()]
    events = [e for e in probe.events if e.op == "aten._to_copy.default"]
    assert len(events) == len(casts)
    for e, c in zip(events, casts):
        assert e.row == st.device_row(c).tolist()
    assert events[0].row[st.SUBNORMAL] == (1 if low is torch.bfloat16 else 0)
    assert events[2].row[st.POSINF if low is torch.float16 else st.ZEROS] == 1  # 70000 overflows fp16


def test_observe_records_one_event_and_not_its_own_statistics():
    with OpProbe({}) as probe:
        probe.observe(torch.tensor([0.0, 255.0, 1e-40]), "load", module="data")
    assert [e.op for e in probe.events] == ["load"]
    assert probe.events[0].row[3] == 1  # one zero

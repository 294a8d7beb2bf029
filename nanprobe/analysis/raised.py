"""A replay that raised, as a finding.

When the user's step raises in one precision only (nn.BCELoss refused under autocast, an op with no
kernel for the dtype), that precision's verdict is `error`, with the exception, the user's file and
line, the op, and the catalogue's fix; the other precisions are replayed and analysed as usual. A
step that raises in fp32 is a bug in the step, not a precision problem: the caller reports it as a
UserCodeError (exit 2) instead.
"""
from __future__ import annotations

from nanprobe.analysis import fixes as fx
from nanprobe.engine.replay import Trace
from nanprobe.enums import Precision, Status
from nanprobe.model.report import RunReport


def statuses(traces: dict[Precision, Trace], analysed: dict[Precision, Status]) -> dict[Precision, Status]:
    """Each precision's status: `error` for a replay that raised, else what its analysis found."""
    return {p: Status.ERROR if t.error is not None else analysed[p] for p, t in traces.items()}


def errored_run(trace: Trace, status_of: dict[Precision, Status], fix_settings: dict) -> RunReport:
    """The RunReport of a replay that raised: status error, the error, and the fixes that point at it."""
    error = trace.error
    fp32_ok = status_of.get(Precision.FP32) is Status.OK
    ctx = fx.FixContext(precision=trace.precision, mode=trace.mode, status=Status.ERROR, issue=None,
                        nonfinite=None, fp32_ok=fp32_ok or not trace.precision.is_low, error=error,
                        other={p: s for p, s in status_of.items() if p is not trace.precision}, **fix_settings)
    notes = [f"fp32 runs the same step without this error: it comes with {trace.precision.value}"] \
        if fp32_ok and trace.precision.is_low else []
    if trace.stopped:
        notes.append(trace.stopped)
    return RunReport(
        precision=trace.precision, mode=trace.mode, status=Status.ERROR,
        precision_problem=trace.precision.is_low and fp32_ok, first_issue=None, first_nonfinite=None,
        fixes=fx.rank(ctx), metrics=tuple(trace.metrics), ops=len(trace.events), notes=tuple(notes),
        failed_step=error.step, kernels=trace.kernels, error=error)  # type: ignore[union-attr]  # not None on this path

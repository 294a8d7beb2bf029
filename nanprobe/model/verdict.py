"""A precision's verdict as plain text: the failure message of the pytest plugin, the testing helper,
GitHub annotations and JUnit reports (no rich, no torch)."""
from __future__ import annotations

from nanprobe.enums import FailOn, Precision, Status
from nanprobe.model.report import Finding, ReplayError, Report, RunReport


def failing(report: Report, fail_on: FailOn | str = FailOn.OVERFLOW) -> tuple[RunReport, ...]:
    """The runs whose status is at or above fail_on."""
    threshold = FailOn(fail_on)
    return tuple(r for r in report.runs if threshold.fails(r.status))


def _op(f: Finding) -> str:
    return f.op.removeprefix("aten.").rsplit(".", 1)[0] + (f" ({f.node})" if f.node else "")


def where(f: Finding) -> str:
    """'underflow in input-grad at critic.net.23 (leaky_relu_backward), step 0, models.py:34'."""
    kind = f"{f.kind.value} in " if f.kind is not None else ""
    module = f.module or "(outside modules)"
    source = f", {f.source}" if f.source else ""
    return f"{kind}{f.phase.value} at {module} · {_op(f)}, step {f.step}{source}"


def raised(e: ReplayError) -> str:
    """'RuntimeError in forward at torch.nn.functional.binary_cross_entropy, step 0, train.py:41: <message>'."""
    source = f", {e.source}" if e.source else ""
    return f"{e.exception} in {e.phase.value} at {e.op or '(unknown op)'}, step {e.step}{source}: {e.message}"


def headline(run: RunReport) -> str:
    """One line: 'fp16 (amp): nan, underflow in input-grad at critic.net.23 · ..., step 0, models.py:34'."""
    head = f"{run.precision.value} ({run.mode.value}): {run.status.value}"
    if run.error is not None:
        return f"{head}, {raised(run.error)}"
    return f"{head}, {where(run.first_issue)}" if run.first_issue is not None else head


def message(run: RunReport) -> str:
    """The verdict, the culprit (module, phase, step, source line, numbers) and the top fix, in plain text."""
    lines = [f"{run.precision.value} ({run.mode.value}): {run.status.value}"]
    if run.error is not None:
        lines.append(f"error: {raised(run.error)}")
    f = run.first_issue
    if f is not None:
        lines.append(f"first issue: {where(f)}")
        lines.append(f"  {f.detail}")
    n = run.first_nonfinite
    if n is not None and (f is None or n.index != f.index):
        lines.append(f"first non-finite: {where(n)}")
        lines.append(f"  {n.detail}")
    lines.extend(f"note: {note}" for note in run.notes)
    if run.status is not Status.OK and not run.precision.is_low:
        lines.append("note: it fails in fp32: this is not a precision problem")
    if run.fixes:
        top = run.fixes[0]
        lines.append(f"fix: {top.id}  {top.title}" + (f" (in the config: {top.apply})" if top.apply else ""))
        lines.append(f"  {top.why}")
        if len(run.fixes) > 1:
            lines.append("also: " + ", ".join(x.id for x in run.fixes[1:3]))
    return "\n".join(lines)


def verdict(report: Report, precision: Precision | None = None) -> str:
    """The message of `precision`'s run, or of the worst run when None (nanprobe.watch's warnings and errors)."""
    runs = [r for r in report.runs if precision is None or r.precision is precision]
    if not runs:
        return "no replay of that precision in the report."
    return message(max(runs, key=lambda r: r.status.severity))

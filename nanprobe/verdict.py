"""The verdict of a report as one plain-text paragraph (warnings, exceptions; the CLI renders its own)."""
from __future__ import annotations

from nanprobe.enums import Precision, Status
from nanprobe.report import Finding, Report, RunReport


def _at(f: Finding) -> str:
    op = f.op.removeprefix("aten.").rsplit(".", 1)[0]
    node = f" ({f.node})" if f.node else ""
    where = f", {f.source}" if f.source else ""
    return f"{f.phase.value} at {f.module or '(outside modules)'}: {op}{node}{where}"


def run_verdict(run: RunReport) -> str:
    """One paragraph: status, first issue, first non-finite value, the best fix."""
    head = f"{run.precision.value} ({run.mode.value}): {run.status.value}"
    if run.status is Status.OK:
        return head + "; the replay of this step stayed finite."
    parts = [head]
    if run.first_issue is not None:
        kind = run.first_issue.kind.value if run.first_issue.kind else "first non-finite value"
        parts.append(f"first issue: {kind} in {_at(run.first_issue)} (step {run.first_issue.step}): {run.first_issue.detail}")
    nf = run.first_nonfinite
    if nf is not None and (run.first_issue is None or nf.index != run.first_issue.index):
        parts.append(f"first non-finite: {_at(nf)}: {nf.detail}")
    if not run.precision_problem:
        parts.append("fp32 fails too, so the cause is not the precision")
    if run.fixes:
        best = run.fixes[0]
        fix = f"fix: {best.id}: {best.title}" + (f" (in a config: {best.apply})" if best.apply else "")
        others = ", ".join(f.id for f in run.fixes[1:3])
        parts.append(fix + (f"; also {others}" if others else ""))
    return ". ".join(p.rstrip(".") for p in parts) + "."


def verdict(report: Report, precision: Precision | None = None) -> str:
    """The verdict of `precision`'s run, or of the worst run when None."""
    runs = [r for r in report.runs if precision is None or r.precision is precision]
    if not runs:
        return "no replay of that precision in the report."
    return run_verdict(max(runs, key=lambda r: r.status.severity))

"""An `error` run in every plain-text output: the verdict message (pytest plugin, watch, testing
helper), GitHub annotations at the user's line, and JUnit failures."""
from __future__ import annotations

from pathlib import Path

from nanprobe.enums import Mode, Phase, Precision, Status
from nanprobe.formats.github import annotations
from nanprobe.formats.junit import junit_xml
from nanprobe.model.report import FixSuggestion, ReplayError, Report, RunReport
from nanprobe.model.verdict import failing, headline, message, verdict

FIX = FixSuggestion("logits-loss", "Use a logits loss", "why", "criterion = nn.BCEWithLogitsLoss()")


def _report(tmp_path: Path) -> Report:
    train = tmp_path / "train.py"
    train.write_text("\n" * 50, encoding="utf-8")
    error = ReplayError("RuntimeError", "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe "
                        "to autocast.", f"{train}:41", "torch.nn.functional.binary_cross_entropy", Phase.FORWARD, 0)
    ok = RunReport(Precision.FP32, Mode.AMP, Status.OK, False, None, None)
    bad = RunReport(Precision.FP16, Mode.AMP, Status.ERROR, True, None, None, fixes=(FIX,), failed_step=0, error=error)
    return Report(config=str(tmp_path / "config.yaml"), device="cpu", torch="2.x", runs=(ok, bad))


def test_message_names_the_exception_line_op_and_fix(tmp_path):
    report = _report(tmp_path)
    run = report.runs[1]
    text = message(run)
    assert text.splitlines()[0] == "fp16 (amp): error"
    assert ("error: RuntimeError in forward at torch.nn.functional.binary_cross_entropy, step 0, "
            f"{tmp_path / 'train.py'}:41: torch.nn.functional.binary_cross_entropy") in text
    assert "fix: logits-loss  Use a logits loss" in text
    assert headline(run).startswith("fp16 (amp): error, RuntimeError in forward at")
    assert verdict(report) == text  # the worst run: an error outranks ok
    assert failing(report, "nan") == (run,)


def test_github_annotation_points_at_the_users_line(tmp_path):
    lines = annotations(_report(tmp_path), "nan", root=tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith("::error file=train.py,line=41,title=nanprobe fp16 (amp)%3A error::")


def test_junit_counts_the_error_as_a_failure(tmp_path):
    xml = junit_xml(_report(tmp_path), "underflow", 1.0)
    assert 'failures="1"' in xml and 'type="error"' in xml and "logits-loss" in xml

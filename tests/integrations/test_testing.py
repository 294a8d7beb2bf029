"""nanprobe.integrations.testing.assert_precision_safe: a user's own test fails with the verdict, culprit and fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from nanprobe import ConfigError, UserCodeError
from nanprobe.integrations.testing import assert_precision_safe
from nanprobe.model.report import Report
from tests.conftest import FIXTURES, base_doc, line_of, merge, ref

LOUD = FIXTURES / "loud_models.py"


@pytest.fixture
def loud(write_config) -> Path:
    """A tiny critic whose scores overflow fp16 (not bf16) at the LOUD-HEAD line."""
    return write_config(merge(base_doc(), {"model": {"critic": ref("LoudCritic", LOUD)}}))


def test_fails_with_verdict_culprit_and_fix(loud):
    with pytest.raises(AssertionError) as caught:
        assert_precision_safe(loud)
    text = str(caught.value)
    lines = text.splitlines()
    assert lines[0] == f"nanprobe: {loud} is not safe at --fail-on overflow"
    assert lines[1] == "fp16 (amp): nan"
    assert lines[2] == f"first issue: overflow in forward at critic · mul, step 0, {LOUD}:{line_of(LOUD, 'LOUD-HEAD')}"
    assert any(line.startswith("fix: fp32-module  Run critic in fp32") for line in lines)
    assert "bf16 (amp)" not in text  # only the failing precision


def test_returns_the_report_when_safe(loud):
    report = assert_precision_safe(loud, dtypes=("bf16",))
    assert isinstance(report, Report)
    assert [(r.precision.value, r.status.value) for r in report.runs] == [("bf16", "ok")]


def test_overrides_reach_the_replay(write_config):
    path = write_config(merge(base_doc(), {}))
    report = assert_precision_safe(path, dtypes=("fp16", "bf16"), fail_on="underflow", steps=2)
    assert [r.status.value for r in report.runs] == ["ok", "ok"]
    assert report.settings["train"]["steps"] == 2


def test_accepts_a_config_object_with_modules(tiny):
    from nanprobe.io.config import from_dict

    doc = merge(base_doc(), {"model": {"critic": None, "generator": None}})
    doc["model"]["critic"] = tiny.TinyCritic()
    config = from_dict(doc)
    assert_precision_safe(config, dtypes=("bf16",))


def test_bad_input_is_a_config_error_not_an_assertion(loud, write_config):
    with pytest.raises(ConfigError, match=r"^fail_on: must be one of nan, overflow, underflow, got 'sometimes'$"):
        assert_precision_safe(loud, fail_on="sometimes")
    with pytest.raises(ConfigError, match=r"^unknown key 'setps'"):
        assert_precision_safe(loud, setps=3)
    bad = write_config(merge(base_doc(), {"model": {"critic": ref("RaisingCritic")}}), name="raising.yaml")
    with pytest.raises(UserCodeError, match="RaisingCritic refuses to build"):
        assert_precision_safe(bad)


def test_shipped_examples_fail_and_pass_as_diagnosed():
    configs = Path(__file__).resolve().parents[2] / "configs"
    with pytest.raises(AssertionError) as caught:
        assert_precision_safe(configs / "wgan_gp_fp16_underflow.yaml", dtypes=("fp16",), device="cpu")
    assert "first issue: underflow in input-grad at critic.net.16 · convolution_backward" in str(caught.value)
    assert "fix: gp-fp32" in str(caught.value)
    report = assert_precision_safe(configs / "healthy_dcgan.yaml", dtypes=("bf16",), steps=1, device="cpu")
    assert [r.status.value for r in report.runs] == ["ok"]

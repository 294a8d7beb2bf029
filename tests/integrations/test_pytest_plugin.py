"""The pytest plugin: `pytest --nanprobe CONFIG...` runs one test per config and precision."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomllib
import yaml

import nanprobe.api
from tests.conftest import base_doc, merge, plugin_args

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


pytestmark = pytest.mark.usefixtures("warm_pytester_imports")


def _tiny(pytester: pytest.Pytester, name: str = "tiny.yaml", **patch) -> Path:
    doc = merge(base_doc(), {"precision": {"dtypes": ["fp16", "bf16"]}, **patch})
    path = pytester.path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_entry_point_registers_the_plugin_module():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["entry-points"]["pytest11"] == {"nanprobe": "nanprobe.integrations.pytest_plugin"}


def test_healthy_passes_and_underflowing_penalty_fails_with_culprit_and_fix(pytester):
    for name in ("models.py", "healthy_dcgan.yaml", "wgan_gp_fp16_underflow.yaml"):
        shutil.copy(CONFIGS / name, pytester.path / name)
    result = pytester.runpytest(*plugin_args(), "--nanprobe", "--nanprobe-dtypes", "fp16", "--nanprobe-steps", "1",
                                "--nanprobe-device", "cpu", "healthy_dcgan.yaml", "wgan_gp_fp16_underflow.yaml",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*_ wgan_gp_fp16_underflow.yaml fp16 _*",
        "fp16 (amp): nan",
        "first issue: underflow in input-grad at critic.net.* · convolution_backward (ConvolutionBackward0), "
        "step 0, models.py:*",
        "fix: gp-fp32  Compute the gradient penalty outside autocast, in fp32 (in the config: loss.gp_precision: fp32)",
        "FAILED wgan_gp_fp16_underflow.yaml::fp16 - fp16 (amp): nan*",
    ])
    # The failure is the verdict, not a traceback through nanprobe or pytest.
    assert "Traceback" not in out and "pytest_plugin.py" not in out and "raise " not in out


def test_one_item_per_precision_and_one_diagnosis_per_config(pytester, monkeypatch):
    calls = []
    real = nanprobe.api.diagnose

    def counting(path, **overrides):
        calls.append((Path(path).name, overrides["dtypes"]))
        return real(path, **overrides)

    monkeypatch.setattr(nanprobe.api, "diagnose", counting)
    config = _tiny(pytester)
    result = pytester.runpytest(*plugin_args(), "--nanprobe", str(config), "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*tiny.yaml::fp16 PASSED*", "*tiny.yaml::bf16 PASSED*"])
    assert calls == [("tiny.yaml", ["fp16", "bf16"])]


def test_deselected_precisions_are_not_replayed(pytester, monkeypatch):
    calls = []
    real = nanprobe.api.diagnose
    monkeypatch.setattr(nanprobe.api, "diagnose", lambda path, **o: calls.append(o["dtypes"]) or real(path, **o))
    config = _tiny(pytester)
    result = pytester.runpytest(*plugin_args(), "--nanprobe", str(config), "-k", "bf16", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=1)
    assert calls == [["bf16"]]


def test_a_folder_on_the_command_line_collects_its_configs(pytester):
    folder = pytester.mkdir("checks")
    _tiny(pytester, "checks/a.yaml", precision={"dtypes": ["bf16"]})
    _tiny(pytester, "checks/b.yml", precision={"dtypes": ["bf16"]})
    result = pytester.runpytest(*plugin_args(), "--nanprobe", str(folder), "--collect-only", "-q",
                                "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["checks/a.yaml::bf16", "checks/b.yml::bf16"])


def test_yaml_not_named_on_the_command_line_is_not_collected(pytester):
    # With no arguments pytest walks the rootdir; a YAML found there may be anything.
    _tiny(pytester, "ci.yaml")
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = pytester.runpytest(*plugin_args(), "--nanprobe", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_bad_config_fails_with_one_line_and_no_traceback(pytester):
    config = pytester.path / "typo.yaml"
    config.write_text("model:\n  critc: models.py:Critic\n", encoding="utf-8")
    result = pytester.runpytest(*plugin_args(), "--nanprobe", str(config), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["nanprobe: error: unknown key 'model.critc'; did you mean 'critic'?"])
    assert "Traceback" not in result.stdout.str()


def test_user_code_error_during_replay_fails_with_one_line(pytester):
    config = _tiny(pytester, model={"critic": base_doc()["model"]["critic"].replace("TinyCritic", "RaisingCritic")})
    result = pytester.runpytest(*plugin_args(), "--nanprobe", str(config), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["nanprobe: error: building RaisingCritic raised RuntimeError: "
                                 "RaisingCritic refuses to build (*tiny_models.py:*)"])


@pytest.mark.parametrize("value, error", [
    (" , ", "--nanprobe-dtypes: give one or more of fp32, fp16, bf16, separated by commas"),
    ("fp16,fp8", "--nanprobe-dtypes: unknown precision 'fp8'; use fp32, fp16 or bf16"),
])
def test_bad_dtypes_option_is_a_usage_error(pytester, value, error):
    config = _tiny(pytester)
    result = pytester.runpytest(*plugin_args(), "--nanprobe", "--nanprobe-dtypes", value, str(config))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{error}*"])


def test_without_the_option_nothing_changes_and_torch_is_not_imported(pytester, monkeypatch):
    # The plugin is loaded in every pytest run of anyone who installs nanprobe.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    _tiny(pytester, "ci.yaml")
    pytester.makepyfile(test_plain="import sys\n\ndef test_no_torch():\n    assert 'torch' not in sys.modules\n")
    # --nanprobe-fail-on is accepted only if the plugin was loaded.
    result = pytester.runpytest_subprocess(*plugin_args(), "--nanprobe-fail-on", "nan", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)

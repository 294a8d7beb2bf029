"""The pytest plugin on a config whose step raises in the low precisions: those items fail with the
error, the user's line and the fix; fp32's item still passes."""
from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest
import yaml

import nanprobe.api
from nanprobe.integrations import pytest_plugin
from tests.conftest import FIXTURES, base_doc, line_of, merge

pytest_plugins = ["pytester"]

BCE = FIXTURES / "bce_gan.py"


@pytest.fixture(scope="module", autouse=True)
def _warm_imports(tmp_path_factory):
    # pytester's in-process runs drop the modules they imported; torch's lazily imported parts refuse
    # to be registered twice, so import them here, once, first.
    path = tmp_path_factory.mktemp("warm") / "tiny.yaml"
    path.write_text(yaml.safe_dump(merge(base_doc(), {"precision": {"dtypes": ["fp16", "bf16"]}})), encoding="utf-8")
    nanprobe.api.diagnose(path)


def _plugin() -> list[str]:
    # Installed, pytest loads the plugin by itself (unless autoloading is off) and refuses a second -p.
    installed = any(ep.value.endswith("pytest_plugin") and ep.name == "nanprobe"
                    for ep in entry_points(group="pytest11"))
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    return [] if installed and autoload else ["-p", pytest_plugin.__name__]


def test_bce_under_autocast_fails_fp16_and_bf16_with_the_error_and_passes_fp32(pytester):
    doc = {
        "model": {"critic": f"{BCE}:Discriminator", "generator": f"{BCE}:Generator", "latent_dim": 8},
        "data": {"shape": [3, 8, 8], "batch_size": 4},
        "loss": {"step": f"{BCE}:discriminator_step"},
        "train": {"steps": 1},
        "precision": {"dtypes": ["fp32", "fp16", "bf16"]},
        "device": "cpu",
    }
    config = pytester.path / "bce.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    # --nanprobe-fail-on nan: an error fails at the most lenient level too.
    result = pytester.runpytest(*_plugin(), "--nanprobe", "--nanprobe-fail-on", "nan", str(config),
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    line = line_of(BCE, "real_loss = adversarial_loss")
    result.stdout.fnmatch_lines([
        "fp16 (amp): error",
        f"error: RuntimeError in forward at torch.nn.functional.binary_cross_entropy, step 0, *bce_gan.py:{line}: "
        "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.",
        "fix: logits-loss  *",
    ])
    assert "Traceback" not in result.stdout.str()

"""The pytest plugin on a config whose step raises in the low precisions: those items fail with the
error, the user's line and the fix; fp32's item still passes."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import FIXTURES, line_of, plugin_args

pytest_plugins = ["pytester"]

BCE = FIXTURES / "bce_gan.py"

pytestmark = pytest.mark.usefixtures("warm_pytester_imports")


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
    result = pytester.runpytest(*plugin_args(), "--nanprobe", "--nanprobe-fail-on", "nan", str(config),
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

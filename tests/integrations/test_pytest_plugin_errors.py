"""The pytest plugin on a config whose step raises in the low precisions: those items fail with the
error, the user's line and the fix; fp32's item still passes."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import BCE_GAN, bce_gan_doc, line_of, plugin_args

pytest_plugins = ["pytester"]


pytestmark = pytest.mark.usefixtures("warm_pytester_imports")


def test_bce_under_autocast_fails_fp16_and_bf16_with_the_error_and_passes_fp32(pytester):
    doc = bce_gan_doc()
    config = pytester.path / "bce.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    # --nanprobe-fail-on nan: an error fails at the most lenient level too.
    result = pytester.runpytest(*plugin_args(), "--nanprobe", "--nanprobe-fail-on", "nan", str(config),
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    line = line_of(BCE_GAN, "real_loss = adversarial_loss")
    result.stdout.fnmatch_lines([
        "fp16 (amp): error",
        f"error: RuntimeError in forward at torch.nn.functional.binary_cross_entropy, step 0, *bce_gan.py:{line}: "
        "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.",
        "fix: logits-loss  *",
    ])
    assert "Traceback" not in result.stdout.str()

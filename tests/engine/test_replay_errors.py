"""A replay that raises inside the user's model, from Python: that precision is `error` with the
exception and the user's line; the precisions that run are reported as usual."""
from __future__ import annotations

import pytest

import nanprobe
from nanprobe.enums import Phase, Precision, Status
from tests.conftest import FIXTURES, line_of

SVD = FIXTURES / "svd_critic.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from nanprobe.io.config import Config, DataConfig, LossConfig, ModelConfig, PrecisionConfig
    from tests.conftest import load_fixture_module

    models = load_fixture_module(SVD)
    # .half() on a critic whose forward takes an exact SVD: CPU linalg has no fp16/bf16 kernels.
    config = Config(model=ModelConfig(critic=models.Critic()), data=DataConfig(shape=(3, 8, 8), batch_size=4),
                    loss=LossConfig(kind="hinge"), precision=PrecisionConfig(dtypes=(Precision.FP32, Precision.FP16,
                                                                                    Precision.BF16), mode="half"),
                    device="cpu")
    return nanprobe.diagnose(config, steps=2)


def test_the_low_precisions_are_errors_at_the_users_line_and_fp32_is_reported(report):
    fp32, fp16, bf16 = report.runs
    assert fp32.status is Status.OK and len(fp32.metrics) == 2 and fp32.error is None
    line = f"svd_critic.py:{line_of(SVD, 'matrix_norm')}"
    for run in (fp16, bf16):
        assert run.status is Status.ERROR and run.precision_problem
        e = run.error
        assert e.exception == "RuntimeError" and "Low precision dtypes not supported" in e.message
        assert e.source.endswith(line) and (e.phase, e.step) == (Phase.FORWARD, 0)
        assert "step raised at step 0; later steps not replayed" in " ".join(run.notes)
    # Neither low precision runs it, so neither is offered as the fix for the other.
    assert "bf16" not in [f.id for f in fp16.fixes]
    assert report.worst is Status.ERROR

"""NanProbeCallback: nanprobe.watch inside a Lightning Trainer (skipped without Lightning)."""
from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning")

import nanprobe  # noqa: E402
from nanprobe.integrations.lightning import NanProbeCallback  # noqa: E402
from tests.conftest import FIXTURES, load_fixture_module  # noqa: E402

steps = load_fixture_module(FIXTURES / "watch_steps.py")
LATENT = 8


class CriticModule(L.LightningModule):
    """Trains the critic only, drawing z first as GAN modules do."""

    def __init__(self, tiny, loss_fn):
        super().__init__()
        torch.manual_seed(0)
        self.critic, self.generator = tiny.TinyCritic(), tiny.TinyGenerator()
        self.loss_fn = loss_fn
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (real,) = batch
        z = torch.randn(real.size(0), LATENT)
        out = self.loss_fn(self.critic, self.generator, real, z)
        loss = out["loss"] if isinstance(out, dict) else out
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.critic.parameters(), lr=1e-3, betas=(0.0, 0.9))


def fit(module, callback, tmp_path, steps_: int = 3):
    data = torch.utils.data.TensorDataset(torch.rand(4 * steps_, 3, 8, 8) * 2 - 1)
    trainer = L.Trainer(max_steps=steps_, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))


def test_healthy_training_is_watched_and_left_alone(tiny, tmp_path):
    module = CriticModule(tiny, steps.penalty_step)
    callback = NanProbeCallback(loss=steps.penalty_step, latent_dim=LATENT)
    fit(module, callback, tmp_path)
    assert (callback.watch.steps, callback.watch.failures) == (3, 0)
    assert len(module.losses) == 3
    # The recorded step replays to the loss the trainer saw: z drawn again from the RNG state.
    (run,) = nanprobe.diagnose(callback.watch.config()).runs
    assert run.metrics[0].loss == pytest.approx(module.losses[-1], rel=1e-6)


def test_a_nan_step_stops_training_with_the_diagnosis(tiny, tmp_path):
    module = CriticModule(tiny, steps.zero_norm_step)
    callback = NanProbeCallback(loss=steps.zero_norm_step, latent_dim=LATENT)
    with pytest.raises(nanprobe.NonFiniteError, match="step 0 turned non-finite") as info:
        fit(module, callback, tmp_path)
    (run,) = info.value.report.runs
    assert run.status.value == "nan" and run.first_nonfinite.node == "SqrtBackward0"
    assert len(module.losses) == 1


def test_under_a_ddp_strategy_every_rank_stops_at_the_faulty_step(tmp_path):
    """torchrun, strategy="ddp" on gloo: rank 1 alone overflows fp16; both ranks stop at that step, naming it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(FIXTURES / "lightning_ddp_train.py"), str(tmp_path), "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["step"], r["ranks"]) for r in results] == [(2, [1]), (2, [1])]
    culprit = results[1]["culprit"]
    assert (culprit["phase"], culprit["module"], culprit["kind"]) == ("forward", "critic.net.0", "overflow")
    assert "on rank 1 of 2 (critic output" in results[0]["message"]

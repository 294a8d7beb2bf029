"""nanprobe.watch as a PyTorch Lightning callback: `Trainer(callbacks=[NanProbeCallback(loss=critic_loss)])`.

Needs `pip install nanprobe[lightning]`. Each training batch is one watched step: the callback keeps
the batch, the RNG state and the critic's state before `training_step`, checks the loss it returns,
the gradients and the weights after the optimizer step, and on a non-finite step replays it under
the probe. The replay runs `loss(critic, generator, real, z)`; z is not visible to a callback, so
the replay draws it from the recorded RNG state: pass latent_dim= when training_step begins with
`z = torch.randn(len(real), *latent_dim)`, as GAN modules usually do.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment, unused-ignore]  # same class
    except ImportError:
        raise ImportError("nanprobe.integrations.lightning needs Lightning: "
                          "pip install 'nanprobe[lightning]'") from None

from nanprobe.integrations.watch import Watch


def _first_tensor(batch: Any):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class NanProbeCallback(Callback):
    """Watch the LightningModule's critic steps with nanprobe.watch (options as for nanprobe.watch)."""

    def __init__(self, critic: str = "critic", generator: str | None = "generator", optimizer_index: int = 0,
                 real: Callable[[Any], Any] = _first_tensor, **watch_options):
        self.critic_attr, self.generator_attr, self.optimizer_index = critic, generator, optimizer_index
        self.real = real
        self.options = watch_options
        self.watch: Watch | None = None
        """The Watch, created at the first batch (its .failure holds the diagnosis)."""
        self._step = None

    def _make_watch(self, trainer, pl_module) -> Watch:
        from nanprobe.errors import ConfigError

        critic = getattr(pl_module, self.critic_attr, None)
        if critic is None:
            raise ConfigError(f"NanProbeCallback: the LightningModule has no attribute '{self.critic_attr}'; "
                              "pass critic='<attribute holding the critic>'")
        generator = getattr(pl_module, self.generator_attr, None) if self.generator_attr else None
        optimizers = trainer.optimizers
        optimizer = optimizers[self.optimizer_index] if len(optimizers) > self.optimizer_index else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return Watch(critic, generator, optimizer, scaler, **self.options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.watch is None:
            self.watch = self._make_watch(trainer, pl_module)
        self._step = self.watch.step(self.real(batch))
        self._step.__enter__()  # type: ignore[attr-defined]  # _step was just set

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.loss = outputs
            step.__exit__(None, None, None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.watch is not None:
            self.watch.close()

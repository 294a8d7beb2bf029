"""Always-on watch for live training: a cheap check per step, the full probe only for a step that fails.

Per step the watch keeps what it needs to replay that step exactly (the batch, z, the RNG state,
and copies of the critic, optimizer and scaler state from before the step, refreshed in place in
preallocated buffers; the generator, which a critic step does not change, is read when a step fails), and after the step reads one flag per quantity (loss, gradients,
weights, loss scale) in a single host synchronisation. Only when a step turns non-finite does it
build a Config of that step and run `diagnose` on it (fp32 and the step's precision, op by op).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nanprobe.io import config as cfg
from nanprobe.enums import Mode, OnNan, Precision
from nanprobe.engine import compat
from nanprobe.errors import ConfigError, NonFiniteError, NonFiniteWarning
from nanprobe.model.report import Report

_OPTIMIZERS = ((torch.optim.AdamW, "adamw"), (torch.optim.Adam, "adam"), (torch.optim.SGD, "sgd"),
               (torch.optim.RMSprop, "rmsprop"))
# The replay names each parameter in optimizer findings, so it steps one parameter at a time.
_REPLAY_GROUP = {"foreach": False, "fused": None, "capturable": False, "differentiable": False}


@dataclass(frozen=True)
class Failure:
    """The first watched step that turned non-finite."""

    step: int
    """Index of the watched step (0-based count of `.step()` calls)."""
    reason: str
    """What was non-finite: loss, gradients, weights, or a loss scale that kept falling."""
    report: Report | None
    """The diagnosis of the step (None when on_nan="dump" left it for later)."""
    dump: Path | None
    """The folder the step was written to, if any."""
    message: str
    """The one-paragraph verdict that was raised or warned."""


class _Buffers:
    """Copies of a list of tensors, refreshed in place every step (no allocation once warm)."""

    def __init__(self) -> None:
        self.keys: list = []
        self.bufs: list[torch.Tensor] = []

    def take(self, keys: list, tensors: list[torch.Tensor]) -> None:
        if keys != self.keys or any(b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                                    for b, t in zip(self.bufs, tensors)):
            self.keys, self.bufs = list(keys), [torch.empty_like(t) for t in tensors]
        if self.bufs:
            compat.foreach_copy_(self.bufs, tensors)

    def as_dict(self) -> dict:
        return {k: b.clone() for k, b in zip(self.keys, self.bufs)}


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """The exact check, run only when a norm was not finite (huge finite values can overflow a norm)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in tensors)


def _loss_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, dict):
        out = out.get("loss")
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) and out.is_floating_point() else None


class _Step:
    """One watched step, as a context manager; set `.loss` inside it to have the loss checked too."""

    def __init__(self, watch: "Watch", real: torch.Tensor, z: torch.Tensor | None):
        self.watch, self.real, self.z = watch, real, z
        self.loss: Any = None

    def __enter__(self) -> "_Step":
        self.watch._begin(self.real, self.z)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.watch._end(self.loss)
        else:
            self.watch._abort()
        return False


class Watch:
    """Watches a critic's training steps; see `watch()` for the arguments."""

    def __init__(self, critic: torch.nn.Module, generator: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, *,
                 loss: str | Callable = "wgan-gp", gp_weight: float = 10.0, gp_precision: str = "autocast",
                 gp_norm: str = "sqrt", precision: str | Precision | None = None, on_nan: str | OnNan = "raise",
                 dump_dir: str | Path | None = None, latent_dim: int | tuple | None = None,
                 grad_clip: float | None = None, max_skips: int = 8,
                 critic_ref: str | None = None, critic_args: dict | None = None,
                 generator_ref: str | None = None, generator_args: dict | None = None, loss_ref: str | None = None):
        if not isinstance(critic, torch.nn.Module):
            raise ConfigError(f"nanprobe.watch: critic must be an nn.Module, got {type(critic).__name__}")
        if generator is not None and not isinstance(generator, torch.nn.Module):
            raise ConfigError(f"nanprobe.watch: generator must be an nn.Module or None, got {type(generator).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"nanprobe.watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise ConfigError(f"nanprobe.watch: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        try:
            self.on_nan = OnNan(on_nan)
        except ValueError:
            raise ConfigError(f"nanprobe.watch: on_nan must be one of raise, warn, dump, got {on_nan!r}") from None
        if self.on_nan is OnNan.DUMP and dump_dir is None:
            raise ConfigError("nanprobe.watch: on_nan='dump' needs dump_dir, the folder to write failing steps to")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ConfigError(f"nanprobe.watch: max_skips must be an integer >= 0, got {max_skips!r}")
        self.critic, self.generator, self.optimizer, self.scaler = critic, generator, optimizer, scaler
        self.loss_fn = loss if callable(loss) else None
        # The same checks as a config: a bad loss kind or penalty setting fails here, not hours in.
        self._loss = cfg.check(cfg.Config(model=cfg.ModelConfig(critic=critic), loss=cfg.LossConfig(
            kind=loss if isinstance(loss, str) else "wgan-gp", gp_weight=gp_weight, gp_precision=gp_precision,
            gp_norm=gp_norm, step=self.loss_fn))).loss
        if self.loss_fn is not None:
            from nanprobe.io import loading
            loading.load_step(cfg.Config(model=cfg.ModelConfig(critic=critic), loss=self._loss))
        self.precision = cfg.check_dtypes(precision, "precision")[0] if precision is not None else None
        self.latent_dim = cfg.check_shape(1)(latent_dim, "latent_dim") if latent_dim is not None else None
        self.grad_clip = cfg.check_clip(grad_clip, "grad_clip")
        self.max_skips = max_skips
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.refs = None
        if self.dump_dir is not None:
            from nanprobe.io import dump
            # Resolved now, so a dump that could not be replayed elsewhere fails at start, not hours in.
            self.refs = dump.references(critic, generator, self.loss_fn, critic_ref, critic_args,
                                        generator_ref, generator_args, loss_ref)
        self.steps = 0
        """Steps watched so far."""
        self.skipped = 0
        """Steps the GradScaler skipped (and training recovered from)."""
        self.failures = 0
        """Non-finite steps; only the first is diagnosed or dumped."""
        self.failure: Failure | None = None
        """The first non-finite step, once there is one."""
        self._skips_in_row = 0
        self._active = False
        self._hook = None
        self._seen: tuple[Mode, Precision] | None = None
        self._critic_buf, self._opt_buf = _Buffers(), _Buffers()
        self._opt_values: dict = {}
        self._scale_before: float | torch.Tensor | None = None
        self._tracker_before: torch.Tensor | None = None

    # ---- the public API

    def step(self, *args, real: torch.Tensor | None = None, z: torch.Tensor | None = None, **kwargs):
        """`with w.step(real, z):` around a training step, or `w.step(fn, real, z)` to call fn(real, z) watched."""
        if args and callable(args[0]) and not isinstance(args[0], torch.Tensor):
            fn, rest = args[0], args[1:]
            call_kw = dict(kwargs, **({"real": real} if real is not None else {}), **({"z": z} if z is not None else {}))
            real_ = rest[0] if rest else real
            z_ = rest[1] if len(rest) > 1 else z
            with _Step(self, real_, z_) as s:
                out = fn(*rest, **call_kw)
                s.loss = out
            return out
        if kwargs:
            raise TypeError(f"watch.step() got unexpected keyword arguments {', '.join(kwargs)}")
        return _Step(self, args[0] if args else real, args[1] if len(args) > 1 else z)

    def close(self) -> None:
        """Remove the watch's hook (only present mid-step); the watch keeps no other hold on the models."""
        self._abort()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # ---- per step

    def _device(self) -> torch.device:
        p = next(self.critic.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _begin(self, real, z) -> None:
        if self._active:
            raise ConfigError("nanprobe.watch: step() is already running; watched steps do not nest")
        if not isinstance(real, torch.Tensor) or real.dim() < 2:
            raise ConfigError(f"nanprobe.watch: step() needs the real batch as a tensor [B, ...], got {type(real).__name__}")
        if z is not None and not isinstance(z, torch.Tensor):
            raise ConfigError(f"nanprobe.watch: z must be a tensor or None, got {type(z).__name__}")
        if z is None and self.generator is not None and self.latent_dim is None:
            raise ConfigError("nanprobe.watch: pass z to step(real, z), or latent_dim to watch() when the step draws "
                              "z itself as its first random numbers")
        self._real = real.detach().clone()
        self._z = z.detach().clone() if z is not None else None
        self._rng = torch.get_rng_state()
        device = self._device()
        self._cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        with torch.no_grad():
            self._snapshot()
        self._seen = None
        if self.precision is None:
            self._hook = self.critic.register_forward_pre_hook(_precision_hook(self, self.critic))
        self._active = True

    def _snapshot(self) -> None:
        sd = self.critic.state_dict(keep_vars=True)
        self._critic_buf.take(list(sd), list(sd.values()))
        if self.optimizer is not None:
            keys, tensors, values = [], [], {}
            i = 0
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    for k, v in self.optimizer.state.get(p, {}).items():
                        if isinstance(v, torch.Tensor):
                            keys.append((i, k))
                            tensors.append(v)
                        else:
                            values[(i, k)] = v
                    i += 1
            self._opt_buf.take(keys, tensors)
            self._opt_values = values
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled():
            scale = getattr(scaler, "_scale", None)
            if scale is None:  # not used yet: the first step starts from the initial scale
                self._scale_before, self._tracker_before = float(scaler._init_scale), None
            else:
                if not isinstance(self._scale_before, torch.Tensor) or self._scale_before.device != scale.device:
                    self._scale_before = torch.empty_like(scale)
                    self._tracker_before = torch.empty_like(compat.scaler_growth_tracker(scaler))
                self._scale_before.copy_(scale)
                self._tracker_before.copy_(compat.scaler_growth_tracker(scaler))

    def _abort(self) -> None:
        self._active = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _end(self, out: Any) -> None:
        self._abort()
        step, self.steps = self.steps, self.steps + 1
        device = self._device()
        loss = _loss_tensor(out)
        params = list(self.critic.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        with torch.no_grad():
            # 2-norms: one fused pass per list (the inf-norm is ~30x slower on the CPU); NaN and inf
            # propagate, and a norm that overflows from finite values is told apart below.
            vals = [torch.nn.utils.get_total_norm(params, 2.0),
                    torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros(())]
            vals.append(loss.detach().float().sum() if loss is not None else torch.zeros(()))
            after = getattr(scaler, "_scale", None) if scaler is not None else None
            vals.append(after.reshape(()) if after is not None else torch.zeros(()))
            before = self._scale_before if scaler is not None else None
            vals.append(before.reshape(()) if isinstance(before, torch.Tensor) else torch.full((), float(before or 0)))
            weights, grad, loss_v, scale_after, scale_before = torch.stack(
                [v.to(device=device, dtype=torch.float32) for v in vals]).tolist()  # the one host sync
        bad = [name for name, v, tensors in (("loss", loss_v, None), ("gradients", grad, grads), ("weights", weights, params))
               if not math.isfinite(v) and (tensors is None or not _all_finite(tensors))]
        if scaler is not None and after is not None and scale_after < scale_before:
            self.skipped += 1
            self._skips_in_row += 1
            if "weights" not in bad:
                if self._skips_in_row <= self.max_skips:
                    return  # loss scaling skipped the step on purpose; training goes on at a lower scale
                self._fail(step, f"the GradScaler skipped {self._skips_in_row} steps in a row (scale now {scale_after:g})")
                return
        elif not bad:
            self._skips_in_row = 0
            return
        self._fail(step, f"{', '.join(bad)} non-finite")

    # ---- a failing step

    def _fail(self, step: int, reason: str) -> None:
        self.failures += 1
        if self.failure is not None:
            return  # the first failure was reported; later ones usually follow from it
        config = self.config()
        folder = None
        if self.dump_dir is not None:
            from nanprobe.io import dump
            folder = dump.write(self.dump_dir, step, config, self.refs)
        where = f"; dumped to {folder} (replay it with: nanprobe diagnose {folder / 'config.yaml'})" if folder else ""
        head = f"nanprobe.watch: step {step} turned non-finite ({reason}){where}."
        if self.on_nan is OnNan.DUMP:
            self.failure = Failure(step, reason, None, folder, head)
            warnings.warn(head, NonFiniteWarning, stacklevel=4)
            return
        from nanprobe.model.verdict import verdict

        report = self._diagnose(config)
        message = f"{head} Replayed under the probe: {verdict(report, config.precision.dtypes[-1])}"
        self.failure = Failure(step, reason, report, folder, message)
        if self.on_nan is OnNan.RAISE:
            raise NonFiniteError(message, self.failure)
        warnings.warn(message, NonFiniteWarning, stacklevel=4)

    def _precision(self) -> tuple[Mode, Precision]:
        if self.precision is not None:
            half = next((p for p in self.critic.parameters()), torch.zeros(())).dtype != torch.float32
            return (Mode.HALF if half and self.precision.is_low else Mode.AMP), self.precision
        return self._seen or (Mode.AMP, Precision.FP32)

    def config(self) -> cfg.Config:
        """The last watched step as a Config that `nanprobe.diagnose` replays exactly (tensors in memory)."""
        if not hasattr(self, "_real"):
            raise ConfigError("nanprobe.watch: no step has been watched yet; config() describes the last one")
        mode, precision = self._precision()
        dtypes = (Precision.FP32,) if precision is Precision.FP32 else (Precision.FP32, precision)
        checkpoint = {"critic": self._critic_buf.as_dict()}
        if self.generator is not None:
            # A critic step does not change the generator (a train-mode forward updates BatchNorm's
            # running statistics, which train mode does not use), so it is read now, not copied per step.
            checkpoint["generator"] = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
        train, opt_state = self._optimizer()
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        latent = tuple(self._z.shape[1:]) if self._z is not None else (self.latent_dim or (1,))
        rng = {"cpu": self._rng, **({"cuda": self._cuda_rng} if self._cuda_rng is not None else {})}
        return cfg.check(cfg.Config(
            model=cfg.ModelConfig(critic=self.critic, generator=self.generator, latent_dim=latent, checkpoint=checkpoint),
            data=cfg.DataConfig(source="file", path=self._real, shape=tuple(self._real.shape[1:]),
                                batch_size=self._real.shape[0]),
            loss=self._loss,
            train=cfg.TrainConfig(**train, steps=1, grad_scaler=scaler is not None, grad_clip=self.grad_clip),
            precision=cfg.PrecisionConfig(mode=mode, dtypes=dtypes),
            state=cfg.StateConfig(z=self._z, rng=rng, optimizer=opt_state,
                                  scaler=self._scaler_state() if scaler is not None else None),
            device=self._device().type, seed=0, base_dir=Path.cwd()))

    def _optimizer(self) -> tuple[dict, dict | None]:
        """The replay's train settings from the user's optimizer, and its state before the step when it fits."""
        opt = self.optimizer
        if opt is None:
            return {}, None
        name = next((n for c, n in _OPTIMIZERS if type(opt) is c), None)
        g = opt.param_groups[0]
        train = {"optimizer": name or "adam", "lr": float(g["lr"]), "eps": float(g.get("eps", 1e-8)),
                 "weight_decay": float(g.get("weight_decay", 0.0))}
        if "betas" in g:
            train["betas"] = tuple(float(b) for b in g["betas"])
        elif "momentum" in g:
            train["betas"] = (float(g["momentum"]), 0.9)
        critic_params = [id(p) for p in self.critic.parameters()]
        if name is None or len(opt.param_groups) != 1 or [id(p) for p in g["params"]] != critic_params:
            return train, None  # the replay's optimizer (one group over the critic) could not take this state
        state: dict = {}
        for (i, k), v in {**self._opt_buf.as_dict(), **self._opt_values}.items():
            state.setdefault(i, {})[k] = v
        group = {k: v for k, v in g.items() if k != "params"}
        group.update({k: v for k, v in _REPLAY_GROUP.items() if k in group}, params=list(range(len(critic_params))))
        return train, {"state": state, "param_groups": [group]}

    def _scaler_state(self) -> dict:
        sd = dict(self.scaler.state_dict())
        before = self._scale_before
        sd["scale"] = float(before) if before is not None else float(self.scaler._init_scale)
        sd[compat.GROWTH_TRACKER_KEY] = int(self._tracker_before) if isinstance(self._tracker_before, torch.Tensor) else 0
        return sd

    def _diagnose(self, config: cfg.Config) -> Report:
        from nanprobe import api

        device = self._device()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            # The replay sets its own precision and seeds; the training loop's must be as it left them.
            with torch.autocast(device.type, enabled=False), torch.enable_grad():
                return api.diagnose(config)
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)


def _precision_hook(watch: Watch, critic: torch.nn.Module):
    # A plain function, not a bound method: copy.deepcopy treats functions as atoms, so a copy of the
    # critic made while the hook is on would not drag the watch along.
    def hook(module, args):
        if module is not critic or not watch._active or watch._seen is not None:
            return
        device = watch._device()
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
            watch._seen = (Mode.AMP, {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}.get(dtype, Precision.FP32))
        else:
            dtype = next(module.parameters(), torch.zeros(())).dtype
            low = {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}.get(dtype)
            watch._seen = (Mode.HALF, low) if low else (Mode.AMP, Precision.FP32)

    return hook


def watch(critic: torch.nn.Module, generator: torch.nn.Module | None = None,
          optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, **options) -> Watch:
    """Watch a critic's training steps; diagnose, warn about or dump the first one that turns non-finite.

    Use `with w.step(real, z): <your step>` (set `.loss` on the yielded object to check the loss too) or
    `w.step(train_step, real, z)`. The replay of a failing step runs `loss` (a built-in kind or your
    function `(critic, generator, real, z) -> loss or {"loss": ...}`) from the state before the step.
    Options: loss, gp_weight, gp_precision, gp_norm, precision (None: read from the autocast around the
    critic's first forward), on_nan ("raise" | "warn" | "dump"), dump_dir, latent_dim, grad_clip,
    max_skips (GradScaler skips in a row that still count as recovering), critic_ref/critic_args,
    generator_ref/generator_args, loss_ref (how a dump's config names your code).
    """
    return Watch(critic, generator, optimizer, scaler, **options)

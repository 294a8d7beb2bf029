"""Replaying critic steps in one precision, under the probe.

Every precision starts from the same weights, seed and batches, so its ops line up with the
fp32 replay's. A step that GradScaler skips is retried at the lower scale with the same random
numbers (as training would run the next step), and only a skip that persists counts.

The same random numbers means every global generator a user's step may draw from: torch's (CPU
and CUDA), numpy's legacy global one (`np.random.uniform`, as PyTorch-GAN's penalty draws alpha)
and Python's `random`. Each replay starts from the seed's state of all of them and hands the
caller's own states back when it ends.
"""
from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanprobe.engine import fp32_modules, precisions, updates
from nanprobe.engine import stats as st
from nanprobe.engine._emulate import emulated_kernels
from nanprobe.engine.losses import StepContext, builtin
from nanprobe.engine.probe import OpEvent, OpProbe, user_source
from nanprobe.engine.scaling import RecipeWatch, takes_scaler
from nanprobe.enums import Framework, Kernels, Mode, Phase, Precision
from nanprobe.errors import ConfigError, DeviceError, UserCodeError
from nanprobe.io.config import Config, resolve
from nanprobe.io.loading import Loaded, seed_all
from nanprobe.model.report import ReplayError, StepMetrics

MAX_SCALER_RETRIES = 24  # GradScaler halves per skip: 65536 * 2**-24 ~ 4e-3, far below any useful scale
PERSISTENT_REPEATS = 4  # the same op making the same number of infs after this many halvings: no scale helps


@dataclass(frozen=True)
class RandomState:
    """The state of every global generator a step may draw from, captured at one moment."""

    torch_cpu: torch.Tensor
    """torch.get_rng_state()."""
    torch_cuda: tuple | None
    """torch.cuda.get_rng_state_all(), or None when CUDA was not initialised (nothing drew from it yet)."""
    numpy: tuple
    """numpy.random.get_state(): the legacy global generator behind np.random.uniform, np.random.random, ..."""
    python: tuple
    """random.getstate()."""
    seed: int | None = None
    """The seed the state came from (seeded()), so a CUDA generator initialised later gets it too."""

    @classmethod
    def capture(cls, seed: int | None = None) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), None if cuda is None else tuple(cuda), np.random.get_state(),  # type: ignore[arg-type]  # legacy get_state(): a tuple
                   random.getstate(), seed)

    @classmethod
    def seeded(cls, seed: int) -> RandomState:
        """Every generator seeded with `seed` (torch on every device), as captured right after."""
        seed_all(seed)
        return cls.capture(seed)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        elif self.seed is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(self.seed)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


@contextmanager
def caller_random_state() -> Iterator[None]:
    """Whatever runs inside may seed and draw; the caller's generators are as they were afterwards."""
    saved = RandomState.capture()
    try:
        yield
    finally:
        saved.restore()


@contextmanager
def _deterministic_kernels(device: torch.device) -> Iterator[None]:
    """cuDNN's deterministic algorithms for the replay (its autotuned ones may differ run to run); the
    caller's settings afterwards."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


@dataclass
class Trace:
    """What one precision's replay produced (internal; the diagnosis turns it into a report)."""

    precision: Precision
    mode: Mode
    events: list[OpEvent]
    metrics: list[StepMetrics] = field(default_factory=list)
    skipped: list[tuple[int, int, float]] = field(default_factory=list)  # (step, attempt, scale)
    stopped: str | None = None
    lost: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)  # step -> param -> (moving, unchanged)
    unscaled_grads: list[tuple[int, str | None]] = field(default_factory=list)  # (step, source) per call
    framework: Framework = Framework.TORCH  # what the models are written in (the fixes' terms)
    error: ReplayError | None = None  # the user's step raised: the replay stopped there
    kernels: Kernels = Kernels.NATIVE  # how the low-precision ops were computed

    def raise_error(self) -> None:
        """Raise the recorded error as a UserCodeError (for callers that cannot report a failed precision)."""
        if self.error is not None:
            e = self.error
            raise UserCodeError(f"the {self.precision.value} replay (step {e.step}, {e.phase.value}) raised {e.line}")


class _Raised(Exception):
    """The user's step raised; carries the ReplayError out of the step loop."""

    def __init__(self, error: ReplayError):
        super().__init__(error.line)
        self.error = error


# torch's own plumbing between a user's call and the function that raised: never named as the op.
_PLUMBING = tuple(os.path.join(*parts) for parts in (
    ("torch", "_ops.py"), ("torch", "overrides.py"), ("torch", "_tensor.py"), ("torch", "autograd", "graph.py"),
    ("torch", "autograd", "__init__.py"), ("torch", "nn", "modules", "module.py"), ("torch", "utils")))
_TORCH_DIR = os.path.dirname(torch.__file__)


def _raising_op(tb) -> str | None:
    """The aten op the probe was running when the exception came (aten.mm.default), else the innermost
    torch function the user's code reached (torch.nn.functional.binary_cross_entropy: autocast refuses
    some ops before any mode sees them)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for f in reversed(frames):
        func = f.f_locals.get("func") if f.f_code.co_name == "__torch_dispatch__" else None
        if func is not None and hasattr(func, "overloadpacket"):
            return str(func)
    for f in reversed(frames):
        path = os.path.abspath(f.f_code.co_filename)
        if not path.startswith(_TORCH_DIR + os.sep) or any(x in path for x in _PLUMBING):
            continue
        name = f.f_code.co_name
        return name if name.startswith("<") else f"{f.f_globals.get('__name__', 'torch')}.{name}"
    return None


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device: cuda was asked for but no CUDA GPU is available here; use device: auto or cpu")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_dtype(device: torch.device, precision: Precision, mode: Mode) -> None:
    """Fail early, with one line, when the device cannot run the precision."""
    if not precision.is_low:
        return
    dt = precision.torch_dtype
    try:
        a = torch.ones(4, 4, device=device)
        if mode is Mode.AMP:
            with torch.autocast(device.type, dtype=dt):
                (a @ a).sum()
        else:
            (a.to(dt) @ a.to(dt)).sum()
    except Exception as exc:
        raise DeviceError(f"precision.dtypes: {precision.value} is not supported on {device.type} "
                          f"in {mode.value} mode ({str(exc).splitlines()[0][:120]}); "
                          "drop it from precision.dtypes") from None


def kernels_for(config: Config, precision: Precision, device: torch.device) -> Kernels:
    """The kernels a replay runs: emulated only for a low precision on the CPU when the config asks for it."""
    if precision.is_low and device.type == "cpu" and config.precision.kernels is Kernels.EMULATED:
        return Kernels.EMULATED
    return Kernels.NATIVE


def make_optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    # foreach=False: one op per parameter, so optimizer findings name the parameter.
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, foreach=False)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, foreach=False)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay, foreach=False)
    return torch.optim.RMSprop(params, lr=t.lr, momentum=t.betas[0], eps=t.eps, weight_decay=t.weight_decay,
                               foreach=False)


def _batch(config: Config, loaded: Loaded, step: int, probe: OpProbe | None) -> torch.Tensor:
    b = config.data.batch_size
    if loaded.data is None:
        lo, hi = config.data.range
        return torch.rand(b, *loaded.sample_shape) * (hi - lo) + lo
    n = loaded.data.shape[0]
    idx = [(step * b + i) % n for i in range(b)]
    if isinstance(loaded.data, torch.Tensor):
        raw = loaded.data[idx].float()
    else:
        raw = torch.from_numpy(np.asarray(loaded.data[idx], dtype=np.float32))
    if probe is not None:
        with probe.paused():
            bad = [idx[i] for i in (~torch.isfinite(raw.flatten(1))).any(1).nonzero().flatten().tolist()]
        path = config.data.path
        where = probe.sources.show(str(resolve(config, path))) if isinstance(path, Path) else "the batch"
        probe.observe(raw, "load", module="data", source=f"{where}[{', '.join(map(str, bad))}]" if bad else where,
                      info={"bad_samples": bad})
    return raw


def first_batch(config: Config, loaded: Loaded) -> torch.Tensor:
    """The real batch of step 0 as the replays see it (fp32, CPU), outside any probe."""
    rng = torch.get_rng_state()
    try:
        return _batch(config, loaded, 0, None)
    finally:
        torch.set_rng_state(rng)  # synthetic data draws from the global generator


def _scalar(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.reshape(())
    raise ConfigError(f"loss.step: {what} must be a scalar float tensor, got "
                      f"{type(value).__name__}{list(value.shape) if isinstance(value, torch.Tensor) else ''}")


def _unpack(result) -> tuple[torch.Tensor, dict]:
    if isinstance(result, dict):
        if "loss" not in result:
            raise ConfigError(f"loss.step: the returned dict has no 'loss' (keys: {', '.join(map(str, result))})")
        loss = _scalar(result["loss"], "the 'loss' it returns")
        extra = {k: v for k, v in result.items() if k != "loss"}
        return loss, extra
    return _scalar(result, "the value it returns"), {}


def _float(v) -> float | None:
    try:
        return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)
    except (TypeError, ValueError, RuntimeError):
        return None


class _Replay:
    def __init__(self, config: Config, loaded: Loaded, precision: Precision, device: torch.device,
                 probe_on: bool, progress: Callable | None, on_record: Callable | None = None,
                 on_grads: Callable | None = None):
        self.config, self.loaded, self.precision, self.device = config, loaded, precision, device
        self.on_grads = on_grads
        self.mode = config.precision.mode
        self.low = precision.is_low
        self.half = self.low and self.mode is Mode.HALF
        self.progress = progress
        strategy = precisions.for_loaded(loaded)
        self.strategy = strategy
        self.model_dtype = strategy.input_dtype(precision, self.mode)
        self.critic, self.generator = strategy.models(precision, self.mode, config.precision.fp32_modules,
                                                      config.model.init, config.seed)
        self.critic.to(device=device)
        if self.generator is not None:
            self.generator.to(device=device)
        models = {"critic": self.critic, "generator": self.generator}
        named = fp32_modules.find(models, config.precision.fp32_modules, strategy.named_modules)
        self.fp32 = named if self.low else {}  # checked in every precision, applied in the low ones
        self.params = strategy.named_parameters("critic", self.critic)
        self.optimizer = make_optimizer(config, list(self.params.values()))
        self.scaler = None
        if config.train.grad_scaler:
            if self.half:
                raise ConfigError("train.grad_scaler: GradScaler needs fp32 weights; use precision.mode: amp, "
                                  "or turn grad_scaler off in half mode")
            self.scaler = torch.amp.GradScaler(device.type)
        self._restore_state()
        self.autocast = strategy.autocast(precision, self.mode, device, config.precision.policy)
        self.op_lists = strategy.op_lists(precision, self.mode, device, config.precision.policy)
        self.step_fn = loaded.step_fn or builtin(StepContext(
            config.loss.kind, config.loss.gp_weight, config.loss.gp_precision == "fp32", config.loss.gp_norm,
            device.type, self.scaler, config.model.generator_call))
        if loaded.step_fn is not None and takes_scaler(loaded.step_fn):  # None when no scaler is on
            user_step = loaded.step_fn
            self.step_fn = lambda critic, generator, real, z: user_step(critic, generator, real, z, scaler=self.scaler)
        self.probe = OpProbe({"critic": self.critic, **({"generator": self.generator} if self.generator else {})},
                             base_dir=str(config.base_dir), on_record=on_record, named=strategy.named_modules,
                             layer_sources=strategy.layer_sources(), library_dirs=strategy.library_dirs()) \
            if probe_on else None
        self.trace = Trace(precision, self.mode, self.probe.events if self.probe else [],
                           framework=strategy.framework, kernels=kernels_for(config, precision, device))
        self.kernels = emulated_kernels if self.trace.kernels is Kernels.EMULATED else nullcontext

    def _restore_state(self) -> None:
        """Optimizer and scaler state captured before the step (state.optimizer, state.scaler), if any."""
        loaded = self.loaded
        if loaded.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(copy.deepcopy(loaded.optimizer_state))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(f"state.optimizer: does not fit a {self.config.train.optimizer} optimizer over the "
                                  f"critic's parameters ({str(exc).splitlines()[0][:120]})") from None
        if loaded.scaler_state is not None and self.scaler is not None:
            self.scaler.load_state_dict(dict(loaded.scaler_state))

    def _set_rng(self) -> None:
        rng = self.loaded.rng
        assert rng is not None  # both callers check loaded.rng first
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if rng.get("numpy") is not None:  # a dump that captured them too
            np.random.set_state(rng["numpy"])
        if rng.get("python") is not None:
            random.setstate(rng["python"])

    def _phase(self, phase: Phase):
        if self.probe is not None:
            self.probe.phase = phase

    def run(self, start: RandomState) -> Trace:
        start.restore()
        ctx = self.probe if self.probe is not None else nullcontext()
        watch = RecipeWatch(self.scaler, self._unscaled) if self.scaler is not None and self.probe is not None \
            else nullcontext()
        # The kernels' mode is entered before (under) the probe's, so the probe records rounded outputs.
        with self.op_lists(), self.kernels(), ctx, watch, self.strategy.fp32_wrapper(self.fp32, self.device,
                                                                                     self.precision, self.mode):
            if self.probe is not None:
                self.probe.name_params(self.params)
            step = 0
            try:
                for step in range(self.config.train.steps):
                    if self.progress:
                        self.progress(self.precision, step, self.config.train.steps)
                    if not self._step(step):
                        break
            except _Raised as raised:
                # A finding of this precision (e.g. an op its autocast refuses); the others still run.
                if self.probe is not None:
                    self.probe.fetch()
                self.trace.error = raised.error
                if step + 1 < self.config.train.steps:
                    self.trace.stopped = f"the step raised at step {step}; later steps not replayed"
            except KeyboardInterrupt as exc:
                # Keep what this replay recorded so the caller can report it.
                if self.probe is not None:
                    self.probe.fetch()
                self.trace.stopped = f"interrupted (Ctrl-C) during step {step}"
                exc.trace = self.trace  # type: ignore[attr-defined]  # handed to the caller on the exception
                raise
        return self.trace

    def _unscaled(self) -> None:
        self.trace.unscaled_grads.append((self.probe.step, self.probe.sources.find()))  # type: ignore[union-attr]  # the probe is on while replaying

    def _inputs(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._phase(Phase.DATA)
        real = _batch(self.config, self.loaded, step, self.probe).to(self.device)
        if self.half:
            real = real.to(self.model_dtype)
        z = None
        latents = self.loaded.latents
        if step == 0 and self.loaded.rng is not None and latents is None:
            self._set_rng()  # the captured step drew z first, from this state
        if latents is not None:
            b = real.shape[0]
            z = latents[[(step * b + i) % len(latents) for i in range(b)]].to(device=self.device,
                                                                              dtype=self.model_dtype)
        elif self.generator is not None:
            z = torch.randn(real.shape[0], *self.config.model.latent_dim, device=self.device, dtype=self.model_dtype)
        if step == 0 and self.loaded.rng is not None and latents is not None:
            self._set_rng()
        return real, z

    def _step(self, step: int) -> bool:
        """Replay one critic step; False when the run cannot go on (non-finite weights)."""
        probe = self.probe
        if probe is not None:
            probe.step, probe.attempt = step, -1  # inputs belong to the step, not to one attempt
        real, z = self._inputs(step)
        rng = RandomState.capture()
        last, repeats = None, 0
        for attempt in range(MAX_SCALER_RETRIES + 1):
            if probe is not None:
                probe.attempt = attempt
            rng.restore()
            start = len(probe.events) if probe is not None else 0
            metrics, skipped = self._attempt(step, real, z)
            if probe is not None:
                probe.fetch()
            first = self._first_nonfinite(start)
            key = None if first is None else (first.phase, first.module, first.source, first.op, first.node,
                                              tuple(first.row[st.POSINF:]))  # type: ignore[index]  # _first_nonfinite returns events with a row
            repeats = repeats + 1 if key is not None and key == last else 0
            last = key
            if skipped and attempt < MAX_SCALER_RETRIES and repeats < PERSISTENT_REPEATS and \
                    self._scale_bound(first, metrics):
                # Dynamic loss scaling skipped this step on purpose; training would go on at the lower scale.
                self.trace.skipped.append((step, attempt, metrics.scale))  # type: ignore[arg-type]  # a skipped step ran with a scaler: scale is set
                if probe is not None:
                    probe.skip_attempt(step, attempt)
                continue
            self.trace.metrics.append(metrics)
            break
        with torch.no_grad(), self._own_work():
            finite = all(bool(torch.isfinite(p).all()) for p in self.critic.parameters())
        if not finite and step + 1 < self.config.train.steps:
            self.trace.stopped = f"weights non-finite after step {step}; later steps not replayed"
        return finite

    def _attempt(self, step: int, real: torch.Tensor, z) -> tuple[StepMetrics, bool]:
        probe, scaler = self.probe, self.scaler
        self.optimizer.zero_grad(set_to_none=True)
        weight_norm = self._weight_norm()
        self._phase(Phase.FORWARD)
        phase = Phase.FORWARD
        try:
            with self.autocast(), self.strategy.training():
                result = self.step_fn(self.critic, self.generator, real, z)
            loss, extra = _unpack(result)
            self._phase(Phase.BACKWARD)
            phase = Phase.BACKWARD
            (scaler.scale(loss) if scaler is not None else loss).backward()
        except (ConfigError, UserCodeError, KeyboardInterrupt):
            raise
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            source = user_source(exc.__traceback__, str(self.config.base_dir), self.loaded.user_files)
            raise _Raised(ReplayError(type(exc).__name__, message, source, _raising_op(exc.__traceback__),
                                      self.probe.phase if self.probe is not None else phase, step)) from None
        self._phase(Phase.OPTIMIZER)
        scale = scaler.get_scale() if scaler is not None else None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        if self.on_grads is not None:  # a retried attempt calls it again: the last call is the step's
            with self._own_work():
                self.on_grads(step, {n: p.grad for n, p in self.params.items() if p.grad is not None})
        if self.config.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.config.train.grad_clip)
        if probe is not None:
            probe.name_params(self.params, self.optimizer)
        # Low-precision weights can round an update away: compare each weight before and after the step.
        before = None
        if probe is not None and self.half:
            with probe.paused():
                before = updates.snapshot(self.params)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale  # type: ignore[operator]  # scale is set when a scaler is on
        else:
            self.optimizer.step()
            skipped = False
        if before is not None:
            self._record_lost(step, before)
        with self._own_work():
            values = {k: _float(v) for k, v in extra.items()}
            penalty = values.pop("penalty", None)
            metrics = StepMetrics(step=step, loss=_float(loss), penalty=penalty, grad_norm=grad_norm,
                                  scale=scale, skipped=skipped, extra=values, weight_norm=weight_norm)
        return metrics, skipped

    def _record_lost(self, step: int, before: dict) -> None:
        """Count unchanged weights per parameter and attach the numbers to the op that wrote it."""
        with self._own_work():
            counts = updates.lost(self.optimizer, self.params, before)
        self.trace.lost[step] = counts
        writes = self.probe.param_writes()  # type: ignore[union-attr]  # the probe is on while replaying
        for name, (moving, unchanged) in counts.items():
            idx = writes.get(name)
            if idx is None:
                continue
            e = self.probe.events[idx]  # type: ignore[union-attr]  # the probe is on while replaying
            e.info = {**(e.info or {}), "lost_updates": {
                "param": name, "elements": moving, "lost": unchanged, "share": round(unchanged / moving, 4)}}

    def _own_work(self) -> AbstractContextManager:
        """nanprobe's own computations (norms, checks, callbacks), kept out of the probe's record: unpaused,
        the weights' finiteness check was recorded as an `abs` of the user's optimizer step."""
        return self.probe.paused() if self.probe is not None else nullcontext()

    def _weight_norm(self) -> float | None:
        with self._own_work():
            norms = [torch.linalg.vector_norm(p.detach().float()) for p in self.critic.parameters()]
            return float(torch.linalg.vector_norm(torch.stack(norms)).item()) if norms else None

    def _first_nonfinite(self, start: int) -> OpEvent | None:
        if self.probe is None:
            return None
        return next((e for e in self.probe.events[start:] if e.row is not None and (e.has_inf or e.has_nan)), None)

    def _scale_bound(self, first: OpEvent | None, metrics: StepMetrics) -> bool:
        """Whether a lower scale could avoid this attempt's inf: it did not start in the data or the forward.

        The penalty's scaled autograd.grad can overflow and make the loss itself non-finite, and a lower
        scale helps there; an activation that overflows in the forward overflows at every scale.
        """
        if self.probe is None:
            return metrics.loss is not None and math.isfinite(metrics.loss)
        return first is None or first.phase not in (Phase.DATA, Phase.FORWARD)

    def _grad_norm(self) -> float | None:
        with self._own_work():
            grads = [p.grad.detach().float() for p in self.critic.parameters() if p.grad is not None]
            if not grads:
                return None
            return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


def replay(config: Config, loaded: Loaded, precision: Precision, device: torch.device,
           probe: bool = True, progress: Callable | None = None,
           on_record: Callable[[OpEvent, list[torch.Tensor]], None] | None = None,
           on_grads: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> Trace:
    """Replay `config.train.steps` critic steps in one precision; with probe=False, the plain step (benchmarks).

    on_record is passed to the OpProbe; on_grads(step, {name: grad}) sees the unscaled parameter
    gradients of each step before clipping and the optimizer step. Every replay of a config starts
    from the same state of every global generator (torch, numpy, random), so each precision draws the
    same numbers; the caller's states are restored afterwards. When the user's step raises, the replay
    stops there and the trace's `error` says what, where and at which op (trace.raise_error() turns it
    into a UserCodeError for callers with no use for a failed precision).
    """
    with caller_random_state(), _deterministic_kernels(device):
        start = RandomState.seeded(config.seed)
        return _Replay(config, loaded, precision, device, probe, progress, on_record, on_grads).run(start)

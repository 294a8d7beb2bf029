"""Always-on watch for live training: a cheap check per step, the culprit op named live, an exact replay.

`with nanprobe.watch(critic, optimizer=opt):` around a block watches that block as one step; a Watch
kept in a variable watches each `with w:` or `with w.step(real, z):` block as one step. After each
step it reads, in one host synchronisation, one value per quantity (the critic's outputs, the loss,
the gradients, the weights, the loss scale). The flight recorder (on when no replay is possible:
no loss function, or no real batch) also keeps the largest |x| of every op's output on the device and
reads it in the same synchronisation, so a failing step names its first non-finite op with no replay.

Given the step's loss function and real batch, the watch keeps what it needs to replay the step
exactly (the batch, z, the RNG state, and copies of the critic, optimizer and scaler state from
before the step, refreshed in place in preallocated buffers; the generator, which a critic step
does not change, is read when a step fails), and a failing step is replayed under the full probe
(fp32 and the step's precision, op by op) for the root cause and the fixes.

Under torchrun (DDP or FSDP), every rank watches: the per-rank values travel in one all_reduce, so
all ranks agree on the failing step and on which rank(s) went non-finite first; those ranks dump their
step, and rank 0 writes the one report that names them. Under FSDP each rank reads only its own shards
per step; at a failing step all ranks gather the full state from before it (the state-dict API's
collective), so a dump loads into the plain model on one process.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from nanprobe.engine import compat, sharding
from nanprobe.engine.recorder import Flight, FlightRecorder, LiveOp
from nanprobe.enums import Mode, OnNan, Precision
from nanprobe.errors import ConfigError, NonFiniteError, NonFiniteWarning
from nanprobe.io import config as cfg
from nanprobe.model.report import Report

_OPTIMIZERS = ((torch.optim.AdamW, "adamw"), (torch.optim.Adam, "adam"), (torch.optim.SGD, "sgd"),
               (torch.optim.RMSprop, "rmsprop"))
# The replay names each parameter in optimizer findings, so it steps one parameter at a time.
_REPLAY_GROUP = {"foreach": False, "fused": None, "capturable": False, "differentiable": False}
_LOW = {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}

# The per-step values, one row per rank: what each holds. _SNAPPED: the rank kept the state from before
# the step, so under FSDP every rank knows whether all of them can join the gather of a failing step.
_OUT, _LOSS, _GRADS, _WEIGHTS, _SCALE_AFTER, _SCALE_BEFORE, _REAL, _FIRST_OP, _FIRST_HASH, _SNAPPED = range(10)
_FIELDS = 10
# Values that went non-finite on a rank by its own computation (not through the gradient all-reduce).
_OWN = ((_REAL, "real batch"), (_OUT, "critic output"), (_LOSS, "loss"))
_SHARED = ((_GRADS, "gradients"), (_WEIGHTS, "weights"))


@dataclass(frozen=True)
class Failure:
    """The first watched step that turned non-finite."""

    step: int
    """Index of the watched step (0-based count of watched steps)."""
    reason: str
    """What was non-finite: critic output, loss, gradients, weights, or a loss scale that kept falling."""
    report: Report | None
    """The replay's diagnosis of the step (None without a loss function, or when on_nan="dump")."""
    dump: Path | None
    """The folder the step was written to, if any."""
    message: str
    """The one-paragraph verdict that was raised or warned."""
    culprit: LiveOp | None = None
    """The live step's first non-finite op, as the flight recorder saw it (None when it was off)."""
    past_max: LiveOp | None = None
    """Under fp16/bf16 autocast: the first fp32 value past that dtype's largest (the recorder's)."""
    ranks: tuple = (0,)
    """Under torchrun: the rank(s) where the step first went non-finite (the others followed them)."""


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


def _world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed process group, else (0, 1)."""
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(critic: Any, what: str) -> tuple[torch.nn.Module, sharding.Sharded | None]:
    """The module whose weights and forward the watch follows (DDP, FSDP and torch.compile wrappers are looked
    through), and how it is sharded under FSDP."""
    for _ in range(3):
        if isinstance(critic, torch.nn.parallel.DistributedDataParallel) or type(critic).__name__ == "DataParallel":
            critic = critic.module
        elif compat.compiled_original(critic) is not None:
            critic = compat.compiled_original(critic)
    return sharding.unwrap(critic, what)


def _whole_shapes(module: torch.nn.Module, sharded: sharding.Sharded) -> dict[str, tuple] | None:
    """A sharded model's full shapes where a rank knows them alone: FSDP2's DTensors carry them, FSDP1's flat
    shards do not (its dump's shapes are checked when it is replayed)."""
    if sharded.kind != "FSDP2":
        return None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


class _Step:
    """One watched step, as a context manager; set `.loss` inside it to have the loss checked too."""

    def __init__(self, watch: Watch, real: torch.Tensor | None, z: torch.Tensor | None):
        self.watch, self.real, self.z = watch, real, z
        self.loss: Any = None

    def __enter__(self) -> _Step:
        self.watch._begin(self.real, self.z)
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is None:
            self.watch._end(self.loss)
        else:
            self.watch._abort()
        return False


class Watch:
    """Watches a critic's training steps; see `watch()` for the arguments."""

    def __init__(self, critic: torch.nn.Module, generator: Callable | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, *,
                 loss: str | Callable | None = None, gp_weight: float = 10.0, gp_precision: str = "autocast",
                 gp_norm: str = "sqrt", precision: str | Precision | None = None, on_nan: str | OnNan = "raise",
                 dump_dir: str | Path | None = None, latent_dim: int | tuple | None = None,
                 grad_clip: float | None = None, max_skips: int = 8, record: bool | None = None,
                 generator_call: str | Callable = "z",
                 critic_ref: str | None = None, critic_args: dict | None = None,
                 generator_ref: str | None = None, generator_args: dict | None = None, loss_ref: str | None = None):
        if not isinstance(critic, torch.nn.Module):
            raise ConfigError(f"nanprobe.watch: critic must be an nn.Module, got {type(critic).__name__}")
        critic, self._sharded = _unwrap(critic, "critic")
        if next(critic.parameters(), None) is None:
            raise ConfigError(f"nanprobe.watch: the critic ({type(critic).__name__}) has no parameters; "
                              "pass the module you train")
        if generator is not None and not callable(generator):
            raise ConfigError(f"nanprobe.watch: generator must be a callable z -> fakes (e.g. an nn.Module) or None, "
                              f"got {type(generator).__name__}")
        self._gen_sharded: sharding.Sharded | None = None
        if isinstance(generator, torch.nn.Module):
            generator, self._gen_sharded = _unwrap(generator, "generator")
        elif generator is not None and dump_dir is not None:
            raise ConfigError("nanprobe.watch: a dump names the generator by its class, so with dump_dir the "
                              f"generator must be an nn.Module (got {type(generator).__name__}); pass the module")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("nanprobe.watch: optimizer must be a torch.optim.Optimizer, "
                              f"got {type(optimizer).__name__}")
        if optimizer is not None:
            owned = {id(p) for p in critic.parameters()}
            if not any(id(p) in owned for g in optimizer.param_groups for p in g["params"]):
                raise ConfigError("nanprobe.watch: the optimizer updates none of the critic's parameters; "
                                  "pass the critic's optimizer")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise ConfigError(f"nanprobe.watch: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if record is not None and not isinstance(record, bool):
            raise ConfigError(f"nanprobe.watch: record must be True, False or None (on when no replay is possible), "
                              f"got {record!r}")
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
        self.replays = loss is not None
        """A loss (built-in kind or function) was given: a failing step with its real batch is replayed."""
        # The same checks as a config: a bad loss kind or penalty setting fails here, not hours in.
        self._model = cfg.check(cfg.Config(model=cfg.ModelConfig(critic=critic, generator_call=generator_call))).model
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
        self.record = record
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.refs = None
        self._args = {"critic": cfg.check_mapping(critic_args, "critic_args"),
                      "generator": cfg.check_mapping(generator_args, "generator_args")}
        # A sharded model is whole on no rank, so its replay builds the user's class anew (the FSDP module's
        # forward would wait on the other ranks); its state gathered at a failing step loads into that.
        classes = {k: (s.cls, _whole_shapes(m, s)) for k, m, s in (("critic", critic, self._sharded),
                                                                    ("generator", generator, self._gen_sharded))
                   if s is not None and isinstance(m, torch.nn.Module)}
        if self.dump_dir is not None:
            from nanprobe.io import dump
            # Resolved now, so a dump that could not be replayed elsewhere fails at start, not hours in.
            self.refs = dump.references(critic, generator if isinstance(generator, torch.nn.Module) else None,
                                        self.loss_fn, critic_ref, critic_args, generator_ref, generator_args, loss_ref,
                                        classes=classes)
        elif classes and self.replays:
            from nanprobe.io import dump
            for key, (cls, shapes) in classes.items():
                dump.check_args(cls, shapes, self._args[key], key)
        self.steps = 0
        """Steps watched so far."""
        self.skipped = 0
        """Steps the GradScaler skipped (and training recovered from)."""
        self.failures = 0
        """Non-finite steps; only the first is diagnosed or dumped."""
        self.failure: Failure | None = None
        """The first non-finite step, once there is one."""
        self.flight: Flight | None = None
        """What the flight recorder read at the end of the last recorded step."""
        self._skips_in_row = 0
        self._active = False
        self._block = False  # the step in progress is a `with w:` block (it yields to a w.step() inside it)
        self._session = False  # a `with w:` block that holds per-step w.step() blocks
        self._hooks: list = []
        self._outs: list = []
        self._recorder: FlightRecorder | None = None
        self._recording = False
        self._seen: tuple[Mode, Precision] | None = None
        self._critic_buf, self._opt_buf = _Buffers(), _Buffers()
        self._opt_values: dict = {}
        self._scale_before: float | torch.Tensor | None = None
        self._tracker_before: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._snapped = False

    # ---- the public API

    def step(self, *args, real: torch.Tensor | None = None, z: torch.Tensor | None = None, **kwargs):
        """`with w.step(real, z):` around a training step, or `w.step(fn, real, z)` to call fn(real, z) watched."""
        if args and callable(args[0]) and not isinstance(args[0], torch.Tensor):
            fn, rest = args[0], args[1:]
            call_kw = dict(kwargs, **({"real": real} if real is not None else {}),
                           **({"z": z} if z is not None else {}))
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
        """Remove the watch's hooks and mode (only present mid-step); the watch keeps no other hold on the models."""
        self._abort()
        self._session = False

    def __enter__(self) -> Watch:
        """`with w:` watches the block as one step (a block that runs `w.step()` steps only holds them)."""
        if self._active or self._session:
            raise ConfigError("nanprobe.watch: `with w:` is already running; watched steps do not nest")
        self._begin(None, None)
        self._block = True
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if self._session or not self._block:
            self.close()
        elif exc_type is None:
            self._end(None)
        else:
            self._abort()
        self._block = self._session = False
        return False

    # ---- per step

    def _device(self) -> torch.device:
        p = next(self.critic.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _begin(self, real, z) -> None:
        if self._active:
            if not self._block:
                raise ConfigError("nanprobe.watch: step() is already running; watched steps do not nest")
            # `with w:` around a loop of `with w.step():` blocks: each of those is the step.
            self._abort()
            self._block, self._session = False, True
        if real is not None and (not isinstance(real, torch.Tensor) or real.dim() < 1):
            raise ConfigError(f"nanprobe.watch: step() takes the real batch as a tensor [B, ...] (or nothing), "
                              f"got {type(real).__name__}")
        if z is not None and not isinstance(z, torch.Tensor):
            raise ConfigError(f"nanprobe.watch: z must be a tensor or None, got {type(z).__name__}")
        replay = real is not None and (self.replays or self.dump_dir is not None)
        if replay and z is None and self.generator is not None and self.latent_dim is None:
            raise ConfigError("nanprobe.watch: pass z to step(real, z), or latent_dim to watch() when the step draws "
                              "z itself as its first random numbers")
        self._real = real.detach().clone() if replay else None  # type: ignore[union-attr]  # not None on this path
        self._realref = real.detach() if real is not None else None
        self._z = z.detach().clone() if replay and z is not None else None
        self._snapped = replay
        if replay:
            self._rng = torch.get_rng_state()
            device = self._device()
            self._cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            with torch.no_grad():
                self._snapshot()
        else:
            self._snap_scale()  # a skipped step is told from a failing one by the scale it lowered
        self._seen = None
        self._outs = []
        self._active = True
        try:
            if self.precision is None:
                self._hooks.append(self.critic.register_forward_pre_hook(_precision_hook(self, self.critic)))
            self._hooks.append(self.critic.register_forward_hook(_output_hook(self, self.critic)))
            self._recording = self.record if self.record is not None else not (self.replays and real is not None)
            if self._recording:
                if self._recorder is None:
                    gen = self.generator if isinstance(self.generator, torch.nn.Module) else None
                    self._recorder = FlightRecorder({"critic": self.critic, **({"generator": gen} if gen else {})},
                                                    self.optimizer, base_dir=str(Path.cwd()))
                self._recorder.reset()
                self._recorder.__enter__()
        except BaseException:
            self._abort()
            raise

    def _snapshot(self) -> None:
        if self._sharded is not None:
            # This rank's shards, as the state-dict API finds them, so a failing step can gather them whole.
            self._critic_buf.take(*sharding.named_locals(self._sharded.root))
        else:
            sd = self.critic.state_dict(keep_vars=True)
            self._critic_buf.take(list(sd), list(sd.values()))
        if self.optimizer is not None:
            keys, tensors, values = self._optimizer_state()
            self._opt_buf.take(keys, tensors)
            self._opt_values = values
        self._snap_scale()

    def _optimizer_state(self) -> tuple[list, list[torch.Tensor], dict]:
        """The optimizer's state tensors (this rank's shards) by (parameter index, key), and its other values."""
        keys, tensors, values = [], [], {}
        i = 0
        for group in self.optimizer.param_groups:  # type: ignore[union-attr]  # only called with an optimizer
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():  # type: ignore[union-attr]  # as above
                    if isinstance(v, torch.Tensor):
                        keys.append((i, k))
                        tensors.append(sharding.local(v))
                    else:
                        values[(i, k)] = v
                i += 1
        return keys, tensors, values

    def _snap_scale(self) -> None:
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
                self._tracker_before.copy_(compat.scaler_growth_tracker(scaler))  # type: ignore[union-attr]  # not None on this path

    def _abort(self) -> None:
        self._active = False
        try:
            if self._recorder is not None and self._recorder._mode is not None:
                self._recorder.__exit__(None, None, None)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _values(self, loss: torch.Tensor | None, scaler, device, world: int) -> tuple:
        """This rank's row of per-step values, on the device, with no host synchronisation."""
        # Under FSDP, this rank's shards: the table's all_reduce shares them, with no collective of their own.
        params = [sharding.local(p) for p in self.critic.parameters()]
        grads = [sharding.local(p.grad) for p in self.critic.parameters() if p.grad is not None]
        zero = torch.zeros((), device=device)
        with torch.no_grad():
            row = [zero] * _FIELDS
            if self._outs:
                row[_OUT] = torch.stack([v.to(device=device, dtype=torch.float32) for v in self._outs]).amax()
            # 2-norms: one fused pass per list (the inf-norm is ~30x slower on the CPU); NaN and inf
            # propagate, and a norm that overflows from finite values is told apart after the read.
            row[_WEIGHTS] = torch.nn.utils.get_total_norm(params, 2.0)
            if grads:
                row[_GRADS] = torch.nn.utils.get_total_norm(grads, 2.0)
            if loss is not None:
                row[_LOSS] = loss.detach().float().sum()
            after = getattr(scaler, "_scale", None) if scaler is not None else None
            if after is not None:
                row[_SCALE_AFTER] = after.reshape(())
            before = self._scale_before if scaler is not None else None
            row[_SCALE_BEFORE] = (before.reshape(()) if isinstance(before, torch.Tensor)
                                  else torch.full((), float(before or 0)))
            real = self._realref
            if real is not None and real.is_floating_point() and real.numel():
                mn, mx = torch.aminmax(real)
                row[_REAL] = torch.maximum(mx, -mn)
            rec = self._recorder.values() if self._recording else None  # type: ignore[union-attr]  # the recorder is on while watching
            if rec is not None and world > 1:  # which op, for the other ranks' messages
                first = self._recorder.first_bad(rec)  # type: ignore[union-attr]  # the recorder is on while watching
                row[_FIRST_OP], row[_FIRST_HASH] = first[0], first[1]
            else:
                row[_FIRST_OP] = torch.full((), -1.0)
            row[_SNAPPED] = torch.full((), float(self._snapped))
            row = torch.stack([v.to(device=device, dtype=torch.float64) for v in row])  # type: ignore[assignment]  # the list becomes one stacked tensor
        return row, params, grads, rec

    def _end(self, out: Any) -> None:
        self._abort()
        step, self.steps = self.steps, self.steps + 1
        device = self._device()
        loss = _loss_tensor(out)
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        rank, world = _world()
        row, params, grads, rec = self._values(loss, scaler, device, world)
        if world > 1:
            import torch.distributed as dist

            # The one collective: every rank's row, so all ranks agree on the step and the ranks that failed.
            gloo = dist.get_backend() == "gloo"
            table = torch.zeros(world, _FIELDS, dtype=torch.float64, device="cpu" if gloo else row.device)
            table[rank] = row.to(table.device)
            dist.all_reduce(table)
        else:
            table = row.unsqueeze(0)
        parts = [table.flatten().to(rec.device if rec is not None else table.device)]
        if rec is not None:
            parts.append(rec)
        host = torch.cat(parts).tolist()  # the one host synchronisation
        rows = [host[r * _FIELDS:(r + 1) * _FIELDS] for r in range(world)]
        if self._recording:
            low = None
            seen = self._seen or ((Mode.AMP, self.precision) if self.precision is not None else None)
            if seen is not None and seen[0] is Mode.AMP and seen[1].is_low:
                low = seen[1].torch_dtype
            self.flight = self._recorder.find(host[world * _FIELDS:], low)  # type: ignore[union-attr]  # the recorder is on while watching
        own = rows[rank]
        bad_by_rank = {}
        for r, v in enumerate(rows):
            bad = [name for i, name in _OWN + _SHARED if not math.isfinite(v[i])]
            if world == 1 and bad:
                # A norm can overflow from huge finite values: the exact check, only on this rare path.
                exact = {"gradients": grads, "weights": params}
                bad = [b for b in bad if b not in exact or not _all_finite(exact[b])]
            if bad:
                bad_by_rank[r] = bad
        after = own[_SCALE_AFTER]
        # Any rank's scaler, so all ranks take the same branch (a failing step's gather under FSDP is collective).
        lowered = any(v[_SCALE_AFTER] < v[_SCALE_BEFORE] for v in rows)
        if scaler is not None and getattr(scaler, "_scale", None) is not None and lowered:
            self.skipped += 1
            self._skips_in_row += 1
            if not any("weights" in b for b in bad_by_rank.values()):
                if self._skips_in_row <= self.max_skips:
                    return  # loss scaling skipped the step on purpose; training goes on at a lower scale
                self._fail(step,
                           {r: [f"the GradScaler skipped {self._skips_in_row} steps in a row (scale now {after:g})"]
                                  for r in range(world)}, rows)
                return
        elif not bad_by_rank:
            self._skips_in_row = 0
            return
        self._fail(step, bad_by_rank, rows)

    # ---- a failing step

    def _fail(self, step: int, bad_by_rank: dict[int, list[str]], rows: list[list[float]]) -> None:
        self.failures += 1
        if self.failure is not None:
            return  # the first failure was reported; later ones usually follow from it
        rank, world = _world()
        # The rank(s) whose own values went non-finite; the others got NaN through the gradient all-reduce.
        origins = tuple(r for r, bad in bad_by_rank.items() if any(name in bad for _, name in _OWN)) \
            or tuple(bad_by_rank)
        reasons = {r: ", ".join(bad) + ("" if bad[0].startswith("the GradScaler") else " non-finite")
                   for r, bad in bad_by_rank.items()}
        reason = reasons.get(rank) or reasons[origins[0]]
        # A rank that only followed another's NaN through the all-reduce has no culprit of its own.
        flight = self.flight if self._recording and rank in origins else None
        culprit = flight.first_nonfinite if flight is not None else None
        past = flight.first_past_max if flight is not None else None
        whole = None
        if (self._sharded is not None or self._gen_sharded is not None) and all(row[_SNAPPED] for row in rows):
            # Every rank joins the gather (it is collective); only the failing ranks keep what it returns.
            whole = self._gather(keep=rank in origins, rank0_only=origins == (0,))
        sharded = self._sharded is not None or self._gen_sharded is not None
        config = self._config(whole) if self._snapped and rank in origins and (whole or not sharded) else None
        folder = None
        if self.dump_dir is not None and config is not None:
            from nanprobe.io import dump

            root = self.dump_dir / f"rank-{rank}" if world > 1 else self.dump_dir
            folder = dump.write(root, step, config, self.refs)  # type: ignore[arg-type]  # not None on this path
        where = f"; dumped to {folder} (replay it with: nanprobe diagnose {folder / 'config.yaml'})" if folder else ""
        if world == 1:
            head = f"nanprobe.watch: step {step} turned non-finite ({reason}){where}."
        else:
            first = "; ".join(f"rank {r} of {world} ({reasons[r]})" for r in origins)
            followed = [r for r in bad_by_rank if r not in origins]
            head = (f"nanprobe.watch: step {step} turned non-finite on {first}"
                    + (f"; rank{'s' if len(followed) > 1 else ''} {', '.join(map(str, followed))} "
                       f"followed through the gradient {'reduce-scatter' if self._sharded else 'all-reduce'}"
                       if followed else "") + f"{where}.")
        lines = [head]
        if world > 1 and rank not in origins:
            lines += [self._other_rank(r, rows[r]) for r in origins if rows[r][_FIRST_OP] >= 0]
        elif culprit is not None:
            lines.append(f"The live step's first non-finite op: {culprit.describe()}.")
        if past is not None and (culprit is None or past.index < culprit.index):
            lines.append(f"Before it, {past.describe()}.")
        if self._recording and flight is not None and culprit is None and rank in origins:
            lines.append("The flight recorder saw no op make a non-finite value in the step "
                         "(the non-finite values came from outside it: the batch or the weights).")
        if not (self.replays and self._snapped) and rank in origins:
            lines.append("For the fp32 comparison, the root cause and the fix, pass loss=<your critic loss function> "
                         "to watch() and the real batch to w.step(real, z)" +
                         (", or record=True to name the op live." if not self._recording else "."))
        report = None
        if config is not None and self.replays and self.on_nan is not OnNan.DUMP:
            from nanprobe.model.verdict import verdict

            report = self._diagnose(config)
            lines.append(f"Replayed under the probe: {verdict(report, config.precision.dtypes[-1])}")
        message = " ".join(lines)
        self.failure = Failure(step, reason, report, folder, message, culprit, past, origins)
        if world > 1 and rank == 0 and self.dump_dir is not None:
            # The one report of the run: the ranks that failed and where their steps were dumped.
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            dumps = [f"  rank {r}: {self.dump_dir / f'rank-{r}'}/step-{step:06d}*/config.yaml" for r in origins]
            text = "\n".join([message, "", "Dumped steps (replay one with nanprobe diagnose DUMP/config.yaml):",
                              *dumps])
            (self.dump_dir / f"report-step-{step:06d}.txt").write_text(text + "\n", encoding="utf-8")
        if self.on_nan is OnNan.RAISE:
            raise NonFiniteError(message, self.failure)
        warnings.warn(message, NonFiniteWarning, stacklevel=4)

    def _other_rank(self, r: int, row: list[float]) -> str:
        """Another rank's first non-finite op: its position and tag hash came in the collective."""
        index = int(row[_FIRST_OP])
        same = self._recorder.describe_at(index, int(row[_FIRST_HASH])) if self._recorder is not None else None
        if same is not None:
            return f"Rank {r}'s first non-finite op was its op #{index}: {same} (the op this rank ran there too)."
        return f"Rank {r}'s first non-finite op was its op #{index} (rank {r}'s own message names it)."

    def _precision(self) -> tuple[Mode, Precision]:
        if self.precision is not None:
            half = next((p for p in self.critic.parameters()), torch.zeros(())).dtype != torch.float32
            return (Mode.HALF if half and self.precision.is_low else Mode.AMP), self.precision
        return self._seen or (Mode.AMP, Precision.FP32)

    def config(self) -> cfg.Config:
        """The last watched step as a Config that `nanprobe.diagnose` replays exactly (tensors in memory).

        Under FSDP it gathers the full state from the ranks' shards: a collective, so every rank calls it."""
        self._batch()
        whole = self._gather(keep=True, rank0_only=False) if self._sharded or self._gen_sharded else None
        return self._config(whole)

    def _gather(self, keep: bool, rank0_only: bool) -> dict | None:
        """The full state of the sharded models from before the step (collective; None where not kept).

        The live shards hold the snapshot while the state-dict API gathers them, then their own values
        again, so training that goes on after a warning is unchanged. rank0_only: only rank 0 keeps it,
        gathered onto its CPU one tensor at a time; otherwise each rank receives it all on its device.
        """
        whole: dict = {}
        if self._sharded is not None:
            names, live = sharding.named_locals(self._sharded.root)
            saved = self._critic_buf.as_dict()
            pairs = [(t, saved[n]) for n, t in zip(names, live) if n in saved and saved[n].shape == t.shape]
            optimizer = None
            if self.optimizer is not None and self._opt_buf.keys:
                optimizer = self.optimizer
                keys, tensors, _ = self._optimizer_state()
                now = dict(zip(keys, tensors))
                pairs += [(now[k], b) for k, b in zip(self._opt_buf.keys, self._opt_buf.bufs)
                          if k in now and now[k].shape == b.shape]
            # An optimizer with no state before the step (its first) has none to gather.
            with torch.no_grad(), sharding.holding([a for a, _ in pairs], [b for _, b in pairs]):
                model_sd, optim_sd = sharding.full_state(self._sharded, optimizer, rank0_only)
                # Copied while the snapshot is in: values that were never sharded (Adam's step) come back
                # as the live tensors themselves, which get their own values again after the block.
                if keep:
                    whole["critic"] = _copied(model_sd)
                    whole["optimizer"] = _by_index(model_sd, optim_sd) if optim_sd is not None else None
        if self._gen_sharded is not None:
            # A critic step does not change the generator: its state now is its state before the step.
            with torch.no_grad():
                gen_sd, _ = sharding.full_state(self._gen_sharded, None, rank0_only)
            whole["generator"] = _copied(gen_sd) if keep else None
        return whole if keep else None

    def _batch(self) -> torch.Tensor:
        if self._real is None:
            raise ConfigError("nanprobe.watch: no step with its real batch has been watched yet (config() describes "
                              "the last one: pass it to w.step(real, z), with loss= or dump_dir= to watch())")
        return self._real

    def _config(self, whole: dict | None) -> cfg.Config:
        real = self._batch()
        mode, precision = self._precision()
        dtypes = (Precision.FP32,) if precision is Precision.FP32 else (Precision.FP32, precision)
        whole = whole or {}
        checkpoint = {"critic": whole["critic"] if self._sharded else self._critic_buf.as_dict()}
        if self._gen_sharded is not None:
            checkpoint["generator"] = whole["generator"]
        elif isinstance(self.generator, torch.nn.Module):
            # A critic step does not change the generator (a train-mode forward updates BatchNorm's
            # running statistics, which train mode does not use), so it is read now, not copied per step.
            checkpoint["generator"] = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
        train, opt_state = self._optimizer(whole.get("optimizer"))
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        latent = tuple(self._z.shape[1:]) if self._z is not None else (self.latent_dim or (1,))
        rng = {"cpu": self._rng, **({"cuda": self._cuda_rng} if self._cuda_rng is not None else {})}
        generator: Any = self.generator
        if generator is not None and not isinstance(generator, torch.nn.Module):
            generator = _Fakes(generator)  # any callable z -> fakes, as a module the replay can copy
        # A sharded model is replayed as its class built anew: the FSDP module's forward waits on other ranks.
        critic: Any = self._sharded.cls if self._sharded is not None else self.critic
        if self._gen_sharded is not None:
            generator = self._gen_sharded.cls
        return cfg.check(cfg.Config(
            model=cfg.ModelConfig(critic=critic, generator=generator, latent_dim=latent, checkpoint=checkpoint,
                                  critic_args=self._args["critic"] if self._sharded else {},
                                  generator_args=self._args["generator"] if self._gen_sharded else {},
                                  generator_call=self._model.generator_call),
            data=cfg.DataConfig(source="file", path=real, shape=tuple(real.shape[1:]), batch_size=real.shape[0]),
            loss=self._loss,
            train=cfg.TrainConfig(**train, steps=1, grad_scaler=scaler is not None, grad_clip=self.grad_clip),
            precision=cfg.PrecisionConfig(mode=mode, dtypes=dtypes),
            state=cfg.StateConfig(z=self._z, rng=rng, optimizer=opt_state,
                                  scaler=self._scaler_state() if scaler is not None else None),
            device=self._device().type, seed=0, base_dir=Path.cwd()))

    def _optimizer(self, whole: tuple[int, dict] | None = None) -> tuple[dict, dict | None]:
        """The replay's train settings from the user's optimizer, and its state before the step when it fits.

        whole: under FSDP, the gathered state (parameter count, state by index), as `_by_index` makes it."""
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
        count = len(critic_params)
        if self._sharded is not None:
            # FSDP1's flat parameters hold many of the user's: the gathered state is by the user's parameters.
            count, state = whole if whole is not None else (count, {})
        else:
            for (i, k), v in {**self._opt_buf.as_dict(), **self._opt_values}.items():
                state.setdefault(i, {})[k] = v
        group = {k: v for k, v in g.items() if k != "params"}
        group.update({k: v for k, v in _REPLAY_GROUP.items() if k in group}, params=list(range(count)))
        return train, {"state": state, "param_groups": [group]}

    def _scaler_state(self) -> dict:
        sd = dict(self.scaler.state_dict())
        before = self._scale_before
        sd["scale"] = float(before) if before is not None else float(self.scaler._init_scale)
        sd[compat.GROWTH_TRACKER_KEY] = (int(self._tracker_before) if isinstance(self._tracker_before, torch.Tensor)
                                         else 0)
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


def _by_index(model_sd: dict, optim_sd: dict) -> tuple[int, dict]:
    """The gathered optimizer state (keyed by parameter name) keyed as the replay's optimizer takes it: by the
    parameter's position in the user's module, the order of its state dict. Returns (parameter count, state)."""
    groups = [n for g in optim_sd.get("param_groups", []) for n in g.get("params", [])]
    order = [n for n in model_sd if n in set(groups)]
    index = {n: i for i, n in enumerate(order)}
    state = {index[n]: _copied(s) for n, s in optim_sd.get("state", {}).items() if n in index}
    return len(order), state


def _copied(sd: dict) -> dict:
    """A state dict's tensors copied to the CPU (never the live tensors themselves)."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


class _Fakes(torch.nn.Module):
    """A generator given as a plain callable z -> fakes."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, z):
        return self.fn(z)


def _precision_hook(watch: Watch, critic: torch.nn.Module):
    # A plain function, not a bound method: copy.deepcopy treats functions as atoms, so a copy of the
    # critic made while the hook is on would not drag the watch along.
    def hook(module, args):
        if module is not critic or not watch._active or watch._seen is not None:
            return
        device = watch._device()
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
            watch._seen = (Mode.AMP,
                           {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}.get(dtype, Precision.FP32))
        else:
            dtype = next(module.parameters(), torch.zeros(())).dtype
            low = {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}.get(dtype)
            watch._seen = (Mode.HALF, low) if low else (Mode.AMP, Precision.FP32)

    return hook


def _output_hook(watch: Watch, critic: torch.nn.Module):
    # The critic's scores, checked per call: a forward that overflowed is told from gradients that
    # went NaN later (and, under DDP, from NaN that reached this rank through the all-reduce).
    def hook(module, args, out):
        if module is not critic or not watch._active:
            return
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            rec = watch._recorder if watch._recording else None
            with torch.no_grad(), (rec.paused() if rec is not None else _nothing()):
                mn, mx = torch.aminmax(out.detach())
                watch._outs.append(torch.maximum(mx, -mn))

    return hook


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def watch(critic: torch.nn.Module, generator: Callable | None = None,
          optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, **options) -> Watch:
    """Watch a critic's training steps; diagnose, warn about or dump the first one that turns non-finite.

    `with nanprobe.watch(critic, optimizer=opt):` around a block watches the block as one step; keep
    `w = nanprobe.watch(...)` and write `with w:` or `with w.step(real, z) as s:` (set `s.loss` to have
    the loss checked too) per step, or call `w.step(train_step, real, z)`. After each step one host
    synchronisation reads the critic's outputs, the loss, the gradients, the weights and the loss scale.

    The flight recorder (record=None: on when no replay is possible, i.e. no loss or no real batch)
    names the live step's first non-finite op with its module, phase and line. With `loss` (a built-in
    kind or your function `(critic, generator, real, z) -> loss or {"loss": ...}`) and the real batch,
    a failing step is replayed from the state before it for the fp32 comparison, the cause and the fix.
    Under torchrun every rank watches and all agree on the failing step (one all_reduce per step).
    Options: loss, gp_weight, gp_precision, gp_norm, precision (None: read from the autocast around the
    critic's first forward), on_nan ("raise" | "warn" | "dump"), dump_dir, latent_dim, grad_clip,
    max_skips (GradScaler skips in a row that still count as recovering), record, generator_call ("z",
    "[z]" for a generator that takes a list of latents, or a function (generator, z) -> fakes),
    critic_ref/critic_args, generator_ref/generator_args, loss_ref (how a dump's config names your code).
    """
    return Watch(critic, generator, optimizer, scaler, **options)

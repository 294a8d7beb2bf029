"""The YAML config: frozen dataclasses, loaded and checked once, with a one-line error for anything wrong."""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from nanprobe.enums import Kernels, Mode, Policy, Precision
from nanprobe.errors import ConfigError

LOSS_KINDS = ("wgan-gp", "r1", "hinge", "non-saturating")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """Which critic and generator to build, and from what."""

    critic: Any = None
    """"file.py:Name" (relative to the config), "package.module:Name", a Keras model file (.keras, or a legacy .h5),
    or an nn.Module or keras.Model (Python API); a Name returning a keras.Model runs on Keras's torch backend."""
    critic_args: dict = field(default_factory=dict)
    """Keyword arguments for the critic class or factory."""
    generator: Any = None
    """Same forms as `critic`; None makes fakes Gaussian noise of the data's shape."""
    generator_args: dict = field(default_factory=dict)
    """Keyword arguments for the generator class or factory."""
    latent_dim: tuple = (128,)
    """Shape of z after the batch dimension (an int or a list, e.g. [128, 1, 1])."""
    generator_call: Any = "z"
    """How the generator is called: "z" (generator(z)) or "[z]" (generator([z]), a list of latents as
    StyleGAN2's generators take); a tuple or list it returns gives its first tensor. From Python, also a
    function (generator, z) -> fakes."""
    checkpoint: Any = None
    """{"critic": sd, "generator": sd} or a bare critic state_dict, loaded with weights_only=True (Python API: the
    dict itself)."""
    init: str = "default"
    """default (the weights as built and loaded) | he: the critic's conv/linear weights redrawn at the He
    scale for LeakyReLU(0.2), biases zeroed (on nanprobe's copy; your model and files are untouched)."""
    script_args: tuple = ()
    """The command line a training script's parse_args() sees when nanprobe runs its definitions, as you run it
    (["--dataset", "cifar10", "--ngf", "128"], or one string); [] gives the script's defaults."""
    apply: Any = None
    """"file.py:function" (or, from Python, the function): your weight init, called as critic.apply(fn) and
    generator.apply(fn) once both are built and before the checkpoint loads, as a training script's
    `netD.apply(weights_init)` does; None leaves the weights as the constructors drew them."""


@dataclass(frozen=True)
class DataConfig:
    """Where the real batch comes from."""

    source: str = "synthetic"
    """synthetic (uniform in `range`) or file (.npy or .pt tensor [N, C, H, W])."""
    path: Any = None
    """The data file when source is file; step k uses samples [k*B, (k+1)*B) in file order (Python API: a tensor or
    array)."""
    shape: tuple | None = None
    """Shape of one sample (C, H, W): [3, 64, 64] when synthetic and unset; checked against the file."""
    range: tuple = (-1.0, 1.0)
    """The value range the model expects (and synthetic data is drawn from)."""
    batch_size: int = 16
    """Samples per critic step."""


@dataclass(frozen=True)
class LossConfig:
    """The critic loss replayed."""

    kind: str = "wgan-gp"
    """wgan-gp | r1 | hinge | non-saturating."""
    gp_weight: float = 10.0
    """Penalty weight: lambda for wgan-gp, gamma for r1."""
    gp_precision: str = "autocast"
    """autocast (the penalty inside autocast, as most code does) or fp32 (outside autocast)."""
    gp_norm: str = "sqrt"
    """sqrt: torch.sqrt((g**2).sum(1)) as in the reference code; vector_norm: torch.linalg.vector_norm."""
    step: Any = None
    """"file.py:function" or "module:function" (Python API: the function): the user's critic step, overriding `kind`."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer and scaling around each critic step."""

    optimizer: str = "adam"
    """adam | adamw | sgd | rmsprop."""
    lr: float = 1.0e-4
    """Learning rate."""
    betas: tuple = (0.0, 0.9)
    """Adam/AdamW betas (momentum for sgd and rmsprop is betas[0])."""
    eps: float = 1.0e-8
    """Optimizer eps (Adam, AdamW, RMSprop)."""
    weight_decay: float = 0.0
    """Weight decay."""
    steps: int = 5
    """Critic steps replayed per precision (5: the usual n_critic per generator step)."""
    grad_scaler: bool = False
    """Dynamic loss scaling (torch.amp.GradScaler), with the AMP gradient-penalty recipe."""
    grad_clip: float | None = None
    """Max total gradient norm, applied after unscaling; null for none."""


@dataclass(frozen=True)
class PrecisionConfig:
    """Which precisions to replay, and how."""

    mode: Mode = Mode.AMP
    """amp (autocast) or half (model and inputs cast to the dtype)."""
    dtypes: tuple = (Precision.FP32, Precision.FP16, Precision.BF16)
    """Precisions replayed; fp32 is always replayed first as the reference."""
    policy: Policy = Policy.CUDA
    """cuda: a CPU replay casts each op as CUDA autocast would; native: the device's own autocast."""
    kernels: Kernels = Kernels.EMULATED
    """emulated: a CPU replay computes fp16/bf16 ops in fp32 and rounds each output, as GPU kernels do; native: the
    CPU's own kernels (CUDA: always its own)."""
    fp32_modules: tuple = ()
    """Module paths (critic.net.6) run outside autocast on fp32 inputs, with fp32 weights in half mode; for a Keras
    model, layer paths (critic/conv32), built with the float32 dtype policy."""


@dataclass(frozen=True)
class StateConfig:
    """Training state captured by nanprobe.watch, so a dumped step replays exactly (all optional)."""

    z: Any = None
    """The step's generator input, a .pt tensor [B, *latent_dim] (Python API: the tensor); None draws it from the
    seed."""
    rng: Any = None
    """A .pt file {"cpu": state, "cuda": state} set before the step (before z when z is not given); None seeds with
    `seed`."""
    optimizer: Any = None
    """The optimizer's state_dict before the step (.pt), loaded into the replay's optimizer."""
    scaler: Any = None
    """The GradScaler's state_dict before the step (.pt); needs train.grad_scaler: true."""


@dataclass(frozen=True)
class Config:
    """A whole nanprobe config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The models."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimizer step."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """The precisions."""
    state: StateConfig = field(default_factory=StateConfig)
    """Captured training state (written by nanprobe.watch's dumps)."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    seed: int = 0
    """Seed for data, noise, penalty interpolation and initialisation."""
    base_dir: Path = field(default_factory=Path.cwd)
    """Folder that relative paths in the config are resolved against."""
    source: Path | None = None
    """The YAML file this config was loaded from, if any."""


# ---- value checks: each takes (value, dotted key) and returns the clean value or raises ConfigError.
# Each also says what it accepts, in words (`expects`, and `choices` for a fixed set): schema() hands
# them to the generated config reference, so the checks stay the one source of the rules.

_Check = TypeVar("_Check", bound=Callable)


def _expects(text: str, choices: tuple = ()) -> Callable[[_Check], _Check]:
    def mark(check: _Check) -> _Check:
        # setattr: a function type declares no attributes, so plain assignment fails the type check
        setattr(check, "expects", text)  # noqa: B010
        setattr(check, "choices", tuple(choices))  # noqa: B010
        return check

    return mark


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r} ({_type_name(value)})")


@_expects("a non-empty string")
def _str(v, key):
    if not isinstance(v, str) or not v.strip():
        raise _fail(key, "a non-empty string", v)
    return v


def _opt_str(v, key):
    return None if v is None else _str(v, key)


def _choice(*options: str) -> Callable:
    def check(v, key):
        if v not in options:
            hint = difflib.get_close_matches(str(v), options, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{key}: must be one of {', '.join(options)}, got {v!r}{extra}")
        return v

    return _expects("one of " + ", ".join(options), options)(check)


def _number(lo: float | None = None, hi: float | None = None, lo_open=False) -> Callable:
    def check(v, key):
        try:
            finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise _fail(key, "a finite number", v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ConfigError(f"{key}: must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: must be <= {hi}, got {v}")
        return float(v)

    return _expects("a number" + (f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else "")
                    + (f", <= {hi:g}" if hi is not None else ""))(check)


def _int(lo: int | None = None, hi: int | None = None) -> Callable:
    def check(v, key):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(key, "an integer", v)
        if lo is not None and v < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: must be <= {hi}, got {v}")
        return v

    return _expects("an integer" + (f" from {lo} to {hi}" if lo is not None and hi is not None else
                                    f" >= {lo}" if lo is not None else ""))(check)


@_expects("true or false")
def _bool(v, key):
    if not isinstance(v, bool):
        raise _fail(key, "true or false", v)
    return v


@_expects('a command line: a list such as ["--dataset", "fake"], or one string split as a shell would')
def check_argv(v, key):
    """A command line: a list of strings, or one string split as a shell would."""
    if v is None:
        return ()
    if isinstance(v, str):
        import shlex

        try:
            return tuple(shlex.split(v))
        except ValueError as exc:
            raise ConfigError(f"{key}: cannot split {v!r} as a command line ({exc})") from None
    if not isinstance(v, (list, tuple)) or not all(isinstance(a, (str, int, float)) for a in v):
        raise _fail(key, 'a command line: a list such as ["--dataset", "fake"], or one string', v)
    return tuple(str(a) for a in v)


@_expects("a mapping of argument names to values")
def check_mapping(v, key):
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _fail(key, "a mapping of argument names to values", v)
    return dict(v)


def check_shape(min_len: int = 1) -> Callable:
    def check(v, key):
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or len(v) < min_len:
            raise _fail(key, f"a list of at least {min_len} positive integers", v)
        for d in v:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ConfigError(f"{key}: every dimension must be a positive integer, got {list(v)}")
        return tuple(v)

    return _expects("a positive integer or a list of them" if min_len <= 1
                    else f"a list of at least {min_len} positive integers")(check)


def _pair(v, key):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _fail(key, "a list of two numbers", v)
    a, b = (_number()(x, key) for x in v)
    return a, b


@_expects("[low, high]: two numbers, low below high")
def _range(v, key):
    lo, hi = _pair(v, key)
    if lo >= hi:
        raise ConfigError(f"{key}: the low end must be below the high end, got [{lo}, {hi}]")
    return lo, hi


@_expects("[beta1, beta2]: two numbers, each in [0, 1)")
def _betas(v, key):
    a, b = _pair(v, key)
    for x in (a, b):
        if not 0.0 <= x < 1.0:
            raise ConfigError(f"{key}: each beta must be in [0, 1), got [{a}, {b}]")
    return a, b


@_expects("\"file.py:Name\" (relative to the config) or \"package.module:Name\"; from Python, the object itself")
def _model_ref(v, key):
    if v is None or isinstance(v, str):
        return _opt_str(v, key)
    # The Python API passes modules, classes or factories (and step functions) directly.
    if not callable(v):
        raise _fail(key, "'file.py:Name' or (from Python) an nn.Module, class or function", v)
    return v


@_expects("one of z, [z]; from Python, also a function (generator, z) -> fakes", ("z", "[z]"))
def _generator_call(v, key):
    if callable(v):
        return v
    return _choice("z", "[z]")(v, key)


def _path(v, key):
    if isinstance(v, Path):
        return v
    return None if v is None else Path(_str(v, key))


def _tensor_or_path(what: str) -> Callable:
    # YAML names a file; the Python API may pass the object itself (a tensor, array or dict).
    def check(v, key):
        if v is None or isinstance(v, (str, Path)):
            return _path(v, key)
        if what == "tensor" and hasattr(v, "shape") and hasattr(v, "dtype"):
            return v
        if what == "dict" and isinstance(v, dict):
            return v
        return _path(v, key)  # the YAML's own message

    return _expects("a path to a .npy or .pt file, or null; from Python, a tensor or array" if what == "tensor"
                    else "a path to a .pt file, or null; from Python, the object itself")(check)


@_expects("null (the file's own shape, or [3, 64, 64] when synthetic) or a list of "
          "positive integers [C, H, W]")
def _opt_shape(v, key):
    return None if v is None else check_shape(1)(v, key)


@_expects("a number > 0, or null")
def check_clip(v, key):
    return None if v is None else _number(0.0, lo_open=True)(v, key)


@_expects("one of " + ", ".join(m.value for m in Mode), tuple(m.value for m in Mode))
def _mode(v, key):
    return Mode(_choice(*(m.value for m in Mode))(v.value if isinstance(v, Mode) else v, key))


@_expects("one of " + ", ".join(p.value for p in Policy), tuple(p.value for p in Policy))
def _policy(v, key):
    return Policy(_choice(*(p.value for p in Policy))(v.value if isinstance(v, Policy) else v, key))


@_expects("one of " + ", ".join(k.value for k in Kernels), tuple(k.value for k in Kernels))
def _kernels(v, key):
    return Kernels(_choice(*(k.value for k in Kernels))(v.value if isinstance(v, Kernels) else v, key))


@_expects("a list of " + ", ".join(p.value for p in Precision), tuple(p.value for p in Precision))
def check_dtypes(v, key):
    if isinstance(v, (str, Precision)):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{key}: expected a non-empty list of fp32, fp16, bf16, got {v!r}")
    out = []
    for d in v:
        name = d.value if isinstance(d, Precision) else d
        out.append(Precision(_choice(*(p.value for p in Precision))(name, key)))
    return tuple(dict.fromkeys(out))


@_expects("a list of module paths that start with critic or generator, as the report names them")
def _module_paths(v, key):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise _fail(key, "a list of module paths such as critic.net.6", v)
    for name in v:
        if not isinstance(name, str) or re.split(r"[./]", name)[0] not in ("critic", "generator"):
            raise ConfigError(f"{key}: {name!r} must be a module path starting with critic or generator, "
                              "e.g. critic.net.6 or, for a Keras model, critic/conv32 (as the report names modules)")
    return tuple(dict.fromkeys(v))


SECTIONS: dict[str, tuple[type, dict[str, Callable]]] = {
    "model": (ModelConfig, {
        "critic": _model_ref, "critic_args": check_mapping, "generator": _model_ref,
        "generator_args": check_mapping, "latent_dim": check_shape(1), "generator_call": _generator_call,
        "checkpoint": _tensor_or_path("dict"),
        "init": _choice("default", "he"), "apply": _model_ref, "script_args": check_argv,
    }),
    "data": (DataConfig, {
        "source": _choice("synthetic", "file"), "path": _tensor_or_path("tensor"), "shape": _opt_shape,
        "range": _range, "batch_size": _int(1, 65536),
    }),
    "loss": (LossConfig, {
        "kind": _choice(*LOSS_KINDS), "gp_weight": _number(0.0),
        "gp_precision": _choice("autocast", "fp32"), "gp_norm": _choice("sqrt", "vector_norm"),
        "step": _model_ref,
    }),
    "train": (TrainConfig, {
        "optimizer": _choice(*OPTIMIZERS), "lr": _number(0.0, lo_open=True), "betas": _betas,
        "eps": _number(0.0), "weight_decay": _number(0.0), "steps": _int(1, 10000),
        "grad_scaler": _bool, "grad_clip": check_clip,
    }),
    "precision": (PrecisionConfig, {"mode": _mode, "dtypes": check_dtypes, "policy": _policy,
                                    "kernels": _kernels,
                                    "fp32_modules": _module_paths}),
    "state": (StateConfig, {"z": _tensor_or_path("tensor"), "rng": _tensor_or_path("dict"),
                            "optimizer": _tensor_or_path("dict"), "scaler": _tensor_or_path("dict")}),
}
TOP = {"device": _choice(*DEVICES), "seed": _int(0, 2**63 - 1)}


def _unknown(key: str, valid, where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    extra = f"; did you mean '{hint[0]}'?" if hint else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key '{where}{key}'{extra}")


def _section(name: str, raw: Any):
    cls, checks = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(name, "a mapping", raw)
    values = {}
    for key, value in raw.items():
        if key not in checks:
            raise _unknown(str(key), checks, f"{name}.")
        values[key] = checks[key](value, f"{name}.{key}")
    return cls(**values)


def from_dict(raw: Any, base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Build a checked Config from a parsed YAML document (or any mapping)."""
    if raw is None:
        raise ConfigError("the config is empty; it needs at least model.critic (every key: docs/reference/config.md)")
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a YAML mapping of sections, got {_type_name(raw)}")
    valid = list(SECTIONS) + list(TOP)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            values[key] = _section(key, value)
        elif key in TOP:
            values[key] = TOP[key](value, key)
        else:
            raise _unknown(str(key), valid, "")
    config = Config(**values, base_dir=(base_dir or Path.cwd()).resolve(), source=source)
    return validate(config)


def check(config: Config) -> Config:
    """A Config built in Python, checked key by key as a YAML one is; returns the clean copy."""
    if not isinstance(config, Config):
        raise ConfigError(f"expected a nanprobe Config or the path of a YAML config, got {_type_name(config)}")
    sections: dict[str, Any] = {}
    for name, (cls, checks) in SECTIONS.items():
        section = getattr(config, name)
        if not isinstance(section, cls):
            raise _fail(name, f"a {cls.__name__}", section)
        sections[name] = replace(section, **{k: checks[k](getattr(section, k), f"{name}.{k}") for k in checks})  # type: ignore[type-var]  # section: the dataclass checked by isinstance above
    top = {k: TOP[k](getattr(config, k), k) for k in TOP}
    return validate(replace(config, **sections, **top))


def validate(config: Config) -> Config:
    """Checks that span several keys; returns the config unchanged."""
    if config.model.critic is None and config.loss.step is None:
        raise ConfigError("model.critic is missing; set it to 'models.py:Critic' (a file next to the config) "
                          "or 'package.module:Critic'")
    if config.model.critic is None:
        raise ConfigError("model.critic is missing; a custom loss.step still needs the critic it trains")
    if config.data.source == "file" and config.data.path is None:
        raise ConfigError("data.path is missing; data.source is 'file', so give a .npy or .pt file")
    if config.data.source == "synthetic" and config.data.path is not None:
        raise ConfigError("data.path is set but data.source is 'synthetic'; set data.source: file to use it")
    if config.state.scaler is not None and not config.train.grad_scaler:
        raise ConfigError("state.scaler is set but train.grad_scaler is false; set train.grad_scaler: true")
    return config


def load(path: str | Path) -> Config:
    """Read and check a YAML config; every problem is a ConfigError with one clear line."""
    import yaml

    from nanprobe.io import yaml12

    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a file name too long
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not exists:
        raise ConfigError(f"config file not found: {path}")
    if is_dir:
        raise ConfigError(f"{path} is a folder; give the path of a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        raw = yaml12.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            # e.g. an unclosed '{' or '[': the mistake is where it starts, not where the parser gave up
            problem += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path} is empty; it needs at least model.critic (every key: docs/reference/config.md)")
    return from_dict(raw, base_dir=path.parent, source=path)


def resolve(config: Config, p: Path) -> Path:
    """A path from the config, relative to the config's folder."""
    return p if p.is_absolute() else config.base_dir / p


_OVERRIDE_SECTIONS = {"dtypes": "precision", "mode": "precision", "policy": "precision", "kernels": "precision",
                      "steps": "train"}


def with_overrides(config: Config, **overrides: Any) -> Config:
    """A copy with dotted keys ("train.steps") or short ones ("steps", "dtypes", "device") replaced, checked."""
    sections = {name: getattr(config, name) for name in SECTIONS}
    top = {}
    for key, value in overrides.items():
        if value is None:
            continue
        dotted = key.replace("__", ".")
        if "." not in dotted and dotted in _OVERRIDE_SECTIONS:
            dotted = f"{_OVERRIDE_SECTIONS[dotted]}.{dotted}"
        if "." in dotted:
            section, name = dotted.split(".", 1)
            if section not in SECTIONS:
                raise _unknown(section, list(SECTIONS), "")
            checks = SECTIONS[section][1]
            if name not in checks:
                raise _unknown(name, checks, f"{section}.")
            sections[section] = replace(sections[section], **{name: checks[name](value, dotted)})
        elif dotted in TOP:
            top[dotted] = TOP[dotted](value, dotted)
        else:
            raise _unknown(dotted, list(_OVERRIDE_SECTIONS) + list(TOP) + [f"{s}.KEY" for s in SECTIONS], "")
    return validate(replace(config, **sections, **top))


def to_dict(config: Config) -> dict:
    """The config as plain data for the JSON report."""

    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if hasattr(v, "shape") and hasattr(v, "dtype"):  # a tensor or array passed from Python
            return f"<{type(v).__name__} {list(v.shape)} {v.dtype}>"
        if isinstance(v, dict) and not all(isinstance(x, (str, int, float, bool, type(None), list, tuple))
                                           for x in v.values()):
            return f"<state_dict of {len(v)} entries>"
        if callable(v):  # a module, class or function passed from Python
            return f"<{getattr(v, '__qualname__', type(v).__name__)}>"
        if isinstance(v, (Kernels, Mode, Policy, Precision)):
            return v.value
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return repr(v)

    out: dict[str, Any] = {}
    for name in list(SECTIONS):
        section = getattr(config, name)
        out[name] = {f.name: plain(getattr(section, f.name)) for f in fields(section)}
    out["device"] = config.device
    out["seed"] = config.seed
    return out


@dataclass(frozen=True)
class KeySpec:
    """One key of the YAML config, as the generated config reference shows it."""

    key: str
    """The dotted key ("train.lr"; "seed" at the top level), as overrides name it."""
    section: str
    """The section it sits in ("train"), or "" for a top-level key."""
    name: str
    """The key within its section ("lr")."""
    owner: type
    """The dataclass that holds it (TrainConfig; Config for a top-level key), whose field docstring describes it."""
    default: Any
    """Its value when the config leaves it out."""
    expects: str
    """What its check accepts, in words ("a number > 0")."""
    choices: tuple = ()
    """The allowed values, when the key is a fixed choice."""


def schema() -> tuple[KeySpec, ...]:
    """Every key a config accepts, section by section, with the check that loads it (docs/reference/config.md)."""
    out: list[KeySpec] = []
    for section, (cls, checks) in SECTIONS.items():
        defaults = cls()
        for name, check in checks.items():
            out.append(KeySpec(f"{section}.{name}", section, name, cls, getattr(defaults, name),
                               getattr(check, "expects", ""), getattr(check, "choices", ())))
    top_defaults = Config()
    for name, check in TOP.items():
        out.append(KeySpec(name, "", name, Config, getattr(top_defaults, name),
                           getattr(check, "expects", ""), getattr(check, "choices", ())))
    return tuple(out)

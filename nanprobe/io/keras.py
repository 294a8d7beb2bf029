"""Keras 3 models, run on Keras's torch backend: loading, precisions as Keras runs them, layer names.

A Keras 3 model on the torch backend is a torch.nn.Module whose layers are torch modules too, and its
ops are aten ops, so the probe sees them as it sees a PyTorch model's. What differs is how a
precision is entered: Keras builds each layer with a dtype policy (``mixed_float16``: variables in
fp32, the layer computing in fp16), casting inputs and weights itself, so nanprobe builds one model
per precision under that policy and applies no torch autocast on top.

keras is imported only here, and only when a config names a Keras model: ``nanprobe --help`` and
PyTorch runs never import it. ``select_backend`` sets ``KERAS_BACKEND=torch`` in this process's
environment before any user file is imported, so a model file that imports keras gets the torch
backend.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nanprobe.enums import Framework, Mode, Precision
from nanprobe.errors import ConfigError

INSTALL = "pip install 'nanprobe[keras]'"
"""What a user without keras is told to run."""
FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
"""Model files loaded with keras.saving.load_model (a .weights.h5 holds weights only: a checkpoint)."""
WEIGHTS_SUFFIX = ".weights.h5"
_POLICIES = {
    (Precision.FP32, Mode.AMP): "float32", (Precision.FP32, Mode.HALF): "float32",
    (Precision.FP16, Mode.AMP): "mixed_float16", (Precision.BF16, Mode.AMP): "mixed_bfloat16",
    (Precision.FP16, Mode.HALF): "float16", (Precision.BF16, Mode.HALF): "bfloat16",
}
# Layers that carry the values through unchanged in scale, for the He value of the layer before them.
_PASS_THROUGH = ("InputLayer", "Flatten", "Reshape", "Dropout", "SpatialDropout2D", "BatchNormalization",
                 "LayerNormalization", "GroupNormalization", "ZeroPadding2D", "Cropping2D", "AveragePooling2D",
                 "MaxPooling2D", "UpSampling2D", "Identity")
_ASSUMED_SLOPE = 0.2


def policy_name(precision: Precision, mode: Mode) -> str:
    """The Keras dtype policy a precision runs under: mixed_* in amp mode, the plain dtype in half mode."""
    return _POLICIES[(precision, mode)]


def is_keras_file(ref: Any) -> bool:
    """A model.critic/generator value that names a saved Keras model."""
    if not isinstance(ref, (str, Path)):
        return False
    name = str(ref).lower()
    return name.endswith(FILE_SUFFIXES) and not name.endswith(WEIGHTS_SUFFIX)


def is_keras_model(obj: Any) -> bool:
    """Whether obj is a Keras model or layer, without importing keras."""
    return any(c.__module__.split(".")[0] == "keras" for c in type(obj).__mro__)


def select_backend() -> None:
    """Make a later `import keras` (nanprobe's or the user's file's) use the torch backend, in this process only."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"


def import_keras(key: str, what: str):
    """keras on the torch backend, or a ConfigError saying what to install or change."""
    select_backend()
    try:
        import keras
    except ImportError:
        raise ConfigError(f"{key}: {what} is a Keras model and Keras 3 is not installed; run: {INSTALL}") from None
    version = getattr(keras, "__version__", "0")
    if int(version.split(".")[0]) < 3:
        raise ConfigError(f"{key}: nanprobe needs Keras 3 (found keras {version}); run: {INSTALL}")
    backend = keras.backend.backend()
    if backend != "torch":
        raise ConfigError(f"{key}: keras was imported with the {backend} backend before nanprobe ran; nanprobe runs "
                          "Keras models on the torch backend: set KERAS_BACKEND=torch, or import nanprobe first")
    return keras


@contextmanager
def _global_policy(keras, name: str):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def named_layers(model, root: str) -> list[tuple[str, Any]]:
    """(path, layer) for the model and every layer in it, in Keras's order: "critic", "critic/down32", ..."""
    out = [(root, model)]

    def walk(layer, prefix):
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            path = f"{prefix}/{sub.name}"
            out.append((path, sub))
            walk(sub, path)

    walk(model, root)
    return out


def _user_line(files: set[str]) -> str | None:
    f = sys._getframe(2)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name in files:
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return None


@contextmanager
def _construction_lines(keras, files: tuple, lines: dict):
    """Record, for each layer built inside, the line of the user's file that constructed it."""
    wanted = {os.path.abspath(f) for f in files if f}
    layer_cls = keras.layers.Layer
    original = layer_cls.__dict__["__init__"]

    def __init__(self, *args, **kwargs):
        if id(self) not in lines:
            where = _user_line(wanted)
            if where is not None:
                lines[id(self)] = where
        original(self, *args, **kwargs)

    layer_cls.__init__ = __init__
    try:
        yield
    finally:
        layer_cls.__init__ = original


@dataclass
class KerasModel:
    """How to build one of the user's Keras models in any precision, with the reference weights."""

    role: str
    """critic or generator."""
    template: Any
    """The model built in float32 (the reference; the replays never train it)."""
    factory: Callable | None
    """The user's factory, called under each policy; None for a saved model (cloned per policy instead)."""
    args: dict = field(default_factory=dict)
    """The factory's keyword arguments."""
    lines: dict = field(default_factory=dict)
    """Layer path -> "file:line" where the user's code constructed the layer."""

    def build(self, policy: str, keep_fp32: tuple = ()) -> Any:
        """A new model under `policy`, with the template's weights; layers in keep_fp32 compute in float32."""
        keras = sys.modules["keras"]
        if self.factory is not None:
            with _global_policy(keras, policy):
                model = self.factory(**self.args)
        else:
            model = _clone_under(keras, self.template, policy)
        model.set_weights(self.template.get_weights())
        layers = dict(named_layers(model, self.role))
        for path in keep_fp32:
            layer = layers[path]
            if layer.dtype_policy.variable_dtype != "float32":
                raise ConfigError(f"precision.fp32_modules: {path} holds {layer.dtype_policy.variable_dtype} variables "
                                  f"under the {policy} policy; build it with dtype=\"float32\" in your model instead")
            layer.dtype_policy = "float32"  # as the fix tells a Keras user to do: variables are float32 already
        return model


def _prevailing(model) -> str:
    names = [layer.dtype_policy.name for _, layer in named_layers(model, "m")[1:] if layer.weights]
    names = names or [layer.dtype_policy.name for _, layer in named_layers(model, "m")[1:]]
    return max(set(names), key=names.count) if names else "float32"


def _clone_under(keras, model, policy: str):
    """A saved model rebuilt under `policy`: its layers saved with the model's prevailing policy follow it,
    the others (a layer the user built with dtype="float32") keep theirs."""
    usual = _prevailing(model)

    def clone(layer):
        config = layer.get_config()
        if layer.dtype_policy.name == usual and "dtype" in config:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    try:
        return keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:
        raise ConfigError(f"model.critic: cannot rebuild this {type(model).__name__} under the {policy} policy "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); give a 'file.py:factory' that "
                          "builds it instead of a saved file") from None


def load_file(path: Path, key: str, role: str) -> KerasModel:
    """A .keras file or a legacy .h5 (standard layers only), loaded with safe_mode (no code run from it)."""
    keras = import_keras(key, path.name)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"{key}: cannot load {path.name} as a Keras model ({first[:200]})") from None
    return KerasModel(role, _as_float32(keras, model), None)


def _as_float32(keras, model):
    if _prevailing(model) == "float32":
        return model
    fp32 = _clone_under(keras, model, "float32")
    fp32.set_weights(model.get_weights())
    return fp32


def from_factory(factory: Callable, args: dict, role: str, files: tuple, call: Callable) -> KerasModel | None:
    """Build with the user's factory under the float32 policy; None when it does not return a Keras model.

    `call` runs the factory with nanprobe's error handling (a UserCodeError naming their line).
    """
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    lines: dict = {}
    with _global_policy(keras, "float32"), _construction_lines(keras, files, lines):
        model = call()
    if not isinstance(model, keras.Model):
        return model
    paths = {id(layer): path for path, layer in named_layers(model, role)}
    return KerasModel(role, model, factory, dict(args), {paths[i]: where for i, where in lines.items() if i in paths})


def from_live(model, role: str) -> KerasModel:
    """A model passed from Python: never changed; the replays use rebuilt copies."""
    keras = import_keras(f"model.{role}", type(model).__name__)
    return KerasModel(role, _as_float32(keras, model), None)


def load_weights(km: KerasModel, path: Path, key: str) -> None:
    """A .weights.h5 checkpoint into the template (read with h5py: no code is run from it)."""
    if not path.exists():
        raise ConfigError(f"{key}: file not found: {path}")
    if not str(path).lower().endswith(WEIGHTS_SUFFIX):
        raise ConfigError(f"{key}: {path.name} is not a Keras weights file; save it with "
                          f"{km.role}.save_weights('{km.role}.weights.h5')")
    try:
        km.template.load_weights(path)
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"{key}: {path.name} does not fit the {km.role} ({first[:200]})") from None


def input_shape(model) -> tuple | None:
    """Shape of one sample the model takes, channels-last as Keras has it, if the model says."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, list):
        return None
    shape = tuple(shape[1:])
    return shape if shape and all(isinstance(d, int) for d in shape) else None


# ---- the precision strategy the replay asks


@dataclass
class KerasPrecision:
    """Keras's way into a precision: a model built under the dtype policy, fp32 inputs, no torch autocast."""

    critic: KerasModel
    """The critic's builder."""
    generator: KerasModel | None
    """The generator's builder, or None."""
    framework: Framework = Framework.KERAS

    def models(self, precision: Precision, mode: Mode, keep_fp32: tuple, init: str, seed: int):
        policy = policy_name(precision, mode)
        critic = self.critic.build(policy, tuple(p for p in keep_fp32 if p.startswith("critic/")))
        reinitialise(critic, init, seed)
        generator = None
        if self.generator is not None:
            generator = self.generator.build(policy, tuple(p for p in keep_fp32 if p.startswith("generator/")))
        return critic, generator

    def input_dtype(self, precision: Precision, mode: Mode) -> torch.dtype:
        return torch.float32  # each layer casts its inputs to its compute dtype, as in Keras training

    def autocast(self, precision: Precision, mode: Mode, device: torch.device, policy=None) -> Callable:
        return nullcontext  # the dtype policy is the mixed precision: torch autocast on top would change it

    def op_lists(self, precision: Precision, mode: Mode, device: torch.device, policy=None) -> Callable:
        # torch's CPU conv backward in fp16 (slow_conv2d) refuses the non-contiguous kernel Keras's
        # channels-last transpose makes, so a CPU replay hands it a contiguous copy (the same values)
        # in every precision, which keeps the ops of the precisions aligned.
        return _contiguous_kernels if device.type == "cpu" else nullcontext

    def fp32_wrapper(self, modules: dict, device: torch.device, precision: Precision, mode: Mode):
        return nullcontext()  # applied when the model was built (layer.dtype_policy = "float32")

    def named_modules(self, root: str, model) -> list[tuple[str, Any]]:
        return named_layers(model, root)

    def named_parameters(self, root: str, model) -> dict[str, torch.Tensor]:
        return {f"{root}/{v.path}": v.value for v in model.weights if isinstance(v.value, torch.Tensor)}

    def layer_sources(self) -> dict[str, str]:
        out = dict(self.critic.lines)
        if self.generator is not None:
            out.update(self.generator.lines)
        return out

    def library_dirs(self) -> tuple[str, ...]:
        keras = sys.modules["keras"]
        return tuple(os.path.dirname(m.__file__) for m in (keras, sys.modules.get("optree"))
                     if m is not None and getattr(m, "__file__", None))

    @contextmanager
    def training(self):
        """Calls inside run as Keras's training=True (Dropout, BatchNormalization), as a train_step calls them."""
        from keras.src.backend.common import global_state
        from keras.src.layers.layer import CallContext

        outer = global_state.get_global_attribute("current_call_ctx")
        if outer is not None:
            yield
            return
        ctx = CallContext(entry_layer=None)
        ctx.training = True
        global_state.set_global_attribute("current_call_ctx", ctx)
        try:
            yield
        finally:
            global_state.set_global_attribute("current_call_ctx", None)

    def init_checks(self, model, batch: torch.Tensor | None, root: str = "critic") -> tuple:
        return init_checks(model, batch, root)


@contextmanager
def _contiguous_kernels():
    from keras.src.backend.torch import nn as torch_nn

    original = torch_nn.__dict__["_transpose_conv_kernel"]

    def transpose(kernel):
        return original(kernel).contiguous()

    torch_nn._transpose_conv_kernel = transpose
    try:
        yield
    finally:
        torch_nn._transpose_conv_kernel = original


# ---- initialisation, in Keras's terms


def _activation(layer) -> tuple[str, float] | None:
    """(name, gain) of an activation layer or a layer's own activation=, None when it is not one."""
    cls = type(layer).__name__
    if cls == "LeakyReLU":
        a = float(getattr(layer, "negative_slope", getattr(layer, "alpha", 0.3)))
        return f"leaky_relu({a:g})", math.sqrt(2.0 / (1 + a * a))
    if cls == "ReLU":
        a = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        return (f"leaky_relu({a:g})", math.sqrt(2.0 / (1 + a * a))) if a else ("relu", math.sqrt(2.0))
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None)
    if cls == "Activation" or (name and name != "linear"):
        return {"relu": ("relu", math.sqrt(2.0)), "tanh": ("tanh", 5.0 / 3), "sigmoid": ("sigmoid", 1.0),
                "leaky_relu": ("leaky_relu(0.2)", math.sqrt(2.0 / 1.04)), "linear": ("linear", 1.0),
                "elu": ("elu", math.sqrt(2.0)), "gelu": ("gelu", math.sqrt(2.0)), "silu": ("silu", math.sqrt(2.0)),
                "swish": ("silu", math.sqrt(2.0))}.get(name or "", (name or "?", math.sqrt(2.0)))
    return None


def _following(order: list, i: int) -> tuple[str, float, bool]:
    own = _activation(order[i][1]) if type(order[i][1]).__name__ not in ("Activation", "LeakyReLU", "ReLU") else None
    if own is not None:
        return own + (False,)
    for _, layer in order[i + 1:]:
        act = _activation(layer)
        if act is not None:
            return act + (False,)
        if getattr(layer, "kernel", None) is not None or type(layer).__name__ not in _PASS_THROUGH:
            break
    else:
        return "linear", 1.0, False
    a = _ASSUMED_SLOPE
    return f"leaky_relu({a:g})", math.sqrt(2.0 / (1 + a * a)), True


def _std(t) -> float | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() < 2:
        return None
    x = t.detach().float()
    x = x[torch.isfinite(x)]
    s = float(x.std()) if x.numel() > 1 else math.nan
    return s if math.isfinite(s) else None


def init_checks(model, batch: torch.Tensor | None, root: str = "critic") -> tuple:
    """An InitCheck per layer with a kernel (Conv*, Dense), in Keras's layer order, with Keras's fans."""
    from nanprobe.fixes import INIT_FACTOR, INIT_SMALL_FACTOR
    from nanprobe.initialisation import InitCheck

    order = [(p, layer) for p, layer in named_layers(model, root)[1:] if not layer._flatten_layers(include_self=False)]
    scales: dict[str, tuple] = {}
    if batch is not None:
        handles = []
        for path, layer in order:
            if getattr(layer, "kernel", None) is not None:
                handles.append(layer.register_forward_hook(
                    lambda m, args, out, path=path: scales.setdefault(path, (_std(args[0]) if args else None, _std(out)))))
        try:
            with torch.no_grad():
                model(batch.float())
        except Exception:
            scales = {}  # the dry run and the replays report it
        finally:
            for h in handles:
                h.remove()
    out = []
    for i, (path, layer) in enumerate(order):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) < 2:
            continue
        w = torch.as_tensor(kernel.value).detach().float()
        std = float(w.std())
        if not math.isfinite(std) or std == 0:
            continue
        shape = tuple(kernel.shape)
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        act, gain, assumed = _following(order, i)
        he = gain / math.sqrt(fan_in)
        ratio = std / he
        in_std, out_std = scales.get(path, (None, None))
        getter = root + "".join(f'.get_layer("{p}")' for p in path.split("/")[1:])
        out.append(InitCheck(
            module=path, layer=type(layer).__name__, fan_in=fan_in, fan_out=fan_out, std=std,
            glorot=math.sqrt(2.0 / (fan_in + fan_out)), he=he, nonlinearity=act, assumed=assumed, ratio=ratio,
            input_std=in_std, output_std=out_std, flagged=ratio >= INIT_FACTOR or ratio <= 1 / INIT_SMALL_FACTOR,
            call=f"{getter}.kernel.assign(keras.initializers.HeNormal()({getter}.kernel.shape))"))
    return tuple(out)


def reinitialise(model, scheme: str, seed: int):
    """model.init: "he" redraws every kernel at the He scale for LeakyReLU(0.2) and zeroes the biases."""
    if scheme == "default":
        return model
    gen = torch.Generator().manual_seed(seed)
    for _, layer in named_layers(model, "m")[1:]:
        kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) < 2:
            continue
        shape = tuple(kernel.shape)
        fan_in = shape[-2] * math.prod(shape[:-2])
        std = math.sqrt(2.0 / (1 + _ASSUMED_SLOPE ** 2)) / math.sqrt(fan_in)
        kernel.assign((torch.randn(shape, generator=gen) * std).numpy())
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.assign(torch.zeros(tuple(bias.shape)).numpy())
    return model


def load_checkpoint(config, critic: KerasModel, generator: KerasModel | None) -> None:
    """model.checkpoint for Keras models: the critic's .weights.h5, or {critic: file, generator: file}."""
    from nanprobe.config import resolve

    ckpt = config.model.checkpoint
    if ckpt is None:
        return
    if isinstance(ckpt, (str, Path)):
        parts = {"critic": ckpt}
    elif isinstance(ckpt, dict) and all(isinstance(v, (str, Path)) for v in ckpt.values()) \
            and set(ckpt) <= {"critic", "generator"}:
        parts = ckpt
    else:
        raise ConfigError("model.checkpoint: for Keras models give the critic's .weights.h5 file, or "
                          "{critic: critic.weights.h5, generator: generator.weights.h5}")
    for role, path in parts.items():
        km = critic if role == "critic" else generator
        if km is None:
            raise ConfigError("model.checkpoint: has generator weights but model.generator is not set")
        load_weights(km, resolve(config, Path(path)), "model.checkpoint")

"""Keras 3 models on Keras's torch backend: loading them, and rebuilding them under a dtype policy.

A Keras 3 model on the torch backend is a torch.nn.Module whose layers are torch modules too, and its
ops are aten ops, so the probe sees them as it sees a PyTorch model's. What differs is how a
precision is entered: Keras builds each layer with a dtype policy (``mixed_float16``: variables in
fp32, the layer computing in fp16), casting inputs and weights itself, so a replay builds its own
model under that policy (nanprobe.engine.keras) and applies no torch autocast on top.

keras is imported only here, and only when a config names a Keras model: ``nanprobe --help`` and
PyTorch runs never import it. ``torch_backend`` sets ``KERAS_BACKEND=torch`` while the user's files
are imported, so a model file that imports keras gets the torch backend.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from nanprobe.errors import ConfigError

INSTALL = "pip install 'nanprobe[keras]'"
"""What a user without keras is told to run."""
FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
"""Model files loaded with keras.saving.load_model (a .weights.h5 holds weights only: a checkpoint)."""
WEIGHTS_SUFFIX = ".weights.h5"
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
    """Make a later `import keras` use the torch backend, in this process only (tests, scripts)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"


@contextmanager
def torch_backend() -> Iterator[None]:
    """A keras imported inside (by nanprobe or by the user's model file) gets the torch backend.

    KERAS_BACKEND is restored on exit: called from Python, nanprobe runs in the user's own process, and a
    keras they import later, after a PyTorch-only diagnosis, keeps the backend they chose.
    """
    if "keras" in sys.modules:
        yield
        return
    old = os.environ.get("KERAS_BACKEND")
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KERAS_BACKEND", None)
        else:
            os.environ["KERAS_BACKEND"] = old


def import_keras(key: str, what: str) -> Any:
    """keras on the torch backend, or a ConfigError saying what to install or change."""
    try:
        with torch_backend():
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
    f: FrameType | None = sys._getframe(2)
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
    fixed: dict = field(default_factory=dict)
    """Saved models: layer name -> the policy the user gave it (it differs from the model's prevailing one)."""

    @property
    def sources(self) -> dict:
        """Layer path -> "file:line" (the same as `lines`)."""
        return self.lines

    def build(self, policy: str, keep_fp32: tuple = ()) -> Any:
        """A new model under `policy`, with the template's weights; layers in keep_fp32 compute in float32."""
        keras = sys.modules["keras"]
        if self.factory is not None:
            with _global_policy(keras, policy):
                model = self.factory(**self.args)
        else:
            model = _clone_under(keras, self.template, policy, self.fixed, self.role)
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


def _fixed(model) -> dict:
    """Layers whose policy differs from the one most layers have: the user set it (dtype="float32")."""
    usual = _prevailing(model)
    return {layer.name: layer.dtype_policy.name for _, layer in named_layers(model, "m")[1:]
            if layer.dtype_policy.name != usual}


def _clone_under(keras, model, policy: str, fixed: dict, role: str):
    """The model rebuilt layer by layer under `policy`, except the layers in `fixed`, which keep theirs."""

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = fixed.get(layer.name, policy)
        return layer.__class__.from_config(config)

    try:
        return keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as exc:
        raise ConfigError(f"model.{role}: cannot rebuild this {type(model).__name__} under the {policy} policy "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); give a 'file.py:factory' that "
                          "builds it instead") from None


def _saved(keras, model, role: str) -> KerasModel:
    """A built model (loaded from a file, or passed from Python) as a float32 template and its fixed layers."""
    fixed = _fixed(model)
    template = _clone_under(keras, model, "float32", fixed, role)  # never the user's own object
    template.set_weights(model.get_weights())
    return KerasModel(role, template, None, fixed=fixed)


def load_file(path: Path, key: str, role: str) -> KerasModel:
    """A .keras file or a legacy .h5 (standard layers only), loaded with safe_mode (no code run from it)."""
    keras = import_keras(key, path.name)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"{key}: cannot load {path.name} as a Keras model ({first[:200]})") from None
    return _saved(keras, model, role)


def from_factory(factory: Callable, args: dict, role: str, files: tuple) -> Any:
    """factory(**args) under the float32 policy: a KerasModel when it returns a Keras model, else what it returns.

    Called once keras is imported (by the user's file); the lines of `files` that build each layer are kept.
    """
    keras = sys.modules["keras"]
    lines: dict = {}
    with _global_policy(keras, "float32"), _construction_lines(keras, files, lines):
        model = factory(**args)
    if not isinstance(model, keras.Model):
        return model
    paths = {id(layer): path for path, layer in named_layers(model, role)}
    return KerasModel(role, model, factory, dict(args), {paths[i]: where for i, where in lines.items() if i in paths})


def from_live(model, role: str) -> KerasModel:
    """A model passed from Python: never changed; the replays use rebuilt copies."""
    keras = import_keras(f"model.{role}", type(model).__name__)
    return _saved(keras, model, role)


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


def load_checkpoint(config, critic: KerasModel, generator: KerasModel | None) -> None:
    """model.checkpoint for Keras models: the critic's .weights.h5, or {critic: file, generator: file}."""
    from nanprobe.io.config import resolve

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

"""Loading the user's models, step function, checkpoint and data, with one-line errors."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import random
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from nanprobe.errors import ConfigError, UserCodeError
from nanprobe.io import datafile
from nanprobe.io import keras as keras_io
from nanprobe.io.config import Config, resolve


@dataclass(frozen=True)
class Loaded:
    """Everything a replay needs, built once and copied per precision."""

    critic: torch.nn.Module
    """The critic with its checkpoint loaded (fp32, on the CPU; replays copy it)."""
    generator: torch.nn.Module | None
    """The generator, or None (fakes are Gaussian noise)."""
    step_fn: Callable | None
    """The user's critic step, or None for the built-in loss."""
    data: Any
    """The data file as an array or tensor [N, C, H, W] (memory-mapped for .npy), or None for synthetic."""
    sample_shape: tuple
    """Shape of one sample."""
    user_files: tuple
    """Files of the user's code, for source lines and error messages."""
    latents: torch.Tensor | None = None
    """z for the replayed steps (state.z), or None to draw it from the seed."""
    rng: dict | None = None
    """RNG state set before the first step (state.rng): {"cpu": tensor, "cuda": tensor or absent}."""
    optimizer_state: dict | None = None
    """The optimizer's state_dict before the first step (state.optimizer)."""
    scaler_state: dict | None = None
    """The GradScaler's state_dict before the first step (state.scaler)."""
    keras: tuple | None = None
    """(critic, generator or None) as io.keras.KerasModel builders when the models are Keras models, else None."""


@contextmanager
def _no_bytecode():
    # Importing the user's file must not write __pycache__ next to it.
    old = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = old


def _user_frame(exc: BaseException, files: tuple) -> str:
    """file:line of the innermost frame of the user's code in a traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    wanted = {str(Path(f).resolve()) for f in files}
    for fr in reversed(frames):
        if str(Path(fr.filename).resolve()) in wanted:
            return f"{fr.filename}:{fr.lineno}"
    for fr in reversed(frames):
        if "site-packages" not in fr.filename and "/torch/" not in fr.filename and "nanprobe" not in fr.filename:
            return f"{fr.filename}:{fr.lineno}"
    return frames[-1].filename + f":{frames[-1].lineno}" if frames else "?"


def user_error(what: str, exc: BaseException, files: tuple) -> UserCodeError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserCodeError(f"{what} raised {type(exc).__name__}: {msg} ({_user_frame(exc, files)})")


def _exists(path: Path, key: str) -> bool:
    try:
        return path.exists()
    except OSError as exc:  # e.g. a file name too long
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def package_root(path: Path) -> tuple[Path, str | None]:
    """The folder a file's package hangs from, and the file's dotted name there; (its folder, None) outside a package.

    The rule is pytest's (its `prepend` import mode): walk up while the folder holds an
    __init__.py. A file in `models/` of a repository imports the repository's other packages
    (`from utils.logger import Logger`) and its own (`from .layers import Block`) the way
    `python main.py` at the repository's top would let it.
    """
    folder, parts = path.parent, [path.stem]
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        parts.append(folder.name)
        folder = folder.parent
    if len(parts) == 1 or not all(p.isidentifier() for p in parts):
        return path.parent, None
    return folder, ".".join(reversed(parts))


def _cached_elsewhere(dotted: str, root: Path, path: Path) -> bool:
    """Whether the process already holds a different module or package under the name the file would take."""
    held = sys.modules.get(dotted)
    if held is not None:
        return Path(getattr(held, "__file__", "") or "").resolve() != path
    top = sys.modules.get(dotted.split(".")[0])
    return top is not None and str(root / dotted.split(".")[0]) not in [
        str(Path(p).resolve()) for p in getattr(top, "__path__", [])]


def _import_package(name: str, folder: Path) -> None:
    """The package in `folder` imported under `name`."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the package in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def import_file(path: Path, key: str, argv: tuple = ()) -> ModuleType:
    """The module in a Python file; a training script's definitions alone (`scripts`), its parse_args() seeing argv."""
    if not _exists(path, key):
        raise ConfigError(f"{key}: file not found: {path}")
    path = path.resolve()
    root, dotted = package_root(path)
    alias = None
    if dotted is not None and _cached_elsewhere(dotted, root, path):
        # Another project's package of that name is loaded: this one's goes under a name of its own, so that
        # its relative imports still find its own modules.
        top, _, rest = dotted.partition(".")
        alias = (f"nanprobe_user_{abs(hash(str(root / top)))}", root / top)
        dotted = f"{alias[0]}.{rest}"
    name = dotted or f"nanprobe_user_{abs(hash((str(path), tuple(argv))))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: cannot import {path}; it must be a Python file")
    # Its package's root first, as `python main.py` there has it; then its own folder, for its neighbours.
    added = [f for f in dict.fromkeys((str(root), str(path.parent))) if f not in sys.path]
    sys.path[:0] = added
    try:
        with _no_bytecode():
            if alias is not None and alias[0] not in sys.modules:
                _import_package(*alias)
            if dotted is not None:
                module = importlib.import_module(dotted)  # its packages' __init__ run first, as in the user's own runs
            else:
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                script = _script_definitions(path)
                if script is None:
                    spec.loader.exec_module(module)
                else:
                    _run_definitions(script, module, path, argv)
    except ConfigError:  # a training script's command line
        sys.modules.pop(name, None)
        raise
    except SystemExit as exc:  # script code (argparse, sys.exit) run at import
        sys.modules.pop(name, None)
        raise UserCodeError(f"importing {path.name} called sys.exit({exc.code!r}) "
                            f"({_user_frame(exc, (str(path),))}); put its script code under "
                            "if __name__ == '__main__':") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise user_error(f"importing {path.name}", exc, (str(path),)) from None
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)  # the process's imports are the user's, not nanprobe's, after this
    return module


def _script_definitions(path: Path) -> Any:
    """The code of a training script's definitions (`scripts.definitions`), or None for a plain module."""
    from nanprobe.io import scripts

    parsed = scripts.parse(path)
    if parsed is None or not scripts.is_script(parsed[1]):
        return None
    source, tree = parsed
    return compile(scripts.definitions(tree, source, str(path)), str(path), "exec")


def _run_definitions(code: Any, module: ModuleType, path: Path, argv: tuple) -> None:
    """Run a script's definitions as the module's code, with `argv` as its command line (none: argparse's defaults).

    argparse reports a bad or missing option on stderr and exits: its message becomes the error's.
    """
    import io
    from contextlib import redirect_stderr

    saved, sys.argv = sys.argv, [str(path), *argv]
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            exec(code, module.__dict__)
        sys.stderr.write(err.getvalue())  # what the definitions themselves printed there
    except SystemExit as exc:
        said = [line for line in err.getvalue().splitlines() if line.strip()]
        why = said[-1].split("error: ", 1)[-1] if said else f"sys.exit({exc.code!r})"
        given = " ".join(argv) if argv else "no options"
        raise ConfigError(f"{path.name} is a training script and its parse_args() exited with {given}: {why}; "
                          "give its command line as model.script_args (nanprobe init --script-args \"...\")") from None
    finally:
        sys.argv = saved


def resolve_ref(config: Config, ref: str, key: str) -> tuple[Any, str]:
    """'file.py:Name' or 'package.module:Name' to the object, and the file it came from."""
    if ":" not in ref:
        raise ConfigError(f"{key}: '{ref}' must be 'file.py:Name' or 'package.module:Name'")
    target, _, attr = ref.rpartition(":")
    if not attr or not target:
        raise ConfigError(f"{key}: '{ref}' must be 'file.py:Name' or 'package.module:Name'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = resolve(config, Path(target))
        module = import_file(path, key, config.model.script_args)
    else:
        try:
            with _no_bytecode():
                module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise ConfigError(f"{key}: no module named '{target}'; "
                                  f"use 'file.py:{attr}' for a file next to the config") from None
            raise user_error(f"importing {target}", exc, ()) from None
        except Exception as exc:
            raise user_error(f"importing {target}", exc, ()) from None
    if not hasattr(module, attr):
        candidates = [n for n, v in vars(module).items()
                      if (inspect.isclass(v) and issubclass(v, torch.nn.Module) and v.__module__ == module.__name__)
                      or (inspect.isfunction(v) and v.__module__ == module.__name__)]
        hint = f"; it defines {', '.join(candidates)}" if candidates else ""
        raise ConfigError(f"{key}: '{target}' has no attribute '{attr}'{hint}")
    return getattr(module, attr), getattr(module, "__file__", "") or ""


def _raised_here(exc: BaseException) -> bool:
    """Whether the exception came from nanprobe's own call (wrong arguments), not from inside the user's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(str(Path(__file__).resolve().parents[1]))


def build_module(config: Config, ref: Any, args: dict, key: str) -> tuple[torch.nn.Module, str]:
    """A class or factory reference (or a ready module) to an nn.Module."""
    module, file, _ = _build(config, ref, args, key)
    return module, file


def _build(config: Config, ref: Any, args: dict, key: str):
    """(module, file, KerasModel or None): a PyTorch module, or a Keras model and how to rebuild it per precision."""
    with keras_io.torch_backend():  # a model file that imports keras gets its torch backend
        return _build_model(config, ref, args, key)


def _build_model(config: Config, ref: Any, args: dict, key: str):
    role = key.split(".")[-1]
    if keras_io.is_keras_file(ref):
        path = resolve(config, Path(ref))
        if not _exists(path, key):
            raise ConfigError(f"{key}: file not found: {path}")
        km = keras_io.load_file(path, key, role)
        return km.template, "", km
    if keras_io.is_keras_model(ref):
        km = keras_io.from_live(ref, role)
        return km.template, "", km
    if isinstance(ref, torch.nn.Module):
        # A module passed from Python is the user's live model: load the checkpoint into a copy, never into it.
        try:
            return copy.deepcopy(ref).cpu(), inspect.getsourcefile(type(ref)) or "", None
        except Exception as exc:
            raise ConfigError(f"{key}: cannot copy the {type(ref).__name__} passed in ({type(exc).__name__}: {exc}); "
                              "pass its class and arguments instead") from None
    file: str | None
    if isinstance(ref, str):
        obj, file = resolve_ref(config, ref, key)
    elif callable(ref):
        obj, file = ref, inspect.getsourcefile(ref) if inspect.isfunction(ref) or inspect.isclass(ref) else ""
    else:
        raise ConfigError(f"{key}: expected 'file.py:Name' or an nn.Module, got {type(ref).__name__}")
    if not callable(obj):
        raise ConfigError(f"{key}: '{ref}' is a {type(obj).__name__}, not a class or factory returning an nn.Module")
    km = None  # type: ignore[assignment]  # None unless the factory built a Keras model
    try:
        # A file that imported keras may build a Keras model: build it as Keras would, recording its layers' lines.
        module = keras_io.from_factory(obj, args, role, (file,)) if "keras" in sys.modules else obj(**args)
        if isinstance(module, keras_io.KerasModel):
            keras_io.import_keras(key, f"what {getattr(obj, '__name__', ref)} returns")  # the backend check
            km, module = module, module.template
    except ConfigError:
        raise
    except TypeError as exc:
        if not _raised_here(exc):
            # Raised inside their __init__ or factory: a bug in their code, not in {key}_args.
            raise user_error(f"building {getattr(obj, '__name__', ref)}", exc, (file,)) from None
        raise ConfigError(f"{key}: calling {getattr(obj, '__name__', obj)}(**{key}_args) failed: {exc}") from None
    except Exception as exc:
        raise user_error(f"building {getattr(obj, '__name__', ref)}", exc, (file,)) from None
    if not isinstance(module, torch.nn.Module):
        if keras_io.is_keras_model(module):  # a Keras model on another backend is not a torch module
            keras_io.import_keras(key, f"what {getattr(obj, '__name__', ref)} returns")
        raise ConfigError(f"{key}: {getattr(obj, '__name__', ref)} returned a {type(module).__name__}, "
                          "not an nn.Module")
    return module, file, km


def load_step(config: Config) -> tuple[Callable | None, str]:
    ref = config.loss.step
    if ref is None:
        return None, ""
    fn, file = resolve_ref(config, ref, "loss.step") if isinstance(ref, str) else (ref, _source_file(ref))
    if not callable(fn):
        raise ConfigError(f"loss.step: '{ref}' is not a function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn, file
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty and p.name != "scaler"]  # nanprobe passes scaler=
    has_var = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    if not has_var and (len(positional) < 4 or len(required) > 4):
        got = ", ".join(params)
        raise ConfigError(f"loss.step: {fn.__name__}({got}) must take (critic, generator, real, z) "
                          "and optionally scaler")
    return fn, file


def _source_file(fn) -> str:
    try:
        return inspect.getsourcefile(fn) or ""
    except TypeError:
        return ""


def load_checkpoint(config: Config, critic: torch.nn.Module, generator: torch.nn.Module | None) -> None:
    if config.model.checkpoint is None:
        return
    if isinstance(config.model.checkpoint, dict):  # passed from Python
        state, path = config.model.checkpoint, Path("the checkpoint dict")
    else:
        path = resolve(config, config.model.checkpoint)
        state = _load_pt(path, "model.checkpoint",
                         "save the state_dicts only, e.g. torch.save({'critic': critic.state_dict()}, path)")
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint: {path.name} holds a {type(state).__name__}, not a state_dict "
                          "or {'critic': state_dict, 'generator': state_dict}")
    parts = ({"critic": state.get("critic"), "generator": state.get("generator")} if "critic" in state
             else {"critic": state})
    for name, sd in parts.items():
        if sd is None:
            continue
        model = critic if name == "critic" else generator
        if model is None:
            continue
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            if "critic" not in state:  # a bare state_dict was expected: say what the file holds instead
                keys = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
                raise ConfigError(f"model.checkpoint: {path.name} is not a state_dict of tensors (not tensors: "
                                  f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}); save "
                                  "{'critic': critic.state_dict(), 'generator': generator.state_dict()} "
                                  "or the critic's bare state_dict")
            raise ConfigError(f"model.checkpoint: the '{name}' entry of {path.name} is not a state_dict of tensors")
        _load_state(model, sd, name, path.name)


def _load_pt(path: Path, key: str, save_hint: str):
    if not _exists(path, key):
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickles that would run code
        raise datafile.torch_load_error(key, path, exc, save_hint) from None


def load_state(config: Config) -> dict:
    """The state section's objects: tensors and dicts from Python, or read from .pt files (weights_only)."""
    out = {}
    for name in ("z", "rng", "optimizer", "scaler"):
        value = getattr(config.state, name)
        if isinstance(value, Path):
            value = _load_pt(resolve(config, value), f"state.{name}", "write it with nanprobe.watch(on_nan='dump')")
        out[name] = value
    z, rng = out["z"], out["rng"]
    if z is not None:
        z = torch.as_tensor(z)
        if z.dim() < 2 or not z.is_floating_point():
            raise ConfigError(f"state.z: expected a float tensor [B, *latent_dim], got shape {list(z.shape)} {z.dtype}")
        if tuple(z.shape[1:]) != tuple(config.model.latent_dim):
            raise ConfigError(f"state.z: its samples have shape {list(z.shape[1:])} but model.latent_dim is "
                              f"{list(config.model.latent_dim)}")
        out["z"] = z
    if rng is not None and not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor)):
        raise ConfigError("state.rng: expected {'cpu': torch.get_rng_state(), 'cuda': ...}")
    for name in ("optimizer", "scaler"):
        if out[name] is not None and not isinstance(out[name], dict):
            raise ConfigError(f"state.{name}: expected a state_dict, got {type(out[name]).__name__}")
    return out


def _load_state(model: torch.nn.Module, sd: dict, name: str, file: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]

    def few(xs):
        return ", ".join(xs[:4]) + (f" and {len(xs) - 4} more" if len(xs) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing keys {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {few(wrong)} (checkpoint vs model)")
    if problems:
        raise ConfigError(f"model.checkpoint: {file} does not fit the {name}: {'; '.join(problems)}")
    model.load_state_dict(sd)


def load_data(config: Config, model_shape: tuple | None = None) -> tuple[Any, tuple]:
    """The data set (None for synthetic samples) and the shape of one sample, by datafile's one rule;
    model_shape is the sample shape a Keras model declares (channels-last), used when data.shape is unset."""
    d = config.data
    if d.source == "synthetic":
        return None, tuple(d.shape or model_shape or DEFAULT_SHAPE)
    if not isinstance(d.path, Path):  # a tensor or array passed from Python
        datafile.check_samples(config, tuple(d.path.shape), "the tensor passed")
        return d.path, tuple(d.path.shape[1:])
    opened = datafile.open_file(config)
    return opened.array, tuple(opened.array.shape[1:])


DEFAULT_SHAPE = (3, 64, 64)


def call_generator(generator: Callable, z: torch.Tensor, call: Any = "z") -> Any:
    """The generator's fakes for z, called as model.generator_call says: generator(z), generator([z])
    (StyleGAN2-style: a list of latents in) or call(generator, z); out of a tuple or list (StyleGAN2
    returns (images, latents)), its first tensor."""
    if callable(call):
        out = call(generator, z)
    elif call == "[z]":
        out = generator([z])
    else:
        out = generator(z)
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), out)
    return out


def seed_all(seed: int) -> None:
    """Seed every global generator a model's construction or a step may draw from: torch (every device), numpy, random.

    Keras draws each unseeded initializer's seed from `random`, so a Keras model is the same from
    process to process only when `random` is seeded before it is built.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def load(config: Config) -> Loaded:
    """Build the models, load the checkpoint and open the data, failing with one clear line.

    The models are built from config.seed, so that their initial weights are the same in every run.
    """
    seed_all(config.seed)
    critic, cfile, kcritic = _build(config, config.model.critic, config.model.critic_args, "model.critic")
    generator, gfile, kgen = (None, "", None)
    if config.model.generator is not None:
        generator, gfile, kgen = _build(config, config.model.generator, config.model.generator_args, "model.generator")
    if (kcritic is None) != (kgen is None) and generator is not None:
        raise ConfigError("model.generator: the critic and the generator must both be Keras models or both "
                          "PyTorch modules")
    if kcritic is not None:
        if config.model.apply is not None:
            raise ConfigError("model.apply: applies to PyTorch modules; a Keras model's initializers are its layers'")
        keras_io.load_checkpoint(config, kcritic, kgen)
    else:
        apply_init(config, critic, generator, (cfile, gfile))
        load_checkpoint(config, critic, generator)
        critic, generator = critic.float(), generator.float() if generator is not None else None
    step_fn, sfile = load_step(config)
    data, shape = load_data(config, keras_io.input_shape(critic) if kcritic is not None else None)
    files = tuple(f for f in (cfile, gfile, sfile) if f)
    state = load_state(config)
    loaded = Loaded(critic, generator, step_fn, data, shape, files,
                    state["z"], state["rng"], state["optimizer"], state["scaler"],
                    (kcritic, kgen) if kcritic is not None else None)
    _dry_run(config, loaded)
    return loaded


def apply_init(config: Config, critic: torch.nn.Module, generator: torch.nn.Module | None, files: tuple) -> None:
    """model.apply: the user's weight init, run on every submodule of the critic, then of the generator."""
    ref = config.model.apply
    if ref is None:
        return
    fn, file = resolve_ref(config, ref, "model.apply") if isinstance(ref, str) else (ref, "")
    if not callable(fn):
        raise ConfigError(f"model.apply: '{ref}' is a {type(fn).__name__}, not a function of one module")
    name = getattr(fn, "__name__", str(ref))
    for role, model in (("critic", critic), ("generator", generator)):
        if model is None:
            continue
        try:
            model.apply(fn)
        except Exception as exc:
            raise user_error(f"model.apply: {name} on the {role}", exc, (file, *files)) from None


def _dry_run(config: Config, loaded: Loaded) -> None:
    """A two-sample fp32 forward, so shape mismatches fail here with a clear line, not mid-replay.

    The generator is left out when the step is the user's own function: it draws its own fakes."""
    n = 2
    with torch.no_grad():
        if loaded.generator is not None and loaded.step_fn is None:
            z = torch.randn(n, *config.model.latent_dim)
            try:
                fake = call_generator(loaded.generator, z, config.model.generator_call)
            except Exception as exc:
                raise user_error(f"the generator on z of shape {list(z.shape)} (model.latent_dim)", exc,
                                 loaded.user_files) from None
            if not isinstance(fake, torch.Tensor) or tuple(fake.shape[1:]) != tuple(loaded.sample_shape):
                got = list(fake.shape[1:]) if isinstance(fake, torch.Tensor) else type(fake).__name__
                raise ConfigError(f"model.generator: produces samples of shape {got} but the data's are "
                                  f"{list(loaded.sample_shape)}; check data.shape and model.latent_dim")
        x = torch.zeros(n, *loaded.sample_shape)
        try:
            out = loaded.critic(x)
        except Exception as exc:
            raise user_error(f"the critic on a batch of shape {list(x.shape)}", exc, loaded.user_files) from None
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise ConfigError(f"model.critic: returns {type(out).__name__}; it must return a tensor of scores")

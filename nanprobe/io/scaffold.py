"""`nanprobe init`: find the critic and generator in a models file and write a commented config.

Critic and generator are told apart by a dry forward on synthetic input (a critic maps [B, C, H, W]
to [B] or [B, 1]; a generator maps z [B, *latent] to [B, C, H, W]); names only break ties.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from nanprobe.errors import ConfigError
from nanprobe.io import loading, yaml12
from nanprobe.io.config import from_dict

SHAPES = ((3, 32, 32), (3, 64, 64), (1, 28, 28), (1, 32, 32), (3, 128, 128), (3, 16, 16), (3, 8, 8))
"""Sample shapes tried, after the ones the constructors' defaults suggest."""
LATENTS = ((128,), (100,), (64,), (256,), (512,), (128, 1, 1), (100, 1, 1), (64, 1, 1))
"""Latent shapes tried, after the ones the constructors' defaults suggest."""

_SIZE = {"img", "img_size", "image_size", "imsize", "resolution", "res", "size", "img_res", "image_res"}
_CHANNELS = {"in_ch", "in_channels", "nc", "channels", "img_channels", "image_channels", "n_channels",
             "num_channels", "out_ch", "out_channels", "c_dim"}
_LATENT = {"latent_dim", "z_dim", "nz", "zdim", "latent_size", "noise_dim", "dim_z", "latent", "z_size", "nlatent"}
_WIDTH = {"ch", "ndf", "ngf", "nf", "base_ch", "base_channels", "width", "features", "hidden_dim", "channels_base"}
# The number of GPUs a model spreads itself over (PyTorch's DCGAN example: Discriminator(ngpu)): one, for a replay.
_GPUS = {"ngpu", "n_gpu", "n_gpus", "num_gpus", "gpus"}
_CRITIC = re.compile(r"critic|discrim|^d$|^disc$|^netd$")
_GENERATOR = re.compile(r"generator|^gen$|^g$|^netg$")


@dataclass(frozen=True)
class Guess:
    """A class or factory found to work as a critic or a generator."""

    name: str
    """Its name in the models file."""
    args: dict
    """Constructor arguments nanprobe had to guess ({} when the defaults built it)."""
    shape: tuple
    """Sample shape (C, H, W): accepted (critic) or produced (generator)."""
    latent: tuple | None = None
    """Shape of z after the batch dimension (generators)."""
    call: str = "z"
    """How the generator takes z: "z", or "[z]" for a list of latents (model.generator_call)."""


@dataclass(frozen=True)
class Scaffold:
    """What `nanprobe init` found, and the config it wrote."""

    critic: Guess
    """The critic."""
    generator: Guess | None
    """The generator, or None (fakes are then Gaussian noise)."""
    notes: tuple[str, ...]
    """How each choice was made, one line each."""
    text: str
    """The commented YAML config."""
    rejected: tuple[str, ...] = ()
    """Each candidate that did not work as the generator, with why: "Name: the exception and its line"."""


class _NeedsArgs(Exception):
    pass


def _tokens(name: str) -> list[str]:
    return [t.lower() for t in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+|[A-Z]", name)]


def _hinted(name: str, pattern: re.Pattern) -> bool:
    return bool(pattern.search(name.lower())) or any(pattern.search(t) for t in _tokens(name))


def _candidates(module) -> dict[str, Callable]:
    """nn.Module classes, and factories whose name or return annotation says they build one."""
    found: dict[str, Callable] = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and not inspect.isabstract(obj):
            found[name] = obj
        elif inspect.isfunction(obj) and all(_guessable(p.name) for p in _params(obj) if p.default is p.empty):
            # A function with arguments nanprobe cannot fill (a training step, say) is no factory.
            returns = str(inspect.signature(obj).return_annotation)
            if "Module" in returns or _hinted(name, _CRITIC) or _hinted(name, _GENERATOR):
                found[name] = obj
    return found


def _params(obj: Callable) -> list[inspect.Parameter]:
    try:
        return [p for p in inspect.signature(obj).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _guess_arg(name: str, shape: tuple, latent: tuple) -> Any:
    key = name.lower()
    if key in _SIZE:
        return shape[1]
    if key in _CHANNELS:
        return shape[0]
    if key in _LATENT:
        return latent[0]
    if key in _WIDTH:
        return 32
    if key in _GPUS:
        return 1
    raise _NeedsArgs(name)


def _preferred(candidates: dict, names: set, make: Callable) -> list:
    """Values suggested by the constructors' defaults (e.g. img=32 -> 3x32x32), most common first."""
    seen = []
    for obj in candidates.values():
        defaults = {p.name.lower(): p.default for p in _params(obj) if p.default is not p.empty}
        for key, value in defaults.items():
            if key in names and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                guess = make(value, defaults)
                if guess and guess not in seen:
                    seen.append(guess)
    return seen


class _Builder:
    """Builds each candidate once per distinct set of guessed arguments, and remembers why it could not."""

    def __init__(self, file: str):
        self.file = file
        self.cache: dict = {}
        self.problems: dict[str, str] = {}

    def build(self, name: str, obj: Callable, shape: tuple, latent: tuple) -> tuple[nn.Module | None, dict]:
        try:
            args = {p.name: _guess_arg(p.name, shape, latent) for p in _params(obj) if p.default is p.empty}
        except _NeedsArgs:
            missing = [p.name for p in _params(obj) if p.default is p.empty and not _guessable(p.name)]
            self.problems.setdefault(name, f"{name}({', '.join(missing)}) needs arguments nanprobe cannot guess")
            return None, {}
        key = (name, tuple(sorted(args.items())))
        if key not in self.cache:
            try:
                torch.manual_seed(0)
                module = obj(**args)
                self.cache[key] = module if isinstance(module, nn.Module) else None
                if self.cache[key] is None:
                    self.problems.setdefault(name, f"{name} returned a {type(module).__name__}, not an nn.Module")
            except Exception as exc:  # the user's constructor: keep looking, say why if nothing fits
                self.cache[key] = None
                self.problems.setdefault(name, str(loading.user_error(f"building {name}", exc, (self.file,))))
        return self.cache[key], args


def _guessable(name: str) -> bool:
    return name.lower() in _SIZE | _CHANNELS | _LATENT | _WIDTH | _GPUS


def _scores(module: nn.Module, shape: tuple) -> bool:
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape))
    except Exception:  # a shape it does not take: try the next
        return False
    return isinstance(out, torch.Tensor) and out.is_floating_point() and out.shape[:1] == (2,) and out.numel() == 2


def _generates(module: nn.Module, latent: tuple, name: str, file: str) -> tuple[tuple, str] | tuple[int, str]:
    """((sample shape), generator_call) when module maps z [2, *latent] to an image batch, else
    (how far it got, why not): a wrong output beats any exception, a later line of the file an earlier one.

    z goes in as a tensor, then as a list of one latent (StyleGAN2's generators); out of a tuple or
    list (StyleGAN2 returns (images, latents)) the first tensor counts."""
    z = torch.randn(2, *latent)
    best: tuple[int, str] = (-1, "")
    for call in ("z", "[z]"):
        try:
            with torch.no_grad():
                out = loading.call_generator(module, z, call)
        except Exception as exc:
            lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__)
                     if os.path.abspath(f.filename) == os.path.abspath(file)]
            why = str(loading.user_error(f"{name}({call}) with z [2, {_fmt(latent, ', ')}]", exc, (file,)))
            best = max(best, (lines[-1] if lines else 0, why), key=lambda b: b[0])  # type: ignore[arg-type, assignment, return-value]  # frames of a file have line numbers
            continue
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 4 and out.shape[0] == 2:
            return tuple(out.shape[1:]), call
        got = f"[{', '.join(map(str, out.shape))}]" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        best = max(best, (10 ** 9, f"{name}({call}) with z [2, {_fmt(latent, ', ')}] returns {got}, "
                                   "not an image batch [B, C, H, W]"), key=lambda b: b[0])
    return best


def _fmt(shape: tuple, sep: str = "x") -> str:
    return sep.join(str(d) for d in shape)


def scaffold(models: str | Path, critic: str | None = None, generator: str | None = None,
             config_path: str | Path | None = None, script_args: tuple = ()) -> Scaffold:
    """Inspect models (a .py file) and return a config for it; config_path is where it will be written
    (None: the working directory), so that the model paths in it are relative to it.

    Raises ConfigError (or UserCodeError) with one line when the file has no usable critic.
    """
    path = Path(models)
    if path.suffix != ".py":
        raise ConfigError(f"{path}: give the Python file that defines your models (a .py file)")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    module = loading.import_file(path, str(path), tuple(script_args))
    found = _candidates(module)
    for flag, name in (("--critic", critic), ("--generator", generator)):
        if name is not None and name not in found:
            obj = getattr(module, name, None)
            if obj is None:
                listed = ", ".join(found) or "no nn.Module classes or factories"
                raise ConfigError(f"{flag}: {path.name} has no '{name}'; it defines {listed}")
            if not callable(obj):
                raise ConfigError(f"{flag}: {name} in {path.name} is a {type(obj).__name__}, not a class or factory")
            found[name] = obj
    shapes = _preferred(found, _SIZE,
                        lambda v, d: (next((d[k] for k in _CHANNELS if isinstance(d.get(k), int)), 3), v, v))
    shapes += [s for s in SHAPES if s not in shapes]
    latents = _preferred(found, _LATENT, lambda v, d: (v,))
    latents += [z for z in LATENTS if z not in latents]
    builder = _Builder(str(path))

    gens: list[Guess] = []
    rejected: dict[str, tuple[int, str]] = {}
    for name, obj in found.items():
        if (generator is not None and name != generator) or name == critic:
            continue
        for latent in latents:
            model, args = builder.build(name, obj, shapes[0], latent)
            got = _generates(model, latent, name, str(path)) if model is not None else \
                (-2, builder.problems.get(name, f"{name} could not be built"))
            if isinstance(got[0], tuple):
                gens.append(Guess(name, args, got[0], latent, got[1]))
                rejected.pop(name, None)
                break
            # The attempt that got furthest into the generator is the reason worth reading.
            if name not in rejected or got[0] > rejected[name][0]:
                rejected[name] = got
    if generator is not None and not gens:
        why = rejected[generator][1] if generator in rejected else builder.problems.get(generator, "")
        raise ConfigError(f"--generator {generator}: maps no latent of shape {', '.join(_fmt(z) for z in latents[:6])} "
                          f"to an image batch [B, C, H, W] ({why})")

    def critic_for(shape: tuple) -> Guess | None:
        ranked = sorted((n for n in found if (critic is None or n == critic) and n not in {g.name for g in gens}),
                        key=lambda n: (not _hinted(n, _CRITIC), not inspect.isclass(found[n])))
        if critic is not None:
            ranked = [critic]
        for name in ranked:
            model, args = builder.build(name, found[name], shape, latents[0])
            if model is not None and _scores(model, shape):
                return Guess(name, args, shape)
        return None

    notes = []
    gens.sort(key=lambda g: not _hinted(g.name, _GENERATOR))
    chosen_g, chosen_c = None, None
    for g in gens:
        chosen_c = critic_for(g.shape)
        if chosen_c is not None:
            chosen_g = g
            break
    if chosen_c is None:
        for shape in shapes:
            chosen_c = critic_for(shape)
            if chosen_c is not None:
                break
    if chosen_c is None:
        tried = ", ".join(_fmt(s) for s in shapes[:8])
        if critic is not None:
            why = builder.problems.get(critic, f"{critic} maps no batch of shape {tried} to scores [B] or [B, 1]")
            raise ConfigError(f"--critic {critic}: {why}")
        why = "; ".join(builder.problems.values())
        raise ConfigError(f"no nn.Module in {path.name} maps an image batch ({tried}) to scores [B] or [B, 1]"
                          + (f" ({why})" if why else "") + "; name it with --critic NAME")
    if gens and chosen_g is None:
        notes.append(f"{', '.join(g.name for g in gens)} produce samples that {chosen_c.name} does not take; "
                     "no generator is used")
    rejected.pop(chosen_c.name, None)  # the critic: of course it is no generator
    if chosen_g is None and rejected:
        notes.append("no generator found: " + "; ".join(f"{n}: {why}" for n, (_, why) in rejected.items()))
    result = _render(path, found, chosen_c, chosen_g, critic, generator, notes, config_path, _weight_init(path),
                     tuple(script_args))
    return dataclasses.replace(result, rejected=tuple(f"{n}: {why}" for n, (_, why) in rejected.items()))


def _why_critic(c: Guess, found: dict, named: bool) -> str:
    if named:
        return f"named with --critic; it maps [B, {', '.join(map(str, c.shape))}] to scores"
    others = [n for n in found if n != c.name]
    hint = "its name and " if _hinted(c.name, _CRITIC) else ""
    return f"guessed from {hint}a dry forward: it maps a batch [B, {', '.join(map(str, c.shape))}] to scores" + \
        (f" (the file also defines {', '.join(others[:6])})" if others else "")


def _ref_path(models: Path, config_path: Path | None) -> str:
    folder = (config_path.parent if config_path is not None else Path.cwd()).resolve()
    try:
        return Path(os.path.relpath(models.resolve(), folder)).as_posix()
    except ValueError:  # another drive on Windows
        return models.resolve().as_posix()


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False).strip()


def _weight_init(path: Path) -> tuple[str, str, int] | None:
    """(function, what it is applied to, line) of the first `model.apply(fn)` in the file whose fn the file defines
    at its top level: the weight init its training runs (`netD.apply(weights_init)`), or None."""
    import ast

    from nanprobe.io import scripts

    parsed = scripts.parse(path)
    if parsed is None:
        return None
    tree = parsed[1]
    functions = {s.name for s in tree.body if isinstance(s, ast.FunctionDef)}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "apply" and len(n.args) == 1 and not n.keywords
             and isinstance(n.args[0], ast.Name) and n.args[0].id in functions]
    if not calls:
        return None
    first = min(calls, key=lambda n: n.lineno)
    return first.args[0].id, ast.unparse(first.func.value), first.lineno  # type: ignore[attr-defined]  # a Name and an Attribute, checked above


def _render(models: Path, found: dict, c: Guess, g: Guess | None, named_c, named_g, notes: list,
            config_path: str | Path | None, init: tuple[str, str, int] | None = None,
            script_args: tuple = ()) -> Scaffold:
    config_path = Path(config_path) if config_path is not None else None
    ref = _ref_path(models, config_path)
    where = "this file" if config_path is not None else f"the folder it is run from ({Path.cwd()})"
    shape = g.shape if g is not None else c.shape
    lines = [
        f"# Written by `nanprobe init {models}`. Check the lines marked 'guessed', then run:",
        f"#   nanprobe diagnose {config_path if config_path is not None else 'THIS.yaml'}",
        f"# Paths are relative to {where}; every key is described in docs/reference/config.md.",
        "model:",
        f"  # The critic, {_why_critic(c, found, named_c is not None)}.",
        f"  critic: {ref}:{c.name}",
        f"  critic_args: {_flow(c.args)}" + (
            "  # guessed from the argument names: check them" if c.args
            else "  # keyword arguments; {} = its defaults"),
    ]
    if g is not None:
        how = ("The generator, named with --generator" if named_g is not None
               else "The generator, guessed from a dry forward")
        lines += [
            f"  # {how}: it maps z of shape [B, {', '.join(map(str, g.latent))}] to samples "  # type: ignore[arg-type]  # not None on this path
            f"[B, {', '.join(map(str, g.shape))}], which {c.name} takes.",
            f"  generator: {ref}:{g.name}",
            f"  generator_args: {_flow(g.args)}" + (
                "  # guessed from the argument names: check them" if g.args else "  # {} = its defaults"),
            f"  latent_dim: {g.latent[0] if len(g.latent) == 1 else _flow(list(g.latent))}"  # type: ignore[arg-type, index]  # not None on this path
            "  # guessed: the first z shape the generator took; z ~ N(0, 1)",
        ]
        if g.call != "z":
            lines.append(f"  generator_call: \"{g.call}\"  # it takes a list of latents (StyleGAN2-style); "
                         "its first tensor out is the fakes")
    else:
        lines += ["  # No generator found (or none that fits the critic): "
                  "fakes are Gaussian noise of the data's shape.",
                  f"  # Add one with generator: {ref}:Name and latent_dim."]
    if script_args:
        lines.append(f"  script_args: {_flow(list(script_args))}  # the command line its parse_args() sees")
    if init is not None:
        fn, target, line = init
        lines.append(f"  apply: {ref}:{fn}  # found {target}.apply({fn}) at line {line}: "
                     "called on the critic and the generator once built")
    lines += [f"  # {n}." for n in notes]
    how_shape = f"what {g.name} produces and {c.name} takes" if g is not None else f"the first shape {c.name} took"
    lines += [
        "data:",
        "  source: synthetic  # uniform noise in `range`; for real samples: source: file, path: batch.npy [N, C, H, W]",
        f"  shape: {_flow(list(shape))}" + f"  # guessed: {how_shape}",
        "  range: [-1, 1]  # the value range your models expect (tanh images: [-1, 1])",
        "  batch_size: 16  # samples per critic step",
        "loss:",
        "  kind: wgan-gp  # wgan-gp | r1 | hinge | non-saturating: the loss you train with (not guessed)",
        "  gp_weight: 10.0  # lambda for wgan-gp, gamma for r1",
        "  gp_precision: autocast  # the penalty inside autocast, as most training code has it",
        "train:",
        "  optimizer: adam  # adam | adamw | sgd | rmsprop, as in your training",
        "  lr: 1.0e-4",
        "  betas: [0.0, 0.9]",
        "  steps: 1  # critic steps replayed per precision",
        "  grad_scaler: false  # true if your loop uses torch.amp.GradScaler",
        "precision:",
        "  mode: amp  # amp (autocast) | half (model cast to the dtype)",
        "  dtypes: [fp32, fp16, bf16]",
        "device: auto  # cuda when available, else cpu",
        "seed: 0",
    ]
    text = "\n".join(_align(line) for line in lines) + "\n"
    _check(text, config_path)
    return Scaffold(critic=c, generator=g, notes=tuple(notes), text=text)


def _align(line: str, column: int = 28) -> str:
    content, sep, comment = line.partition("  # ")
    if not sep or not content.strip() or content.lstrip().startswith("#"):
        return line
    return f"{content.rstrip() + '  ':<{column}}# {comment}"


def _check(text: str, config_path: Path | None) -> None:
    """The config must load and pass diagnose's dry run, or nothing is written."""
    base = config_path.parent if config_path is not None else Path.cwd()
    loading.load(from_dict(yaml12.load(text), base_dir=base, source=config_path))

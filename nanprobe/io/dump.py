"""A failing training step written to a folder that `nanprobe diagnose DUMP/config.yaml` replays exactly.

The folder holds the state from before the step (checkpoint.pt: critic and generator; optimizer.pt;
scaler.pt), its inputs (batch.pt, z.pt, rng.pt), copies of the Python files that define the models
and the step function (so it replays on another machine without the training script), and config.yaml.
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanprobe.errors import ConfigError
from nanprobe.io import config as cfg


@dataclass(frozen=True)
class Ref:
    """How the dump's config names one piece of the user's code."""

    ref: str
    """The config value: "file.py:Name" (the file is copied next to config.yaml) or "package.module:Name"."""
    file: Path | None
    """The file copied into the dump, or None for an importable package module."""
    args: dict
    """Keyword arguments that rebuild it (models)."""


def _auto_ref(obj: Any, what: str, option: str) -> tuple[str, Path | None]:
    target = obj if callable(obj) and not isinstance(obj, torch.nn.Module) else type(obj)
    name, module = getattr(target, "__qualname__", ""), getattr(target, "__module__", "") or ""
    if not name or "<" in name or "." in name:
        raise ConfigError(f"nanprobe.watch: a dump's config cannot name {what} ({name or repr(target)} is not defined "
                          f"at the top level of a file); pass {option}='file.py:Name'")
    mod = sys.modules.get(module)
    file = getattr(mod, "__file__", None)
    if "." in module:
        return f"{module}:{name}", None  # a package module: the replaying machine imports it by name
    if not file:
        raise ConfigError(f"nanprobe.watch: a dump's config cannot name {what} ({module}.{name} has no source file, "
                          f"e.g. defined in a notebook); pass {option}='file.py:Name'")
    return f"{Path(file).name}:{name}", Path(file).resolve()


def _given_ref(given: str, option: str) -> tuple[str, Path | None]:
    target, _, attr = given.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"nanprobe.watch: {option} must be 'file.py:Name' or 'package.module:Name', got {given!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise ConfigError(f"nanprobe.watch: {option}: file not found: {path}")
        return f"{path.name}:{attr}", path
    return given, None


def check_args(cls: type, shapes: dict[str, tuple] | None, args: dict, what: str) -> None:
    """Build the class with the args once, now, so a dump that cannot rebuild the model fails at start.

    shapes: the user's model's state, name -> shape, that the built one must match (None: not checked).
    """
    try:
        with torch.random.fork_rng(devices=[]):  # the user's training RNG stream is left untouched
            fresh = cls(**args)
    except Exception as exc:
        raise ConfigError(f"nanprobe.watch: {cls.__name__}(**{what}_args) raised {type(exc).__name__}: {exc}; "
                          f"pass {what}_args={{...}}, the arguments you built the {what} with") from None
    if shapes is None:
        return
    new = fresh.state_dict()
    wrong = [k for k in shapes if k not in new or tuple(new[k].shape) != shapes[k]]
    wrong += [k for k in new if k not in shapes]
    if wrong:
        raise ConfigError(f"nanprobe.watch: {cls.__name__}(**{args!r}) builds a {what} whose weights do not fit yours "
                          f"({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}); pass {what}_args={{...}}, "
                          f"the arguments you built it with")


def references(critic: torch.nn.Module, generator: torch.nn.Module | None, loss_fn: Callable | None,
               critic_ref: str | None, critic_args: dict | None, generator_ref: str | None,
               generator_args: dict | None, loss_ref: str | None,
               classes: dict[str, tuple[type, dict[str, tuple] | None]] | None = None) -> dict[str, Ref]:
    """How a dump names the critic, generator and step function; raises ConfigError when it cannot.

    classes: "critic"/"generator" -> (the user's class, its state's shapes or None) for a model whose own
    type is not the user's class (FSDP2 swaps it for a subclass; FSDP1's inner module holds flat shards).
    """
    out = {}
    for key, obj, given, args in (("critic", critic, critic_ref, critic_args),
                                  ("generator", generator, generator_ref, generator_args)):
        if obj is None:
            continue
        args = cfg.check_mapping(args, f"{key}_args")
        cls, shapes = (classes or {}).get(key) or (type(obj), {k: tuple(v.shape) for k, v in obj.state_dict().items()})
        ref, file = _given_ref(given, f"{key}_ref") if given else _auto_ref(cls, f"the {key}", f"{key}_ref")
        if not given:
            check_args(cls, shapes, args, key)
        out[key] = Ref(ref, file, args)
    if loss_fn is not None:
        ref, file = _given_ref(loss_ref, "loss_ref") if loss_ref else _auto_ref(loss_fn, "the loss function",
                                                                                "loss_ref")
        out["step"] = Ref(ref, file, {})
    return out


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _folder(root: Path, step: int) -> Path:
    folder = root / f"step-{step:06d}"
    n = 1
    while folder.exists():
        folder = root / f"step-{step:06d}-{n}"
        n += 1
    return folder


_HEADER = """\
# A training step that turned non-finite, written by nanprobe.watch.
# Replay it (on any machine with the files below and torch): nanprobe diagnose {folder}/config.yaml
# checkpoint.pt: critic and generator before the step; batch.pt, z.pt, rng.pt: its inputs and RNG state;
# optimizer.pt, scaler.pt: their state before the step. {copied}
"""


def write(root: Path, step: int, config: cfg.Config, refs: dict[str, Ref]) -> Path:
    """Write the step (an in-memory Config from Watch.config) to a new folder under root; returns it."""
    folder = _folder(Path(root), step)
    folder.mkdir(parents=True)
    copied: dict[Path, str] = {}
    for r in refs.values():
        if r.file is not None and r.file not in copied:
            name = r.file.name
            if name in copied.values():
                raise ConfigError(f"nanprobe.watch: two different files named {name} define your code; "
                                  "pass critic_ref/generator_ref/loss_ref naming one of them as 'package.module:Name'")
            shutil.copyfile(r.file, folder / name)
            copied[r.file] = name
    doc = cfg.to_dict(config)
    model = doc["model"]
    model["critic"], model["critic_args"] = refs["critic"].ref, refs["critic"].args
    if "generator" in refs:
        model["generator"], model["generator_args"] = refs["generator"].ref, refs["generator"].args
    files = {"checkpoint.pt": config.model.checkpoint, "batch.pt": config.data.path, "z.pt": config.state.z,
             "rng.pt": config.state.rng, "optimizer.pt": config.state.optimizer, "scaler.pt": config.state.scaler}
    for name, value in files.items():
        if value is not None:
            torch.save(_cpu(value), folder / name)
    model["checkpoint"] = "checkpoint.pt"
    doc["data"].update(path="batch.pt", range=list(config.data.range))
    if "step" in refs:
        doc["loss"]["step"] = refs["step"].ref
    doc["state"] = {key: name for key, name in (("z", "z.pt"), ("rng", "rng.pt"), ("optimizer", "optimizer.pt"),
                                                ("scaler", "scaler.pt")) if files[name] is not None}
    doc["device"] = "auto"
    import yaml

    note = f"Copied code: {', '.join(sorted(copied.values()))}." if copied else ""
    text = _HEADER.format(folder=folder, copied=note) + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    (folder / "config.yaml").write_text(text, encoding="utf-8")
    return folder

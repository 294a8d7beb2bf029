"""FSDP-sharded models: the module the user wrote, this rank's shards, and the full state when a step fails.

FSDP2 (`fully_shard`) keeps each parameter as a DTensor holding this rank's shard; FSDP1
(`FullyShardedDataParallel`) keeps flat shards of many parameters at once. Per step nanprobe reads
only this rank's shards, with no collective of its own. The full state is gathered only for a failing
step, through torch.distributed.checkpoint's state-dict API, which every rank must call together.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from nanprobe.engine import compat
from nanprobe.errors import ConfigError


@dataclass(frozen=True)
class Sharded:
    """How a model is sharded, and what rebuilds it whole on one process."""

    root: torch.nn.Module
    """The module the state-dict API gathers from: the FSDP1 wrapper, or the module itself under FSDP2."""
    cls: type
    """The user's class (FSDP2 swaps the module's class for an FSDP subclass of it); a replay builds it."""
    kind: str
    """"FSDP1" or "FSDP2"."""


def _types() -> tuple[type | None, type | None]:
    # Only a program that imported FSDP can hold an FSDP module: nanprobe never imports it itself.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    one, two = getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)
    return (one if isinstance(one, type) else None), (two if isinstance(two, type) else None)


def _dtensor() -> type | None:
    found = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return found if isinstance(found, type) else None


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter), else t itself."""
    dtensor = _dtensor()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t  # type: ignore[attr-defined]  # a DTensor here


def unwrap(module: torch.nn.Module, what: str) -> tuple[torch.nn.Module, Sharded | None]:
    """The module whose forward and parameters the user wrote, and how it is sharded (None: it is not)."""
    one, two = _types()
    if one is not None and isinstance(module, one):
        inner = cast(torch.nn.Module, module.module)
        return inner, Sharded(module, type(inner), "FSDP1")
    if two is not None and isinstance(module, two):
        cls = next(c for c in type(module).__mro__ if not issubclass(c, two))
        return module, Sharded(module, cls, "FSDP2")
    dtensor = _dtensor()
    if (two is not None and any(isinstance(m, two) for m in module.modules())) or (
            dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())):
        return module, Sharded(module, type(module), "FSDP2")  # fully_shard on its children only
    if one is not None and any(isinstance(m, one) for m in module.modules()):
        return module, Sharded(module, type(module), "FSDP1")
    if any(compat.is_flat_param(p) for p in module.parameters()):
        raise ConfigError(f"nanprobe.watch: the {what} ({type(module).__name__}) is the module inside a "
                          "FullyShardedDataParallel wrapper; pass the wrapper, whose state can be gathered")
    return module, None


def full_state(sharded: Sharded, optimizer: torch.optim.Optimizer | None,
               rank0_only: bool) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The full (unsharded) model state dict, keyed as the user's module names it, and the optimizer's.

    A collective: every rank must call it. With rank0_only the state is offloaded to rank 0's CPU one
    tensor at a time and the other ranks get {}; without, every rank gets all of it on its device.
    The optimizer's is keyed by parameter name, as the state-dict API writes it (None without one).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    model = get_model_state_dict(sharded.root, options=options)
    optim = get_optimizer_state_dict(sharded.root, optimizer, options=options) if optimizer is not None else None
    return model, optim  # type: ignore[return-value]  # the API's value type is wider than what FSDP returns


@contextmanager
def holding(live: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block the live tensors hold `values`; after it, their own values again."""
    own = [t.clone() for t in live]
    if live:
        compat.foreach_copy_(live, values)
    try:
        yield
    finally:
        if live:
            compat.foreach_copy_(live, own)


def named_locals(module: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """This rank's shards of a module's parameters and buffers (what the state-dict API gathers), by name."""
    named: list[tuple[str, Any]] = [*module.named_parameters(), *module.named_buffers()]
    return [n for n, _ in named], [local(t.detach()) for _, t in named]

"""How the replay enters a precision for the user's models: a strategy per framework.

The replay asks one object for its models in a precision, the dtype of their inputs, the autocast
around the step, how modules and parameters are named and which files are library code. PyTorch
models are copied, cast (half mode) and run under torch.autocast (amp mode); Keras models are
rebuilt under Keras's dtype policy (nanprobe.engine.keras.KerasPrecision), with no autocast on top.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

from nanprobe.engine import fp32_modules
from nanprobe.engine.reinit import reinitialise
from nanprobe.enums import Framework, Mode, Policy, Precision


class PrecisionStrategy(Protocol):
    """What the replay asks of the framework the models are written in."""

    framework: Framework

    def models(self, precision: Precision, mode: Mode, keep_fp32: tuple, init: str, seed: int) -> tuple:
        """Fresh (critic, generator) in the precision on the CPU, fp32 kept for the modules in keep_fp32."""

    def input_dtype(self, precision: Precision, mode: Mode) -> torch.dtype:
        """The dtype the batch and z are given to the models in."""

    def autocast(self, precision: Precision, mode: Mode, device: torch.device, policy: Policy) -> Callable:
        """A factory of the context the step runs in."""

    def op_lists(self, precision: Precision, mode: Mode, device: torch.device, policy: Policy) -> Callable:
        """A factory of the context around the whole replay (whose autocast op lists it follows)."""

    def fp32_wrapper(self, modules: dict, device: torch.device, precision: Precision,
                     mode: Mode) -> AbstractContextManager:
        """The context that runs `modules` in fp32 (precision.fp32_modules)."""

    def named_modules(self, root: str, model) -> list[tuple[str, Any]]:
        """(path, module) for the probe's module names and precision.fp32_modules."""

    def named_parameters(self, root: str, model) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor, for optimizer findings."""

    def layer_sources(self) -> dict[str, str]:
        """Module path -> "file:line" where the user's code built it, for ops that run in library code."""

    def library_dirs(self) -> tuple[str, ...]:
        """Folders of library code the source lines skip, besides torch's and the standard library's."""

    def training(self) -> AbstractContextManager:
        """The context the step runs in so the models run in training mode."""


class TorchPrecision:
    """PyTorch's way: a deep copy, cast to the dtype in half mode, torch.autocast in amp mode."""

    framework = Framework.TORCH

    def __init__(self, critic: torch.nn.Module, generator: torch.nn.Module | None):
        self.critic, self.generator = critic, generator

    def models(self, precision: Precision, mode: Mode, keep_fp32: tuple, init: str, seed: int) -> tuple:
        dtype = precision.torch_dtype if precision.is_low and mode is Mode.HALF else torch.float32
        critic = reinitialise(copy.deepcopy(self.critic), init, seed).to(dtype=dtype).train()
        generator = None if self.generator is None else copy.deepcopy(self.generator).to(dtype=dtype).train()
        if dtype != torch.float32:
            kept = fp32_modules.find({"critic": critic, "generator": generator}, keep_fp32, self.named_modules)
            for m in kept.values():
                m.float()  # fp32 weights (and optimizer state) for the modules kept in fp32
        return critic, generator

    def input_dtype(self, precision: Precision, mode: Mode) -> torch.dtype:
        return precision.torch_dtype if precision.is_low and mode is Mode.HALF else torch.float32

    def autocast(self, precision: Precision, mode: Mode, device: torch.device, policy: Policy) -> Callable:
        if not precision.is_low or mode is Mode.HALF:
            return nullcontext
        dtype = precision.torch_dtype
        if device.type == "cpu" and policy is Policy.CUDA:
            from nanprobe.engine.autocast_policy import cuda_autocast

            return lambda: cuda_autocast(dtype)
        return lambda: torch.autocast(device.type, dtype=dtype)

    def op_lists(self, precision: Precision, mode: Mode, device: torch.device, policy: Policy) -> Callable:
        if precision.is_low and mode is Mode.AMP and device.type == "cpu" and policy is Policy.CUDA:
            from nanprobe.engine.autocast_policy import cuda_op_lists

            return cuda_op_lists
        return nullcontext

    def fp32_wrapper(self, modules: dict, device: torch.device, precision: Precision,
                     mode: Mode) -> AbstractContextManager:
        half = precision.is_low and mode is Mode.HALF
        return fp32_modules.outside_autocast(modules, device.type, precision.torch_dtype if half else None)

    def named_modules(self, root: str, model) -> list[tuple[str, Any]]:
        return [(f"{root}.{n}" if n else root, m) for n, m in model.named_modules()]

    def named_parameters(self, root: str, model) -> dict[str, torch.Tensor]:
        return {f"{root}.{n}": p for n, p in model.named_parameters()}

    def layer_sources(self) -> dict[str, str]:
        return {}

    def library_dirs(self) -> tuple[str, ...]:
        return ()

    def training(self) -> AbstractContextManager:
        return nullcontext()


def for_loaded(loaded) -> PrecisionStrategy:
    """The strategy for what was loaded: Keras models when the loader found them, else PyTorch modules."""
    if loaded.keras is not None:
        from nanprobe.engine.keras import KerasPrecision  # keras is imported only for Keras models

        return KerasPrecision(*loaded.keras)
    return TorchPrecision(loaded.critic, loaded.generator)

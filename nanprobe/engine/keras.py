"""Keras's way into a precision, for the replay: a model rebuilt under the dtype policy, no torch autocast.

Keras's ``mixed_float16`` policy keeps the variables in fp32 and has each layer cast its inputs and
weights to fp16 (``float16`` keeps the variables in fp16 too). The replay feeds fp32 batches, as a
Keras input pipeline does, and lets the layers cast them. A layer the user built with
``dtype="float32"`` keeps its policy; precision.fp32_modules sets ``layer.dtype_policy = "float32"``.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from nanprobe.enums import Framework, Mode, Precision
from nanprobe.io.keras import KerasModel, named_layers
from nanprobe.thresholds import ASSUMED_SLOPE

_POLICIES = {
    (Precision.FP32, Mode.AMP): "float32", (Precision.FP32, Mode.HALF): "float32",
    (Precision.FP16, Mode.AMP): "mixed_float16", (Precision.BF16, Mode.AMP): "mixed_bfloat16",
    (Precision.FP16, Mode.HALF): "float16", (Precision.BF16, Mode.HALF): "bfloat16",
}


def policy_name(precision: Precision, mode: Mode) -> str:
    """The Keras dtype policy a precision runs under: mixed_* in amp mode, the plain dtype in half mode."""
    return _POLICIES[(precision, mode)]


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

    def fp32_wrapper(self, modules: dict, device: torch.device, precision: Precision,
                     mode: Mode) -> AbstractContextManager:
        return nullcontext()  # applied when the model was built (layer.dtype_policy = "float32")

    def named_modules(self, root: str, model) -> list[tuple[str, Any]]:
        return named_layers(model, root)

    def named_parameters(self, root: str, model) -> dict[str, torch.Tensor]:
        return {f"{root}/{v.path}": v.value for v in model.weights if isinstance(v.value, torch.Tensor)}

    def layer_sources(self) -> dict[str, str]:
        out = dict(self.critic.sources)
        if self.generator is not None:
            out.update(self.generator.sources)
        return out

    def library_dirs(self) -> tuple[str, ...]:
        keras = sys.modules["keras"]
        return tuple(os.path.dirname(m.__file__) for m in (keras, sys.modules.get("optree"))  # type: ignore[misc, type-var]  # __file__ checked below
                     if m is not None and getattr(m, "__file__", None))

    @contextmanager
    def training(self) -> Iterator[None]:
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
        std = math.sqrt(2.0 / (1 + ASSUMED_SLOPE ** 2)) / math.sqrt(fan_in)
        kernel.assign((torch.randn(shape, generator=gen) * std).numpy())
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.assign(torch.zeros(tuple(bias.shape)).numpy())
    return model



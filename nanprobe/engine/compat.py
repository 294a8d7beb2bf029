"""Every private torch API nanprobe uses, in one place.

torch does not promise these names across releases. When one moves, this is the only module to
change; each entry says what it is for. Tested against torch 2.13.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._ops import _len_torch_dispatch_stack_pre_dispatch as _len_pre_dispatch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = [
    "TorchDispatchMode", "OpOverload", "DispatchKeySet", "DispatchKey", "exclude_dispatch_keys",
    "registrations_for_dispatch_key", "current_autograd_node", "autograd_sequence_nr", "is_view",
    "foreach_copy_", "scaler_growth_tracker", "GROWTH_TRACKER_KEY", "op_schema", "compiled_original",
    "no_dispatch_modes", "user_path", "is_flat_param",
]

OpOverload = torch._ops.OpOverload
"""The type of `torch.ops.aten.<op>.<overload>`, which dispatch modes receive as `func`."""
DispatchKeySet = torch._C.DispatchKeySet
DispatchKey = torch._C.DispatchKey
exclude_dispatch_keys = torch._C._ExcludeDispatchKeyGuard
"""Context manager that skips the given dispatch keys (autocast kernels calling the next kernel)."""


class no_dispatch_modes:  # noqa: N801 (used as a context manager, like the torch helper it stands for)
    """Context manager that pops every active TorchDispatchMode and pushes them back on exit.

    torch's `_disable_current_modes` does the same with imports and checks for export's pre-dispatch
    modes on every entry, which cost the probe some 25 us on each op it records; this pops and pushes
    the stack directly, and leaves the rare pre-dispatch case (torch.export tracing) to torch's helper.
    """

    __slots__ = ("_modes", "_torch")

    def __enter__(self) -> None:
        self._torch = None
        if _len_pre_dispatch():
            self._torch = _disable_current_modes()
            self._torch.__enter__()
            return
        self._modes = [torch._C._pop_torch_dispatch_stack(None) for _ in range(torch._C._len_torch_dispatch_stack())]

    def __exit__(self, *exc) -> None:
        if self._torch is not None:
            self._torch.__exit__(*exc)
            return
        for mode in reversed(self._modes):
            torch._C._push_on_torch_dispatch_stack(mode)

GROWTH_TRACKER_KEY = "_growth_tracker"
"""GradScaler.state_dict's key for the growth tracker."""


def registrations_for_dispatch_key(key: str) -> list[str]:
    """Op names (`aten::mm`, ...) with a kernel registered for a dispatch key, e.g. AutocastCUDA."""
    return list(torch._C._dispatch_get_registrations_for_dispatch_key(key))


def op_schema(func: Any) -> Any:
    """An OpOverload's schema: its arguments and returns, with alias info (which ones it writes or views)."""
    return func._schema


def current_autograd_node() -> Any:
    """The autograd node whose backward is running now, or None outside backward."""
    return torch._C._current_autograd_node()


def autograd_sequence_nr() -> int:
    """The sequence number the next autograd node created on this thread will get."""
    return torch._C._autograd._get_sequence_nr()


def is_view(t: torch.Tensor) -> bool:
    """Whether t is a view of another tensor's storage."""
    return t._is_view()


def is_zero_tensor(t: torch.Tensor) -> bool:
    """Whether t is an efficient zero tensor (autograd's stand-in for a zero gradient), which has no memory."""
    return t._is_zerotensor()


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy a list of tensors into preallocated buffers in one fused call."""
    torch._foreach_copy_(dst, src)


def scaler_growth_tracker(scaler: Any) -> torch.Tensor:
    """A GradScaler's count of steps since the scale last changed."""
    return scaler._growth_tracker


def compiled_original(module: Any) -> Any:
    """The module torch.compile wrapped, or None when module is not a compiled wrapper."""
    return module._orig_mod if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod") else None


# The attribute names torch's FSDP1, activation checkpointing and torch.compile wrappers put between a
# module and its children; the user never wrote them, so module paths are shown without them.
_WRAPPER_ATTRS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def user_path(path: str) -> str:
    """A dotted module or parameter path as the user's code names it (wrapper attributes dropped)."""
    if "_" not in path:
        return path
    return ".".join(p for p in path.split(".") if p not in _WRAPPER_ATTRS)


def is_flat_param(t: Any) -> bool:
    """Whether t is FSDP1's FlatParameter: many parameters' shards in one tensor, named by FSDP alone."""
    return type(t).__name__ == "FlatParameter" and type(t).__module__.startswith("torch.distributed.fsdp")

"""CUDA's autocast op lists, and a CPU autocast that follows them (`precision.policy: cuda`).

CPU autocast has its own lists: on the CPU, pow, sum, exp, softmax, layer_norm, group_norm ...
stay in the low dtype, where CUDA autocast runs them in fp32. A CPU replay that should reach the
GPU's verdict has to run each op in the dtype CUDA would give it. `cuda_autocast(dtype)` does that:
it registers, for the AutocastCPU dispatch key, kernels that cast like CUDA's autocast kernels and
redispatch below autocast, plus fall-throughs for the ops only CPU autocast lists. They sit where
the real autocast kernels sit (above autograd), so the casts are recorded by autograd and the
backward, double backward included, runs in the dtypes the forward chose, as on a GPU.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import torch

from nanprobe.engine import compat
from nanprobe.errors import DeviceError

TORCH_VERSION = "2.13.0"
SOURCE = ("aten/src/ATen/autocast_mode.cpp, TORCH_LIBRARY_IMPL(aten, Autocast) (CUDA) and "
          "TORCH_LIBRARY_IMPL(aten, AutocastCPU), with the AT_FORALL_* lists of aten/src/ATen/autocast_mode.h")


class Cast(str, Enum):
    """CUDA autocast's cast policies (at::autocast::CastPolicy), plus its banned op."""

    LOWER = "lower_precision_fp"  # floating inputs to the autocast dtype
    FP32 = "fp32"  # floating inputs to float32
    FP32_SET_OPT_DTYPE = "fp32_set_opt_dtype"  # dtype=float32 unless given; inputs not cast
    FP32_APPEND_DTYPE = "fp32_append_dtype"  # redispatch to the overload that takes a dtype
    PROMOTE = "promote"  # floating inputs to the widest floating dtype among them
    BANNED = "banned"  # raises under autocast


# CUDA autocast, torch 2.13.0 (see SOURCE): op overload -> cast policy. Ops not listed run in
# whatever dtype their inputs have. cudnn_convolution* are registered outside the AT_FORALL lists.
CUDA_OPS: dict[Cast, tuple[str, ...]] = {
    Cast.LOWER: (
        "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
        "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu",
        "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm",
        "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
        "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
        "cudnn_convolution", "cudnn_convolution_transpose",
    ),
    Cast.FP32: (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
        "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
        "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm",
        "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
        "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
        "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
        "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist",
        "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d",
        "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d",
        "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
        "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    ),
    Cast.FP32_SET_OPT_DTYPE: (
        "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
        "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
    ),
    Cast.FP32_APPEND_DTYPE: ("norm.Scalar", "norm.ScalarOpt_dim"),
    Cast.PROMOTE: (
        "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
        "tensordot", "scatter_add",
    ),
    Cast.BANNED: ("binary_cross_entropy",),
}

# fp32_append_dtype redispatches to another overload of the same op, with the dtype appended.
_APPEND_TARGET = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}

# CPU autocast, torch 2.13.0: ops its lists cast that CUDA's do not. Under the cuda policy they
# fall through, so they run as on a GPU (e.g. conv2d.padding decomposes into convolution, which
# CUDA's list casts; cat and stack use ordinary type promotion).
CPU_ONLY: tuple[str, ...] = (
    "_addmm_activation", "_grid_sampler_2d_cpu_fallback", "_lu_with_info", "_native_multi_head_attention",
    "adaptive_avg_pool3d", "adaptive_max_pool3d", "avg_pool3d", "cat", "cholesky", "cholesky_inverse",
    "cholesky_solve", "conv1d.padding", "conv2d.padding", "conv3d.padding", "cross_entropy_loss",
    "ctc_loss.IntList", "ctc_loss.Tensor", "fake_quantize_per_tensor_affine", "fft_fft", "fft_fft2",
    "fft_fftn", "fft_hfft", "fft_ifft", "fft_ifft2", "fft_ifftn", "fft_ihfft", "fft_irfft", "fft_irfft2",
    "fft_irfftn", "fft_rfft", "fft_rfft2", "fft_rfftn", "fractional_max_pool2d", "fractional_max_pool3d",
    "geqrf", "grid_sampler_2d", "grid_sampler_3d", "index_copy", "inverse", "linalg_cholesky",
    "linalg_cholesky_ex", "linalg_cond", "linalg_cond.p_str", "linalg_eig", "linalg_eigh", "linalg_eigvals",
    "linalg_eigvalsh", "linalg_householder_product", "linalg_inv", "linalg_inv_ex", "linalg_lstsq",
    "linalg_matrix_rank", "linalg_matrix_rank.atol_rtol_float", "linalg_matrix_rank.atol_rtol_tensor",
    "linalg_matrix_rank.tol_tensor", "linalg_qr", "linalg_solve", "linalg_svd", "linalg_svdvals",
    "linalg_tensorinv", "linalg_tensorsolve", "lu_solve", "max_pool3d", "max_unpool2d", "max_unpool3d",
    "mkldnn_rnn_layer", "multilabel_margin_loss_forward", "nanquantile", "nanquantile.scalar", "orgqr",
    "ormqr", "pinverse", "polar", "qr", "quantile", "quantile.scalar", "reflection_pad1d",
    "reflection_pad2d", "replication_pad1d", "replication_pad2d", "replication_pad3d", "stack", "stft",
    "stft.center", "svd", "trace", "triangular_solve", "view_as_complex",
)

_BANNED_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast.")

_KEY = "AutocastCPU"
_NO_AUTOCAST = compat.DispatchKeySet(compat.DispatchKey.AutocastCPU)


def cuda_policy() -> dict[str, Cast]:
    """CUDA_OPS as op overload -> cast policy."""
    return {op: cast for cast, ops in CUDA_OPS.items() for op in ops}


def overload(name: str) -> compat.OpOverload:
    """The aten OpOverload for "op" or "op.overload"."""
    op, _, name_of_overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), name_of_overload or "default")


# -- casting, as at::autocast::cached_cast does it ------------------------------------------------

class _Local(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # nesting of cuda_autocast on this thread
        self.cache: dict[int, tuple] = {}  # id(fp32 leaf) -> (weakref to it, its low-precision cast)


_local = _Local()


def _eligible(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not torch.float64
            and t.device.type == "cpu")


def _cast_tensor(t: torch.Tensor, to: torch.dtype, lower: torch.dtype) -> torch.Tensor:
    if not _eligible(t) or t.dtype is to:
        return t
    # Like autocast, cast each fp32 weight to the low dtype once per autocast region: its uses then
    # share one cast, so their gradients are summed in the low dtype before the cast back.
    if (to is lower and t.dtype is torch.float32 and t.requires_grad and t.is_leaf and not compat.is_view(t)
            and torch.is_autocast_cache_enabled()):
        hit = _local.cache.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        out = t.to(to)
        _local.cache[id(t)] = (weakref.ref(t), out)
        return out
    return t.to(to)


def _cast(value, to: torch.dtype, lower: torch.dtype):
    if isinstance(value, torch.Tensor):
        return _cast_tensor(value, to, lower)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_cast(v, to, lower) for v in value)
    return value


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def _widest(values, lower: torch.dtype) -> torch.dtype:
    """at::autocast::promote_type: float32 if any floating input is float32, else the low dtype."""
    current = lower
    for v in _flat(values):
        if not _eligible(v):
            continue
        if current is torch.float32 or v.dtype is torch.float32:
            current = torch.float32
        elif v.dtype is not lower:
            raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
    return current


def _kernel(name: str, cast: Cast):
    op = overload(name)
    if cast is Cast.BANNED:
        def banned(*args, **kwargs):
            raise RuntimeError(_BANNED_MESSAGE)
        return banned
    if cast is Cast.FP32_SET_OPT_DTYPE:
        pos = [a.name for a in op._schema.arguments].index("dtype")

        def set_opt_dtype(*args, **kwargs):
            with compat.exclude_dispatch_keys(_NO_AUTOCAST):
                if args and _eligible(args[0]):
                    if pos < len(args):
                        if args[pos] is None:
                            args = args[:pos] + (torch.float32,) + args[pos + 1:]
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
        return set_opt_dtype
    if cast is Cast.FP32_APPEND_DTYPE:
        target = overload(_APPEND_TARGET[name])
        defaults = [a.default_value if a.has_default_value() else None
                    for a in op._schema.arguments]

        def append_dtype(*args, **kwargs):
            with compat.exclude_dispatch_keys(_NO_AUTOCAST):
                full = list(args) + [kwargs.get(a.name, d) for a, d in
                                     zip(op._schema.arguments[len(args):], defaults[len(args):])]
                out = torch.float32 if _eligible(args[0]) else args[0].dtype
                return target(*full, dtype=out)
        return append_dtype

    def cast_inputs(*args, **kwargs):
        lower = torch.get_autocast_dtype("cpu")
        with compat.exclude_dispatch_keys(_NO_AUTOCAST):
            if cast is Cast.LOWER:
                to = lower
            elif cast is Cast.FP32:
                to = torch.float32
            else:
                to = _widest((*args, *kwargs.values()), lower)
            # Right to left, the order GCC evaluates the C++ kernels' argument pack in, so the casts
            # come out in the same order as under CUDA autocast (and the probe's op indices match).
            cast_kwargs = {k: _cast(v, to, lower) for k, v in reversed(kwargs.items())}
            cast_args = [_cast(a, to, lower) for a in reversed(args)][::-1]
            return op(*cast_args, **dict(reversed(cast_kwargs.items())))
    return cast_inputs


# -- registration ----------------------------------------------------------------------------------

_lock = threading.Lock()
_users = 0
_library: torch.library.Library | None = None


def _registered(key: str) -> set[str]:
    return {n.removeprefix("aten::") for n in compat.registrations_for_dispatch_key(key)}


def _register() -> torch.library.Library:
    live_cuda = _registered("AutocastCUDA")
    policy = {op: cast for op, cast in cuda_policy().items() if op in live_cuda}  # this torch's CUDA lists
    unknown = sorted(live_cuda - set(policy))
    if unknown:
        raise DeviceError(f"precision.policy: cuda has CUDA autocast's op lists of torch {TORCH_VERSION}; this torch "
                          f"({torch.__version__}) also autocasts {', '.join(unknown[:5])}; use --policy native "
                          f"(precision.policy: native) or torch {TORCH_VERSION}")
    lib = torch.library.Library("aten", "IMPL")
    # CPU_ONLY on torch 2.13; taken from the dispatcher so an op another torch adds is neutralised too.
    passthrough = sorted(_registered(_KEY) - set(policy))
    try:
        with warnings.catch_warnings():
            # "Overriding a previously registered kernel": replacing CPU autocast's kernels is the point.
            warnings.simplefilter("ignore")
            for name, cast in policy.items():
                lib.impl(name, _kernel(name, cast), _KEY)
            for name in passthrough:
                lib.impl(name, torch.library.fallthrough_kernel, _KEY)
    except BaseException:
        lib._destroy()
        raise
    return lib


@contextmanager
def cuda_op_lists() -> Iterator[None]:
    """While inside, CPU autocast casts each op as CUDA autocast would (process-wide, reentrant).

    The registrations are made on the first entry and removed on the last exit, exceptions
    included, which brings CPU autocast's own kernels back. They affect every thread: run one
    replay at a time.
    """
    global _users, _library
    with _lock:
        if _users == 0:
            _library = _register()
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                lib, _library = _library, None
                lib._destroy()  # type: ignore[union-attr]  # set by the first user; deregisters its kernels


def is_active() -> bool:
    """True while cuda_op_lists() is in effect."""
    return _users > 0


@contextmanager
def cuda_autocast(dtype: torch.dtype = torch.float16, enabled: bool = True,
                  cache_enabled: bool = True) -> Iterator[None]:
    """In place of torch.autocast("cpu", dtype=...): CPU autocast with CUDA's op lists."""
    with cuda_op_lists(), torch.autocast("cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled):
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
            if _local.depth == 0:
                _local.cache.clear()

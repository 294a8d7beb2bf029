"""The fixed choices of nanprobe: precisions, modes, phases, finding kinds and statuses."""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Precision(str, Enum):
    """A floating-point format a replay runs in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @property
    def is_low(self) -> bool:
        return self is not Precision.FP32

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 flushes gradients below 6e-8 to 0 (autocast needs a GradScaler); bf16 has fp32's range."""
        return self is Precision.FP16


class Mode(str, Enum):
    """How a low precision is applied."""

    AMP = "amp"  # torch.autocast around the step, fp32 weights
    HALF = "half"  # model, optimizer state and inputs cast to the dtype


class Framework(str, Enum):
    """The framework the user's models are written in (how a precision is entered, how fixes read)."""

    TORCH = "torch"  # torch.nn.Module: torch.autocast or .half()
    KERAS = "keras"  # Keras 3 on the torch backend: dtype policies (mixed_float16, ...)


class Policy(str, Enum):
    """Whose autocast op lists a CPU replay follows."""

    CUDA = "cuda"  # each op in the dtype CUDA autocast gives it (nanprobe.engine.autocast_policy)
    NATIVE = "native"  # the device's own autocast


class Kernels(str, Enum):
    """How a CPU replay computes its fp16/bf16 ops (a CUDA replay always runs the GPU's own kernels)."""

    EMULATED = "emulated"  # in fp32, each output rounded to fp16/bf16, as GPU kernels do (nanprobe.engine._emulate)
    NATIVE = "native"  # the CPU's own fp16/bf16 kernels (about 20 times slower)


class Device(str, Enum):
    """Where a replay runs."""

    AUTO = "auto"  # cuda when torch sees a GPU, else cpu
    CPU = "cpu"
    CUDA = "cuda"


class OutputFormat(str, Enum):
    """What `diagnose` prints on stdout."""

    TABLE = "table"  # the terminal report
    JSON = "json"  # the JSON report
    GITHUB = "github"  # GitHub Actions ::error/::warning annotations


class Phase(str, Enum):
    """Where in a critic step an op ran."""

    DATA = "data"
    FORWARD = "forward"
    INPUT_GRAD = "input-grad"  # inside torch.autograd.grad (the penalty's first-order gradient)
    BACKWARD = "backward"  # the loss's backward, double backward included
    OPTIMIZER = "optimizer"


class FindingKind(str, Enum):
    """What went wrong at an op, from mildest to worst."""

    UNDERFLOW = "underflow"
    OVERFLOW = "overflow"
    NAN = "nan"

    @property
    def severity(self) -> int:
        return {"underflow": 1, "overflow": 2, "nan": 3}[self.value]


class Status(str, Enum):
    """The verdict of one replay: the worst finding it produced."""

    OK = "ok"
    UNDERFLOW = "underflow"
    OVERFLOW = "overflow"
    NAN = "nan"
    ERROR = "error"  # the user's step raised in this precision (e.g. an op autocast refuses)

    @property
    def severity(self) -> int:
        return {"ok": 0, "underflow": 1, "overflow": 2, "nan": 3, "error": 4}[self.value]

    @classmethod
    def of(cls, kind: FindingKind | None) -> Status:
        return cls.OK if kind is None else cls(kind.value)


class FailOn(str, Enum):
    """The lowest status that makes `diagnose` exit 1."""

    NAN = "nan"
    OVERFLOW = "overflow"
    UNDERFLOW = "underflow"

    def fails(self, status: Status) -> bool:
        """An error fails at every level: that precision's training would crash."""
        threshold = {"nan": 3, "overflow": 2, "underflow": 1}[self.value]
        return status is Status.ERROR or status.severity >= threshold


class DataProblem(str, Enum):
    """What `check-data` can find in a data file."""

    NONFINITE = "non-finite"  # a sample holds NaN or Inf
    CONSTANT = "constant"  # every value of a sample is the same: zero variance
    RANGE = "range"  # values outside data.range, or a different range than the config's


class OnNan(str, Enum):
    """What nanprobe.watch does when a training step turns non-finite."""

    RAISE = "raise"  # diagnose the step, then raise NonFiniteError with the report
    WARN = "warn"  # diagnose the step, warn with the verdict, let training go on
    DUMP = "dump"  # write the step to a folder for `nanprobe diagnose DUMP/config.yaml`, warn, go on


class FixCheck(str, Enum):
    """What --verify-fix found when it replayed a fix."""

    OK = "ok"  # the run with the fix is ok: verified
    IMPROVES = "improves"  # milder than without it, but something remains
    FAILS = "fails"  # as bad or worse, or fp32 now fails, or the replay raised
    UNTRIED = "untried"  # not replayed (the line says why)

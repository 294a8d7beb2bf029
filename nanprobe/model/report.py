"""The report: plain frozen data that the CLI renders as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from nanprobe.enums import FindingKind, Kernels, Mode, Phase, Precision, Status
from nanprobe.model.checks import DataReport, InitCheck
from nanprobe.model.common import FixSuggestion, plain

SCHEMA = 1


@dataclass(frozen=True)
class Finding:
    """One op that underflowed, overflowed or made a NaN (or the first non-finite value)."""

    kind: FindingKind | None
    """underflow | overflow | nan; None for a first non-finite value that only passes one on."""
    op: str
    """aten op, e.g. aten.convolution_backward.default."""
    module: str
    """Module path (critic.net.4), "" outside modules, "data" for the batch."""
    phase: Phase
    """data | forward | input-grad | backward | optimizer."""
    step: int
    """Critic step (0-based)."""
    source: str | None
    """file:line of the user's code that ran the op (backward ops: of their forward op)."""
    detail: str
    """The numbers that show it, in one sentence."""
    node: str | None = None
    """Autograd node that ran the op (backward ops)."""
    dtype: str = ""
    """Output dtype of the op."""
    numbers: dict = field(default_factory=dict)
    """Statistics behind the detail: this run's output, the fp32 reference, shares."""
    index: int = 0
    """Position of the op in execution order."""
    param: str | None = None
    """Parameter the op updates (optimizer ops), e.g. critic.net.0.bias."""


@dataclass(frozen=True)
class LostUpdates:
    """Weights of one module that an optimizer step left unchanged although their update was non-zero."""

    module: str
    """Module path."""
    elements: int
    """Weight elements whose update was non-zero (non-zero gradient or momentum), summed over the steps."""
    lost: int
    """Of those, the elements the step left unchanged: the update was below half an ulp of the weight."""
    share: float
    """lost / elements."""
    dtype: str = ""
    """dtype of the weights."""


@dataclass(frozen=True)
class ChainLink:
    """An op on the data path from the first issue to the first non-finite value."""

    op: str
    """aten op."""
    module: str
    """Module path."""
    phase: Phase
    """Phase."""
    step: int
    """Critic step."""
    summary: str
    """max |x|, zeros, inf and NaN counts of its output."""
    index: int = 0
    """Position in execution order; -1 marks ops left out of a long chain."""


@dataclass(frozen=True)
class StepMetrics:
    """What one critic step measured."""

    step: int
    """Critic step."""
    loss: float | None
    """Total critic loss."""
    penalty: float | None
    """Gradient penalty (wgan-gp, r1), if any."""
    grad_norm: float | None
    """Total parameter-gradient norm after unscaling."""
    scale: float | None = None
    """GradScaler scale used for the step."""
    skipped: bool = False
    """GradScaler skipped this step even after retries."""
    extra: dict = field(default_factory=dict)
    """Other named scalars (d_real, d_fake, or a custom step's)."""
    weight_norm: float | None = None
    """Total norm of the critic's weights the step ran with (before its update)."""


@dataclass(frozen=True)
class SkippedAttempt:
    """A step that dynamic loss scaling skipped and that was retried at a lower scale."""

    step: int
    """Critic step."""
    scale: float | None
    """The scale that overflowed."""
    cause: Finding | None
    """The op that made the inf."""


@dataclass(frozen=True)
class ReplayError:
    """The exception a precision's replay raised in the user's code: a finding, not a crash of nanprobe."""

    exception: str
    """Exception type, e.g. RuntimeError."""
    message: str
    """Its message (first line)."""
    source: str | None
    """file:line of the user's code that raised it (innermost frame in their files)."""
    op: str | None
    """The op that raised: aten op (aten.mm.default) or torch function (torch.nn.functional.binary_cross_entropy)."""
    phase: Phase
    """Where in the step: forward (the step function) or backward (the loss's backward)."""
    step: int
    """Critic step (0-based)."""

    @property
    def line(self) -> str:
        """'RuntimeError: <message> (train.py:41)'."""
        return f"{self.exception}: {self.message}" + (f" ({self.source})" if self.source else "")


@dataclass(frozen=True)
class RunReport:
    """The verdict of one precision."""

    precision: Precision
    """fp32 | fp16 | bf16."""
    mode: Mode
    """amp | half."""
    status: Status
    """ok | underflow | overflow | nan: the worst outcome; error when the user's step raised."""
    precision_problem: bool
    """False when fp32 fails too: the cause is not the precision."""
    first_issue: Finding | None
    """The earliest op with a problem."""
    first_nonfinite: Finding | None
    """The earliest op whose output holds inf or NaN."""
    chain: tuple[ChainLink, ...] = ()
    """Ops linking the first issue to the first non-finite value (shortened)."""
    fixes: tuple[FixSuggestion, ...] = ()
    """Fixes, best first."""
    metrics: tuple[StepMetrics, ...] = ()
    """Per step."""
    skipped: tuple[SkippedAttempt, ...] = ()
    """Steps GradScaler skipped and recovered from (not failures)."""
    ops: int = 0
    """Ops recorded."""
    findings: int = 0
    """Ops with a finding."""
    notes: tuple[str, ...] = ()
    """Anything else the user should know about this run."""
    failed_step: int | None = None
    """First step with a finding (the trend in `metrics` shows what led there); None when ok."""
    lost_updates: tuple[LostUpdates, ...] = ()
    """Per module, weights whose updates were rounded away (low-precision weights), worst first."""
    scale_collapse: Finding | None = None
    """The op that kept making inf while GradScaler's scale fell (every step skipped, or a skip that never recovers)."""
    unscaled_penalty: Finding | None = None
    """A torch.autograd.grad call on outputs the GradScaler did not scale (the penalty skips the AMP recipe)."""
    kernels: Kernels = Kernels.NATIVE
    """emulated (fp16/bf16 ops computed in fp32 on the CPU, each output rounded, as GPU kernels do) | native."""
    error: ReplayError | None = None
    """status error: what the replay raised, where in the user's code, and at which op."""


@dataclass(frozen=True)
class Report:
    """Everything `nanprobe diagnose` found."""

    config: str | None
    """Path of the config."""
    device: str
    """Device the replays ran on."""
    torch: str
    """PyTorch version."""
    runs: tuple[RunReport, ...]
    """One per precision, fp32 first."""
    settings: dict = field(default_factory=dict)
    """The config as replayed (after overrides)."""
    interrupted: str | None = None
    """Set when Ctrl-C stopped the replays: the runs hold what was found so far."""
    schema: int = SCHEMA
    """JSON schema version."""
    data: DataReport | None = None
    """The data check of the samples the replays used (None for synthetic data)."""
    init: tuple[InitCheck, ...] = ()
    """Initialisation of each critic weight layer: std against Glorot/He, output scale on the first batch."""

    @property
    def worst(self) -> Status:
        return max((r.status for r in self.runs), key=lambda s: s.severity, default=Status.OK)

    def to_dict(self) -> dict:
        d = plain(asdict(self))
        if self.data is not None:
            d["data"] = self.data.to_dict()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        d = self.to_dict()
        ordered = {"schema": d.pop("schema"), "config": d.pop("config"), "device": d.pop("device"),
                   "torch": d.pop("torch"), "runs": d.pop("runs"), **d}
        return json.dumps(ordered, indent=indent, allow_nan=False)

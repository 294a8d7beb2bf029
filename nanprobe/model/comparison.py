"""The comparison's records: what `nanprobe compare-precisions` found, as plain frozen data."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from nanprobe.enums import Kernels, Mode, Phase, Precision, Status
from nanprobe.model.common import FixSuggestion, plain
from nanprobe.model.report import Finding, ReplayError, StepMetrics

SCHEMA = 1
"""JSON schema version of a comparison."""
OUTSIDE = "(outside modules)"
"""Module name shown for ops that ran outside any module (the loss and the penalty's own ops)."""


@dataclass(frozen=True)
class DtypeRange:
    """The representable magnitudes of a dtype, as powers of two."""

    precision: Precision
    """fp16 | bf16 | fp32."""
    log2_max: float
    """log2 of the largest finite value."""
    log2_min_normal: float
    """log2 of the smallest normal value."""
    log2_min_subnormal: float
    """log2 of the smallest subnormal value (below it, values flush to 0)."""


@dataclass(frozen=True)
class RangeSpan:
    """One precision's values in one module and phase: errors against fp32, headroom and range."""

    precision: Precision
    """The replay's precision."""
    rel_error: float | None
    """Worst relative error against fp32 over the aligned ops (None for fp32 or when nothing aligned)."""
    added_error: float | None
    """Worst error an op here adds to the error its inputs already carry (relative error minus the inputs')."""
    flushed: float | None
    """Worst share of sampled values flushed to 0 here: non-zero in fp32 but below this dtype's smallest normal (None
    for fp32)."""
    headroom_max: float | None
    """Powers of two left before the op's dtype overflows: min log2(max_dtype / max|x|); 0 when it did."""
    headroom_normal: float | None
    """Powers of two above the dtype's smallest normal: min log2(min_nonzero|x| / smallest_normal); < 0 is subnormal."""
    log2_min: float | None
    """log2 of the smallest non-zero finite |x| (None when all values are 0)."""
    log2_max: float | None
    """log2 of the largest finite |x| (None when all values are 0)."""
    nonfinite_ops: int = 0
    """Ops whose output holds inf or NaN."""
    ops: int = 0
    """Ops recorded in this module and phase."""


@dataclass(frozen=True)
class ModuleDivergence:
    """One module and phase, in every precision."""

    module: str
    """Module path, "(outside modules)" for the loss's own ops, "data" for the batch."""
    phase: Phase
    """data | forward | input-grad | backward | optimizer."""
    values: str
    """What its ops produce: data, outputs (activations), gradients or updates."""
    order: int
    """Position of its first op in the fp32 replay (execution order)."""
    divergence: float | None
    """Worst error added here over the low precisions, in eps of each (the table's sort key)."""
    spans: tuple[RangeSpan, ...]
    """One per precision, fp32 first."""

    def span(self, precision: Precision) -> RangeSpan | None:
        return next((s for s in self.spans if s.precision is precision), None)


@dataclass(frozen=True)
class Departure:
    """The first op at which a precision's values leave fp32's by more than DEPARTURE."""

    module: str
    """Module path."""
    phase: Phase
    """Phase."""
    step: int
    """Critic step."""
    op: str
    """aten op."""
    source: str | None
    """file:line of the user's code (backward ops: of their forward op)."""
    rel_error: float
    """Its relative error against fp32."""
    added_error: float
    """The part of it this op adds to its inputs' error."""
    flushed: float
    """Share of its sampled values flushed to 0 (non-zero in fp32, below the dtype's smallest normal)."""


@dataclass(frozen=True)
class PrecisionSummary:
    """One precision's column of the summary table."""

    precision: Precision
    """fp32 | fp16 | bf16."""
    mode: Mode
    """amp | half."""
    status: Status
    """ok | underflow | overflow | nan | error (the step raised), as `diagnose` judges it."""
    first_issue: Finding | None
    """The earliest op with a problem, as `diagnose` reports it."""
    metrics: tuple[StepMetrics, ...]
    """Loss, penalty and gradient norm per step."""
    loss_rel_error: float | None
    """Worst |loss - loss_fp32| / |loss_fp32| over the steps (None for fp32)."""
    penalty_rel_error: float | None
    """The same for the penalty (None without one)."""
    grad_rel_error: float | None
    """Worst relative error of the parameter gradients (all parameters' samples together) over the steps."""
    overflow_ops: int
    """Ops that overflowed (inf from finite inputs)."""
    underflow_ops: int
    """Ops that underflowed against fp32."""
    nan_ops: int
    """Ops that made a NaN from NaN-free inputs."""
    headroom_max: float | None
    """Smallest headroom to the dtype's max over all ops, in powers of two."""
    headroom_normal: float | None
    """Smallest headroom above the dtype's smallest normal over all ops, in powers of two (< 0: subnormal)."""
    departs_at: Departure | None
    """Where it first departs from fp32 (None for fp32 or when it stays close)."""
    ops: int
    """Ops recorded."""
    aligned: int
    """Ops aligned with an fp32 op (all of them for fp32)."""
    fixes: tuple[FixSuggestion, ...] = ()
    """Fixes from the catalogue for its issue, best first."""
    kernels: Kernels = Kernels.NATIVE
    """emulated (fp16/bf16 ops computed in fp32 on the CPU, each output rounded, as GPU kernels do) | native."""
    error: ReplayError | None = None
    """status error: what the replay raised (the comparison then covers the ops before it)."""


@dataclass(frozen=True)
class Recommendation:
    """What to run: which precisions are safe as configured, and how to make fp16 safe."""

    safe: tuple[Precision, ...]
    """Low precisions whose replay is ok, closest to fp32 first."""
    use: Precision | None
    """The safe low precision closest to fp32 (None when none is safe)."""
    fp16_fix: FixSuggestion | None
    """The catalogue's top fix for fp16 when fp16 is not safe (other than switching to bf16)."""
    line: str
    """The recommendation in one line."""


@dataclass(frozen=True)
class Comparison:
    """Everything `nanprobe compare-precisions` found."""

    config: str | None
    """Path of the config."""
    device: str
    """Device the replays ran on."""
    torch: str
    """PyTorch version."""
    steps: int
    """Critic steps replayed per precision."""
    sample: int
    """Values sampled per op output for the relative errors."""
    summaries: tuple[PrecisionSummary, ...]
    """One per precision, fp32 first."""
    modules: tuple[ModuleDivergence, ...]
    """Every module and phase, most divergent first."""
    dtype_ranges: tuple[DtypeRange, ...]
    """The representable ranges the range view draws against."""
    recommendation: Recommendation
    """What to run."""
    settings: dict = field(default_factory=dict)
    """The config as replayed (after overrides)."""
    schema: int = SCHEMA
    """JSON schema version."""

    @property
    def precisions(self) -> tuple[Precision, ...]:
        return tuple(s.precision for s in self.summaries)

    @property
    def worst(self) -> Status:
        return max((s.status for s in self.summaries), key=lambda s: s.severity, default=Status.OK)

    def to_dict(self) -> dict:
        return plain(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        d = self.to_dict()
        ordered = {k: d.pop(k) for k in ("schema", "config", "device", "torch", "steps", "sample")}
        return json.dumps({**ordered, **d}, indent=indent, allow_nan=False)

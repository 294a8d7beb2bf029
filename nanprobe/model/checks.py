"""The checks' records: the data check and the initialisation check, as plain frozen data."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from nanprobe.enums import DataProblem
from nanprobe.model.common import FixSuggestion, plain


@dataclass(frozen=True)
class BadSamples:
    """Samples with one kind of problem."""

    problem: DataProblem
    """non-finite | constant."""
    count: int
    """How many samples have it."""
    indices: tuple[int, ...]
    """Their indices in the file, the first MAX_INDICES."""
    counts: dict = field(default_factory=dict)
    """Details: for non-finite, samples with NaN / with Inf and values NaN / +inf / -inf; for constant, the first
    values."""


@dataclass(frozen=True)
class RangeCheck:
    """The observed values against data.range."""

    expected: tuple[float, float]
    """data.range from the config."""
    observed_min: float | None
    """Smallest finite value (None when there is none)."""
    observed_max: float | None
    """Largest finite value."""
    ok: bool
    """No sample outside data.range, and the data does not sit in a different usual range."""
    out_of_range: int
    """Samples with a value outside data.range (beyond RANGE_SLACK)."""
    share: float
    """out_of_range / samples with finite values."""
    indices: tuple[int, ...]
    """The first MAX_INDICES samples out of range."""
    cause: str | None = None
    """The likely cause, e.g. unnormalised 8-bit images (0..255)."""
    transform: str | None = None
    """An expression that maps the data into data.range, e.g. x / 127.5 - 1."""


@dataclass(frozen=True)
class DataReport:
    """What a data check found."""

    path: str
    """The data file."""
    format: str
    """npy | pt."""
    dtype: str
    """Element type in the file."""
    shape: tuple[int, ...]
    """Shape of the whole array [N, C, H, W]."""
    samples: int
    """Samples checked."""
    nbytes: int
    """Bytes checked."""
    memory_mapped: bool
    """The file was read through a memory map (False: read whole, e.g. a legacy .pt)."""
    scope: str
    """file (the whole file, check-data) or replayed (the samples diagnose's replay uses)."""
    nonfinite: BadSamples
    """Samples holding NaN or Inf."""
    constant: BadSamples
    """Samples with zero variance."""
    range: RangeCheck
    """The value range against data.range."""
    fix: FixSuggestion | None = None
    """The catalogue's `data` fix adapted to what was found, None when clean."""
    notes: tuple[str, ...] = ()
    """Anything else the user should know (e.g. why a file was not memory-mapped)."""
    seconds: float = 0.0
    """Wall time of a whole-file check (0 for the samples a replay uses: a diagnose's JSON is the same every run)."""
    chunk_mb: float | None = None
    """Chunk size of a whole-file scan."""

    @property
    def problems(self) -> tuple[DataProblem, ...]:
        found = [DataProblem.NONFINITE] if self.nonfinite.count else []
        found += [DataProblem.CONSTANT] if self.constant.count else []
        return tuple(found + ([] if self.range.ok else [DataProblem.RANGE]))

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**plain(asdict(self)), "problems": [p.value for p in self.problems]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


@dataclass(frozen=True)
class InitCheck:
    """One weight layer's initialisation scale."""

    module: str
    """Module path, e.g. critic.net.6."""
    layer: str
    """Class name (Conv2d, Linear, ...)."""
    fan_in: int
    """Fan-in as nn.init computes it."""
    fan_out: int
    """Fan-out as nn.init computes it."""
    std: float
    """Standard deviation of the weight."""
    glorot: float
    """Glorot (Xavier) normal std: sqrt(2 / (fan_in + fan_out))."""
    he: float
    """He (Kaiming) normal std for the following nonlinearity: gain / sqrt(fan_in)."""
    nonlinearity: str
    """The nonlinearity the He value is for, e.g. leaky_relu(0.2), relu, linear."""
    assumed: bool
    """True when the nonlinearity was not seen and LeakyReLU(0.2) was assumed."""
    ratio: float
    """std / he: 1 is the He scale."""
    input_std: float | None
    """Std of the layer's input on the first batch (fp32), None if not run or not finite."""
    output_std: float | None
    """Std of the layer's output on the first batch (fp32), None if not run or not finite."""
    flagged: bool
    """The weight std is INIT_FACTOR times the He value or more, or 1/INIT_SMALL_FACTOR or less."""
    call: str
    """The nn.init call that puts this layer at the He scale."""

    @property
    def gain(self) -> float | None:
        """Output std / input std on the first batch."""
        if self.input_std is None or self.output_std is None or self.input_std == 0:
            return None
        return self.output_std / self.input_std

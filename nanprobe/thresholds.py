"""Every threshold nanprobe judges by, defined once, each with why it has its value.

Modules import these names; none restates a number. The docs' reference pages are generated from
this file's docstrings.

Verdict tolerances are in units of the low dtype's machine eps (fp16: 2^-10 = 9.8e-4, bf16: 2^-7 =
7.8e-3). One rounding of a value costs at most eps/2; an op chain of depth L that only rounds stays
within about sqrt(L) to L eps of fp32. The fp32 reference itself is deterministic on the CPU (a second
fp32 replay is bit-identical: noise 0), and on a GPU its run-to-run noise (atomics in the backward
convolutions) is a few fp32 eps (1.2e-7 each), four orders below fp16's eps, so the low dtype's eps sets
every tolerance and the fp32 noise is added to it (`tolerance`) rather than ignored.
"""
from __future__ import annotations

# Verdicts: departure, effect, underflow
DEPARTURE = 32.0
"""An op's output departs from fp32 when its relative error (norm-wise over the sampled values) is above this
many eps of its dtype: 0.031 for fp16, 0.25 for bf16. Rounding alone, even through a deep critic, stays well below."""

EFFECT_TOLERANCE_EPS = 32.0
"""What training sees (the loss, the penalty, each parameter's gradient) is off when its relative error against
fp32 is above this many eps of the dtype: 3.1% in fp16, 25% in bf16. A WGAN-GP critic in fp16 whose penalty moves
by 6e-4 and whose parameter gradients move by under 1% is inside it."""

FP32_NOISE = 1.0e-6
"""Run-to-run relative noise of an fp32 replay (about 8 fp32 eps: GPU atomics); added to every tolerance."""

ZEROED_SHARE = 0.01
"""A parameter's gradient is zeroed when more than this share of its sampled values is exactly 0 in the low
precision but non-zero in fp32 (rounding alone never makes an exact zero; underflow or a cancelling sum does, and
only an underflow candidate on the gradient's provenance path makes it an underflow finding)."""

CANCEL_ROUNDINGS = 2.0
"""A value zeroed in a gradient that is a cancelling sum is the sum's own when fp32's value is within this many
roundings of the sum's terms (eps of the dtype, times how many times the terms are larger than the sum, times
the gradient's largest value): two terms each rounded by up to one eps of their size. A zero beyond it is a
flush upstream, whatever sum lies on the path."""

INDEPENDENT_CHANGE = 1.0e-12
"""A parameter the critic's fp64 outputs move by at most this (relative to their largest) when it is moved, and
not in proportion to the move, is one the critic does not depend on (analysis.invariance): its exact gradient is 0.
fp64 rounding moves them by about 1e-15; a bias deep in a critic whose activations explode (a bad init) by 1e-12
and less, but in proportion to the move."""
INDEPENDENT_TESTED = 8
"""At most this many parameters per replay are tested for independence, those furthest from fp32 first (a noise
gradient's relative error is about 1e3): each test costs two fp64 forwards of the critic."""
INDEPENDENT_SAMPLES = 4
"""Real samples, and as many uniform-noise ones, in the batch the independence test runs the critic on."""

UNDERFLOW_SHARE = 0.05
"""Share of an op's values lost to zero or subnormals (non-zero in fp32) that makes it an underflow candidate.
A candidate is a finding only when it has an effect (EFFECT_TOLERANCE_EPS, ZEROED_SHARE, LOST_UPDATE_SHARE, or it
leads to a non-finite value); otherwise it is a note."""

UNDERFLOW_RANGE = 2.0
"""An underflow candidate's fp32 values must reach below this many smallest normals of the low dtype (else the
zeros are cancellation, not range)."""

LOST_UPDATE_SHARE = 0.25
"""Share of a parameter's moving elements left unchanged by the optimizer step (the update was below half an ulp
of the low-precision weight) that makes 'weights that do not move' an effect."""

SCALE_FLOOR = 1.0
"""A GradScaler scale below this shrinks gradients instead of protecting them: the scale has collapsed."""

CHAIN_MAX = 8
"""Longer root-cause chains keep their first three and last four links in the report."""

SAMPLE = 4096
"""Values of each op's output (and of each parameter's gradient) kept for the element-wise comparison: 16 KiB per
op, at a fixed stride so the same positions are compared in every precision."""


# Initialisation
INIT_FACTOR = 8.0
"""A weight std this many times its He value or more counts as bad initialisation: 8x above He already
overflows fp16 within a few layers."""
INIT_SMALL_FACTOR = 16.0
"""A weight std this many times below its He value or more counts as bad initialisation. Below He, flagging
starts lower: DCGAN's N(0, 0.02) puts an RGB input conv ~10x below He and trains fine."""
ASSUMED_SLOPE = 0.2
"""Negative slope assumed when the nonlinearity after a layer cannot be seen (LeakyReLU(0.2))."""

# Patches
SAFE_EPS = {"fp16": 1e-4, "bf16": 1e-8, "fp32": 1e-8}
"""An eps inside a sqrt/rsqrt that survives the dtype, by precision: fp16's smallest normal is 6.1e-5, so 1e-4
stays a normal number whether the sum under the root is fp16 or fp32; bf16 and fp32 hold 1e-8 (normals down
to 1.2e-38)."""

# Divergence over steps
DIVERGENCE_GROWTH = 1.25
"""Weight norm at the failing step over step 0's above which the updates blew the weights up (a sane lr
moves it well under 1%)."""

# Data check
MAX_INDICES = 20
"""Sample indices listed per problem (the count covers all)."""
DEFAULT_CHUNK_MB = 64
"""Megabytes of the file read per chunk in a whole-file data scan."""
RANGE_SLACK = 1e-3
"""Share of data.range's width tolerated beyond each end (rounding in normalised data)."""
FILL = 0.1
"""Data whose min and max lie within this share of a known range's ends is taken to be in that range."""

# Verification
MAX_VERIFIED = 3
"""Fixes replayed by --verify-fix, best ranked first."""


def init_off_scale(ratio: float) -> bool:
    """Whether a weight std at `ratio` times its He value counts as bad initialisation."""
    return ratio >= INIT_FACTOR or ratio <= 1 / INIT_SMALL_FACTOR


def tolerance(eps: float, factor: float = EFFECT_TOLERANCE_EPS) -> float:
    """factor eps of the dtype, plus the fp32 reference's own noise."""
    return factor * eps + FP32_NOISE

"""Every threshold nanprobe judges by, defined once, each with why it has its value.

Modules import these names; none restates a number. The docs' reference pages are generated from
this file's docstrings.
"""
from __future__ import annotations

# Initialisation
INIT_FACTOR = 8.0
"""A weight std this many times its He value or more counts as bad initialisation: 8x above He already
overflows fp16 within a few layers."""
INIT_SMALL_FACTOR = 16.0
"""A weight std this many times below its He value or more counts as bad initialisation. Below He, flagging
starts lower: DCGAN's N(0, 0.02) puts an RGB input conv ~10x below He and trains fine."""
ASSUMED_SLOPE = 0.2
"""Negative slope assumed when the nonlinearity after a layer cannot be seen (LeakyReLU(0.2))."""

# Divergence over steps
DIVERGENCE_GROWTH = 1.25
"""Weight norm at the failing step over step 0's above which the updates blew the weights up (a sane lr
moves it well under 1%)."""

# Comparison
SAMPLE = 4096
"""Values of each op's output kept for the element-wise comparison (16 KiB per op)."""
DEPARTURE = 32.0
"""A precision departs from fp32 at the first op that adds more than this many eps of its dtype to the error."""

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

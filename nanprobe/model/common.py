"""What every record shares: the fix suggestion, and how a record becomes JSON-ready data."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class FixSuggestion:
    """A fix from the catalogue, adapted to the finding."""

    id: str
    """Stable id (gp-fp32, grad-scaler, ...)."""
    title: str
    """One line."""
    why: str
    """The mechanism, in one or two sentences."""
    snippet: str
    """Code to apply, adapted to the module and dtype."""
    apply: str | None = None
    """Config change that applies it automatically, or None when it needs a code change."""
    overrides: dict = field(default_factory=dict)
    """The same change as dotted config keys -> values (what --verify-fix replays); {} when none."""
    verified: bool | None = None
    """--verify-fix: True when the replay with the fix is ok, False when it still fails, None when not replayed."""
    verification: str | None = None
    """--verify-fix: what the replay with the fix found, or why it was not replayed, in one line."""


def plain(v):
    """A record as JSON-ready data: enums by value, non-finite floats as None / "inf" / "-inf"."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v

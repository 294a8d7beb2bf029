"""What every record shares: the fix suggestion, and how a record becomes JSON-ready data."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nanprobe.enums import FixCheck


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
    """--verify-fix: True only when the replay with the fix is ok, False when it is not (see `remaining`), None when
    not replayed."""
    verification: str | None = None
    """--verify-fix: what the replay with the fix found, or why it was not replayed, in one line."""
    patch: str | None = None
    """A unified diff of the user's own files (paths relative to the config's folder), or None when the fix is not
    local to their code."""
    check: FixCheck | None = None
    """--verify-fix: ok (verified), improves (milder, `remaining` says what is left), fails, untried; None when not
    asked."""
    remaining: str | None = None
    """--verify-fix: what the replay with the fix still found (status and first issue), None when it was ok or not
    replayed."""
    verified_against: str | None = None
    """--verify-fix: what the replay ran on (device, precision and mode, steps), so a CPU replay reads as one."""


def plain(v: Any) -> Any:
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

"""Normalized gain: how much of a specialist's advantage over the base a merged model keeps.

Raw scores are not comparable across tasks (exact match on one, NLL on another, different
ceilings), so choosing between merges needs one common scale. For a task with base score b and
specialist score s, a model scoring x has normalized gain

    g = (x − b) / (s − b)

1 means "as good as the specialist", 0 "no better than the base"; the ratio is direction-free, so
minimized metrics (NLL) need no special case. Reports, ``pick`` and Hi-Merging's plan selection
all use this one formula.
"""

from __future__ import annotations

import math

__all__ = ["normalized_gain"]


def normalized_gain(value: float, base: float, specialist: float) -> float:
    """(value − base) / (specialist − base); NaN when the specialist is no different from the base."""
    span = specialist - base
    if span == 0 or math.isnan(span):
        return math.nan
    return (value - base) / span

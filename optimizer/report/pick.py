"""``mergeopt pick``: choose one front member by what the user cares about, and say why.

A preference is a weight per task (``--prefer rev=2``; unnamed tasks weigh 1) and optional
floors (``--require sort=0.95``: at least 95 % of the specialist's gain on held-out sort). Among
the front members that meet every floor, the one with the highest weighted mean normalized gain
wins; ties go to the higher worst-task gain. All on held-out scores, never search scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from optimizer.errors import ConfigError
from optimizer.report.rows import ReportRow

__all__ = ["Choice", "parse_assignments", "pick"]


@dataclass(frozen=True)
class Choice:
    """One scored candidate: its weighted gain and the floors it misses (empty: eligible)."""

    row: ReportRow
    score: float
    misses: tuple[str, ...]


def parse_assignments(items: Iterable[str], tasks: Sequence[str], flag: str) -> dict[str, float]:
    """``["rev=2", "sort=0.5"]`` → ``{"rev": 2.0, "sort": 0.5}``, refusing unknown tasks and bad numbers."""
    out: dict[str, float] = {}
    for item in items:
        task, sep, value = item.partition("=")
        task = task.strip()
        if not sep:
            raise ConfigError(f"{flag} {item!r}: write TASK=NUMBER, e.g. {flag} {tasks[0]}=2")
        if task not in tasks:
            raise ConfigError(f"{flag} {item!r}: unknown task {task!r}; the study's tasks are {', '.join(tasks)}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: {value!r} is not a number; write TASK=NUMBER") from None
        if not math.isfinite(number) or (flag == "--prefer" and number < 0):
            raise ConfigError(
                f"{flag} {item!r}: the value must be a finite{' non-negative' if flag == '--prefer' else ''} number"
            )
        out[task] = number
    if flag == "--prefer" and out and not any(out.values()) and len(out) == len(tasks):
        raise ConfigError("--prefer: every weight is 0; give at least one task a positive weight")
    return out


def _score(row: ReportRow, weights: Mapping[str, float]) -> float:
    total = sum(weights.values())
    return sum(w * row.gain[t] for t, w in weights.items()) / total if total else math.nan


def pick(
    rows: Sequence[ReportRow], tasks: Sequence[str], prefer: Mapping[str, float], require: Mapping[str, float]
) -> tuple[Choice | None, list[Choice]]:
    """The chosen front member (None if no member meets the floors) and every member, ranked."""
    weights = {t: float(prefer.get(t, 1.0)) for t in tasks}
    choices = []
    for row in rows:
        if not row.on_front:
            continue
        misses = tuple(
            f"{t} gain {row.gain[t]:.2f} < {floor:g}"
            for t, floor in require.items()
            if math.isnan(row.gain[t]) or row.gain[t] < floor
        )
        choices.append(Choice(row=row, score=_score(row, weights), misses=misses))
    choices.sort(key=lambda c: (bool(c.misses), -_finite(c.score), -_finite(c.row.min_gain), c.row.number))
    best = choices[0] if choices and not choices[0].misses else None
    return best, choices


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value

"""Early rejection: stop scoring a candidate once it is clearly dominated by the current front.

Scoring is most of a trial, and most candidates of a search end up far from the front. So a
candidate is scored in stages on growing shares of each task's search examples (a fixed random
order, drawn once per study, so every candidate sees the same subsets and a subset is a fair
sample of the split). After each stage every task gets an *optimistic* bound on what its full
score could still be — the partial mean plus ``z`` standard errors of the unseen remainder
(Wilson's bound for 0/1 metrics, so an all-miss start is not taken as certain) — and the
candidate is rejected (Optuna state PRUNED, the reason in its user attrs) when one completed
trial is at least as good as every bound and better on one: even with luck it would not have
reached the front. A candidate that survives every stage is scored on the full split, exactly
as without early rejection (the stages' results are combined, nothing is scored twice).

With one objective the same check means "cannot beat the best trial"; Optuna's pruners (which
compare intermediate values across trials) are not used because a multi-objective study cannot
report intermediate values, and one rule for both keeps the behaviour easy to predict.

Enqueued trials (baselines, warm starts, retries) are always scored in full: they are the
references the rule compares against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from objectives.metrics import MetricResult, combine
from objectives.tasks import AnyTask, score_parts
from optimizer.config import EarlyRejectionConfig
from optimizer.engines.base import Engine

__all__ = ["Rejected", "StagedScorer", "dominated_by", "optimistic_bound"]


class Rejected(Exception):
    """The candidate was stopped early; ``details`` goes into the trial's user attrs."""

    def __init__(self, details: dict):
        super().__init__(f"dominated by trial {details['dominated_by']} after {details['examples']} examples")
        self.details = details


def _wilson_upper(p: float, n: int, z: float) -> float:
    """Upper end of Wilson's score interval for a hit rate ``p`` seen on ``n`` trials."""
    if n == 0:
        return 1.0
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def _wilson_lower(p: float, n: int, z: float) -> float:
    return 1.0 - _wilson_upper(1.0 - p, n, z)


def optimistic_bound(partial: MetricResult, total: int, *, maximize: bool, binary: bool, z: float) -> float:
    """The best full-split score still plausible after ``partial`` (``len(per_example)`` of ``total``).

    The full score is the seen part's mean and the unseen part's mean, weighted by their sizes;
    the unseen mean is bounded from the seen examples (Wilson for 0/1 scores, else mean ± z·s/√n).
    """
    n = len(partial.per_example)
    seen = partial.value
    if n >= total:
        return seen
    if binary:
        rest = _wilson_upper(seen, n, z) if maximize else _wilson_lower(seen, n, z)
    else:
        mean = sum(partial.per_example) / n
        var = sum((x - mean) ** 2 for x in partial.per_example) / max(n - 1, 1)
        step = z * math.sqrt(var / n)
        rest = seen + step if maximize else seen - step
    return (n * seen + (total - n) * rest) / total


def dominated_by(
    bounds: Sequence[float], front: Sequence[tuple[int, Sequence[float]]], maximize: Sequence[bool]
) -> int | None:
    """The number of a front trial at least as good as ``bounds`` everywhere and better once."""
    for number, values in front:
        at_least = all((v >= b) if mx else (v <= b) for v, b, mx in zip(values, bounds, maximize, strict=True))
        better = any((v > b) if mx else (v < b) for v, b, mx in zip(values, bounds, maximize, strict=True))
        if at_least and better:
            return number
    return None


@dataclass
class StagedScorer:
    """Scores the study's tasks on growing shares of their search examples."""

    tasks: Sequence[AnyTask]
    config: EarlyRejectionConfig
    seed: int = 0

    def __post_init__(self) -> None:
        # One order per task, fixed for the study: the stages' subsets are the same for every
        # candidate (comparable partial scores) and a random sample of the split.
        self._orders = []
        for i, task in enumerate(self.tasks):
            order = list(range(task.size("search")))
            random.Random(self.seed * 7919 + i).shuffle(order)
            self._orders.append(order)

    def cuts(self, total: int) -> list[int]:
        """Example counts after which a task is checked, ending with ``total``."""
        cuts = sorted({max(1, round(share * total)) for share in self.config.stages} | {total})
        return [c for c in cuts if c <= total]

    def score(
        self,
        engine: Engine,
        front: Sequence[tuple[int, Sequence[float]]],
        on_stage: Callable[[], None] | None = None,
    ) -> list[float]:
        """Every task's full search score, or :class:`Rejected` as soon as the candidate is dominated.

        ``front``: (trial number, values) of the completed trials it is compared with.
        ``on_stage``: called after each task's stage (a liveness beat, an interrupt check).
        """
        maximize = [task.direction == "maximize" for task in self.tasks]
        parts: list[list[MetricResult]] = [[] for _ in self.tasks]
        done = [0] * len(self.tasks)
        sizes = [task.size("search") for task in self.tasks]
        all_cuts = [self.cuts(n) for n in sizes]
        for stage in range(max(len(c) for c in all_cuts)):
            jobs, owners = [], []
            for t, task in enumerate(self.tasks):
                cuts = all_cuts[t]
                upto = cuts[min(stage, len(cuts) - 1)]
                if upto > done[t]:
                    jobs.append((task, self._orders[t][done[t] : upto]))
                    owners.append(t)
                    done[t] = upto
            # The stage's examples of every task in one engine call per kind (shared batches).
            for t, result in zip(owners, score_parts(engine, jobs), strict=True):
                parts[t].append(result)
            if on_stage is not None:
                on_stage()
            if all(done[t] == sizes[t] for t in range(len(self.tasks))):
                break
            bounds = [
                optimistic_bound(
                    combine(parts[t]),
                    sizes[t],
                    maximize=maximize[t],
                    binary=task.binary,
                    z=self.config.z,
                )
                for t, task in enumerate(self.tasks)
            ]
            winner = dominated_by(bounds, front, maximize)
            if winner is not None:
                raise Rejected(
                    {
                        "dominated_by": winner,
                        "examples": sum(done),
                        "of": sum(sizes),
                        "partial": [round(combine(p).value, 6) for p in parts],
                        "bounds": [round(b, 6) for b in bounds],
                    }
                )
        return [combine(p).value for p in parts]

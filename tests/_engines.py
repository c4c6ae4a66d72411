"""A stand-in engine (test double) for what needs a study loop but not a model's answers.

Tests of fault handling (OOM, dead workers) and the bookkeeping benchmark
(``benchmarks/trial_overhead.py``) run ``run_trials`` with it: no accelerator memory can run out
on purpose and no scoring time hides the loop's own cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from optimizer.checkpoints import ModelSet
from optimizer.engines.base import Engine, LogLikelihood

__all__ = ["BlankEngine"]


class BlankEngine(Engine):
    """Records the plans it is given; every completion is empty, every log-likelihood 0."""

    def __init__(self, models: ModelSet | None = None) -> None:
        self.models = models  # what run_trials' supervisor restarts with, when it wraps this engine
        self.plans: list[object] = []

    def apply_plan(self, plan: object) -> None:
        self.plans.append(plan)

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        return ["" for _ in prompts]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        return [LogLikelihood(0.0, 1, True) for _ in requests]

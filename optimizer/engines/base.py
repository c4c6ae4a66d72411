"""The engine interface: what scoring needs from whatever holds the weights.

Call order, once per worker process::

    engine = SomeEngine(models, ...)      # loads base + task vectors once; slow, never per trial
    engine.apply_plan(plan)               # merge in place; cheap, once per trial
    engine.generate(...) / engine.loglikelihood(...)   # any number of times
    ...next apply_plan...
    engine.close()

Requests are plain strings and the engine tokenizes them with :func:`optimizer.tokens.encode_pair`,
so two engines (transformers, vLLM) score the very same token ids and can be checked against each
other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from optimizer.checkpoints import ModelSet
from optimizer.merge.plan import MergePlan

__all__ = ["Engine", "GenerateBatch", "LogLikelihood"]


@dataclass(frozen=True, slots=True)
class LogLikelihood:
    """Log-likelihood of a continuation given its context (lm-eval's ``loglikelihood``)."""

    logprob: float  # Σ log p(continuation token | prefix), natural log
    num_tokens: int
    is_greedy: bool  # every continuation token was the argmax


@dataclass(frozen=True)
class GenerateBatch:
    """Prompts that share one generation limit and stop strings (one task's examples, say)."""

    prompts: Sequence[str]
    max_tokens: int
    stop: Sequence[str]


class Engine(ABC):
    """Owns a model's weights; merges plans into them and scores requests."""

    models: ModelSet

    @abstractmethod
    def apply_plan(self, plan: MergePlan) -> None:
        """Write the merged weights of ``plan`` into the live model (replacing the previous plan)."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy completions, each cut before the first stop string."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        """Score each ``(context, continuation)`` under the current weights."""

    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        """Score each ``(context ids, continuation ids)``: for callers that tokenize by rules of their
        own (lm-evaluation-harness splits the joint encoding of context and continuation)."""
        raise NotImplementedError(f"{self.name} scores text requests only")

    def generate_batches(self, batches: Sequence[GenerateBatch]) -> list[list[str]]:
        """:meth:`generate` for several batches with limits of their own, in as few engine calls as
        the engine allows (vLLM: one, with per-prompt sampling parameters, so every task's prompts
        share the decode steps); this default runs them one after the other."""
        return [self.generate(b.prompts, max_tokens=b.max_tokens, stop=b.stop) for b in batches]

    @property
    def name(self) -> str:
        """Which engine this is (recorded in caches it produced, e.g. golden data's manifest)."""
        return type(self).__name__

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release the engine's resources; the default has none to release."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

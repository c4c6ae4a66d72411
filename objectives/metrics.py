"""Metrics: how a candidate is scored on a task's examples through an :class:`Engine`.

Each metric issues one batched engine call per evaluation (one ``generate`` or one
``loglikelihood`` over every example), because per-example calls would make scoring, not
merging, the thing that caps trials per hour; :func:`score_together` goes further and scores all
of a trial's tasks in one call per kind, through each metric's ``requests`` / ``finish`` halves.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from objectives.formats import PromptFormat, Verdict
from optimizer.engines.base import Engine, GenerateBatch, LogLikelihood

__all__ = [
    "METRICS",
    "ExactMatch",
    "GoldenNLL",
    "Metric",
    "MetricResult",
    "MultipleChoice",
    "combine",
    "make_metric",
    "score_together",
]


@dataclass(frozen=True)
class MetricResult:
    """The aggregate score and each example's contribution (for parity checks and reports).

    ``weights``: how much each example counts in ``value`` (tokens, for a per-token NLL); None
    when ``value`` is the plain mean of ``per_example``. It lets scores of disjoint parts of a
    split be combined into exactly the score of the whole (:func:`combine`).
    """

    value: float
    per_example: list[float]
    weights: list[float] | None = None


def combine(parts: Sequence[MetricResult]) -> MetricResult:
    """The score of the union of disjoint example sets, from each set's result."""
    per = [x for part in parts for x in part.per_example]
    if all(part.weights is None for part in parts):
        return MetricResult(sum(per) / len(per) if per else math.nan, per)
    weights = [w for part in parts for w in (part.weights or [1.0] * len(part.per_example))]
    total = sum(weights)
    value = sum(x * w for x, w in zip(per, weights, strict=True)) / total if total else math.nan
    return MetricResult(value if math.isfinite(value) else math.inf, per, weights)


class Metric(ABC):
    """A task's score. ``direction`` tells the study whether higher is better."""

    name: str
    direction: str = "maximize"
    required_fields: tuple[str, ...] = ()
    #: Renders each row's prompt and target (:mod:`objectives.formats`).
    format: PromptFormat
    #: Each example scores 0 or 1 (a hit rate), so a partial score has a binomial error.
    binary: bool = False

    @abstractmethod
    def requests(self, examples: Sequence[dict]) -> GenerateBatch | list[tuple[str, str]]:
        """What to ask the engine for ``examples``: a generate batch, or (context, continuation) pairs."""

    @abstractmethod
    def finish(self, examples: Sequence[dict], outputs: Sequence) -> MetricResult:
        """The score, from the engine's answers to :meth:`requests` (texts or log-likelihoods)."""

    def score(self, engine: Engine, examples: Sequence[dict]) -> MetricResult:
        """Score the engine's current weights on ``examples`` (one engine call)."""
        request = self.requests(examples)
        if isinstance(request, GenerateBatch):
            return self.finish(examples, engine.generate_batches([request])[0])
        return self.finish(examples, engine.loglikelihood(request))


class ExactMatch(Metric):
    """Greedy generation until a stop string; 1 if the answer matches the target (:class:`Verdict`), else 0."""

    name = "exact_match"
    binary = True

    def __init__(
        self,
        *,
        prompt_field: str = "prompt",
        target_field: str = "target",
        stop: Sequence[str] = ("\n",),
        max_tokens: int = 32,
        format: PromptFormat | None = None,
        verdict: Verdict | None = None,
    ):
        self.format = format or PromptFormat(prompt_field, target_field)
        self.verdict = verdict or Verdict()
        self.stop, self.max_tokens = list(stop), max_tokens
        self.required_fields = self.format.columns()

    def requests(self, examples: Sequence[dict]) -> GenerateBatch:
        return GenerateBatch([self.format.prompt(ex) for ex in examples], self.max_tokens, self.stop)

    def finish(self, examples: Sequence[dict], outputs: Sequence[str]) -> MetricResult:
        hits = [float(self.verdict(out, self.format.target(ex))) for out, ex in zip(outputs, examples, strict=True)]
        return MetricResult(sum(hits) / len(hits), hits)


class MultipleChoice(Metric):
    """lm-eval's ``acc``: the choice with the highest summed log-likelihood wins.

    The target is the index of the right choice, or its text. Choices are scored as
    continuations of the prompt with a leading space, as lm-eval's templates do.
    """

    name = "mc_loglik"
    binary = True

    def __init__(
        self,
        *,
        prompt_field: str = "prompt",
        target_field: str = "target",
        choices_field: str = "choices",
        format: PromptFormat | None = None,
    ):
        self.format = format or PromptFormat(prompt_field, target_field)
        self.choices_field = choices_field
        self.required_fields = (*self.format.columns(), choices_field)

    def _gold(self, ex: dict) -> int:
        choices = [str(c) for c in ex[self.choices_field]]
        target = ex[self.format.target_field] if self.format.target_template is None else self.format.target(ex)
        if isinstance(target, int) and not isinstance(target, bool):
            return target
        return choices.index(str(target)) if str(target) in choices else int(target)

    def requests(self, examples: Sequence[dict]) -> list[tuple[str, str]]:
        return [(self.format.prompt(ex), " " + str(choice)) for ex in examples for choice in ex[self.choices_field]]

    def finish(self, examples: Sequence[dict], outputs: Sequence[LogLikelihood]) -> MetricResult:
        owners = [i for i, ex in enumerate(examples) for _ in ex[self.choices_field]]
        best: dict[int, tuple[float, int]] = {}
        counters: dict[int, int] = {}
        for owner, ll in zip(owners, outputs, strict=True):
            k = counters.get(owner, 0)
            counters[owner] = k + 1
            if owner not in best or ll.logprob > best[owner][0]:
                best[owner] = (ll.logprob, k)
        hits = [float(best[i][1] == self._gold(ex)) for i, ex in enumerate(examples)]
        return MetricResult(sum(hits) / len(hits), hits)


class GoldenNLL(Metric):
    """Mean per-token negative log-likelihood of given responses (golden data); lower is better."""

    name = "nll"
    direction = "minimize"

    def __init__(
        self, *, prompt_field: str = "prompt", target_field: str = "target", format: PromptFormat | None = None
    ):
        self.format = format or PromptFormat(prompt_field, target_field)
        self.required_fields = self.format.columns()

    def requests(self, examples: Sequence[dict]) -> list[tuple[str, str]]:
        return [(self.format.prompt(ex), self.format.target(ex)) for ex in examples]

    def finish(self, examples: Sequence[dict], outputs: Sequence[LogLikelihood]) -> MetricResult:
        per = [-ll.logprob / max(ll.num_tokens, 1) for ll in outputs]
        total_tokens = sum(ll.num_tokens for ll in outputs)
        value = -sum(ll.logprob for ll in outputs) / max(total_tokens, 1)
        weights = [float(max(ll.num_tokens, 1)) for ll in outputs]
        return MetricResult(value if math.isfinite(value) else math.inf, per, weights)


METRICS = ("exact_match", "mc_loglik", "nll")


def make_metric(
    name: str,
    *,
    prompt_field: str = "prompt",
    target_field: str = "target",
    choices_field: str = "choices",
    stop: Sequence[str] = ("\n",),
    max_tokens: int = 32,
    format: PromptFormat | None = None,
    verdict: Verdict | None = None,
) -> Metric:
    """The metric called ``name`` (the config has already restricted it to :data:`METRICS`).

    ``format`` renders each row's prompt and target (default: the two columns as they are);
    ``verdict`` judges exact-match answers (default: stripped equality).
    """
    format = format or PromptFormat(prompt_field, target_field)
    if name == "exact_match":
        return ExactMatch(stop=stop, max_tokens=max_tokens, format=format, verdict=verdict)
    if name == "mc_loglik":
        return MultipleChoice(choices_field=choices_field, format=format)
    if name == "nll":
        return GoldenNLL(format=format)
    from optimizer.errors import ConfigError

    raise ConfigError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}")


def score_together(engine: Engine, jobs: Sequence[tuple[Metric, Sequence[dict]]]) -> list[MetricResult]:
    """Score several (metric, examples) jobs — a study's tasks — in at most two engine calls.

    Every generating job goes into one :meth:`~optimizer.engines.base.Engine.generate_batches`
    call and every log-likelihood job into one ``loglikelihood`` call, so the tasks of a trial
    share the engine's batches instead of each paying its own. The numbers are those of scoring
    each job alone, up to the floating-point effects of batch composition any batched engine has.
    """
    batches: dict[int, GenerateBatch] = {}
    pairs: dict[int, list[tuple[str, str]]] = {}
    for i, (metric, examples) in enumerate(jobs):
        request = metric.requests(examples)
        if isinstance(request, GenerateBatch):
            batches[i] = request
        else:
            pairs[i] = request
    outputs: list[Sequence] = [[] for _ in jobs]
    if batches:
        for i, texts in zip(batches, engine.generate_batches(list(batches.values())), strict=True):
            outputs[i] = texts
    flat = [pair for request in pairs.values() for pair in request]
    answers = engine.loglikelihood(flat) if flat else []
    start = 0
    for i, request in pairs.items():
        outputs[i] = answers[start : start + len(request)]
        start += len(request)
    return [metric.finish(examples, out) for (metric, examples), out in zip(jobs, outputs, strict=True)]

"""Hi-Merging (Fu et al., ACL 2025) run unattended: model-wise grid → analysis → conflict resolution.

The paper's three stages without a person in the loop (:func:`hi_merging`): every full evaluation
is logged (:class:`Evaluation`) so the study can record them as trials and search on from the best.
Plans are compared by the mean signed normalized gain over the tasks; the study is reached through
the :class:`~optimizer.merge.hi_merging.probes.Probe` protocol only.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optimizer.errors import ConfigError
from optimizer.gain import normalized_gain
from optimizer.merge._registry import get_method
from optimizer.merge.hi_merging.analysis import RESOLUTIONS, ContributionAnalysis, resolve_layers
from optimizer.merge.hi_merging.probes import (
    Probe,
    Progress,
    _Counter,
    analyze_contributions,
    fmt,
    quiet,
)
from optimizer.merge.plan import MergePlan, ModelParams, base_plan, specialist_plan

__all__ = ["AUTHORS_GRID", "MODEL_WISE", "Evaluation", "HiMergingResult", "hi_merging"]

#: The authors' model-wise grid: density and scale each in 0.1 … 1.0.
AUTHORS_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))

#: The model-wise stage: one (density, scale) pair shared by every model, tried on the whole grid
#: as the authors' scripts do (|grid|² evaluations), or mergeopt's coordinate search of one pair per
#: model (N·|grid|² evaluations).
MODEL_WISE: tuple[str, ...] = ("shared", "per_model")


@dataclass(frozen=True)
class Evaluation:
    """One fully scored plan: raw task values (as the study stores them) and the selection score.

    ``score`` is the mean over tasks of the signed normalized score
    (σx − σb) / |σs − σb| (σ: sign so higher is better; b: base; s: the task's specialist), i.e.
    normalized gain made direction-safe; a task whose specialist scores exactly the base falls
    back to σx − σb.
    """

    stage: str  # "model_wise", "resolve:1", "resolve:2", ...
    label: str
    plan: MergePlan
    values: dict[str, float]
    score: float

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "label": self.label,
            "plan": self.plan.to_dict(),
            "values": self.values,
            "score": self.score,
        }


@dataclass(frozen=True)
class HiMergingResult:
    """The chosen plan, every plan evaluated on the way, and each round's analysis."""

    plan: MergePlan
    score: float
    evaluations: list[Evaluation]
    analyses: list[ContributionAnalysis]
    probes: int  # merge-and-score runs, analyses included
    seconds: float

    def stage(self, name: str) -> list[Evaluation]:
        return [e for e in self.evaluations if e.stage == name]

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "score": self.score,
            "evaluations": [e.to_dict() for e in self.evaluations],
            "analyses": [a.to_dict() for a in self.analyses],
            "probes": self.probes,
            "seconds": self.seconds,
        }


class _Evaluator:
    """Scores whole plans on every task, once per distinct plan, and logs them.

    ``base`` and ``specialist`` are each task's signed reference scores (see :class:`Evaluation`).
    """

    def __init__(self, probe: Probe, say: Progress, base: Mapping[str, float], specialist: Mapping[str, float]):
        self.probe = probe
        self.say = say
        self.base = dict(base)
        self.specialist = dict(specialist)
        self.log: list[Evaluation] = []
        self._seen: dict[str, Evaluation] = {}
        self.merges = 0

    def evaluate(self, plan: MergePlan, stage: str, label: str) -> Evaluation:
        key = plan.to_json()
        if key in self._seen:
            return self._seen[key]
        self.merges += 1
        values = self.probe.score(plan, self.probe.tasks)
        found = Evaluation(stage, label, plan, values, self.score(values))
        self._seen[key] = found
        self.log.append(found)
        self.say(f"[{stage}] {label}: {found.score:+.4f} ({fmt(values)})")
        return found

    def score(self, values: Mapping[str, float]) -> float:
        parts = []
        for t in self.probe.tasks:
            x = values[t] if self.probe.maximize(t) else -values[t]
            b, s = self.base[t], self.specialist[t]
            # Direction-safe: measured against |s − b|, so a specialist that is worse than the base
            # on its own task still ranks better merges higher; no span at all: the plain difference.
            gain = normalized_gain(x, b, b + abs(s - b))
            parts.append(x - b if math.isnan(gain) else gain)
        return sum(parts) / len(parts)


def _better(a: Evaluation, b: Evaluation) -> bool:
    """Strictly better; a NaN score (a degenerate merge) loses to everything and beats nothing."""
    if math.isnan(a.score):
        return False
    return math.isnan(b.score) or a.score > b.score


def _references(probe: Probe, prober: _Counter) -> tuple[dict[str, float], dict[str, float]]:
    """Signed scores of θ₀ and of each task's specialist alone (chosen as normalized gain does).

    A task's specialist is the one the config states, else the specialist that scores best on it.
    """
    models = tuple(probe.models)
    names = list(probe.tasks)
    base = prober.run(base_plan(models), names)
    alone = {m: prober.run(specialist_plan(models, m), names) for m in models}
    specialist = {}
    for t in names:
        scores = {m: alone[m][t] for m in models}
        owner = probe.stated_specialist(t) or max(models, key=scores.__getitem__)
        specialist[t] = alone[owner][t]
    return base, specialist


def _model_wise(
    ev: _Evaluator,
    mode: str,
    method: str,
    models: tuple[str, ...],
    densities: Sequence[float],
    steps: Sequence[float],
    opts: Mapping[str, float | int | bool | str],
) -> Evaluation:
    """Stage 1: the best model-wise plan of the grid, shared pair or one pair per model."""
    if mode == "shared":
        tried = [
            ev.evaluate(
                MergePlan(method, models, dict.fromkeys(models, ModelParams(weight=s, density=p)), opts),
                "model_wise",
                f"all p={p:g} s={s:g}",
            )
            for p, s in itertools.product(densities, steps)
        ]
        best = tried[0]  # the grid is never empty
        for found in tried[1:]:
            if _better(found, best):
                best = found
        return best
    current = {m: ModelParams(weight=steps[-1], density=densities[-1]) for m in models}
    best = ev.evaluate(MergePlan(method, models, current, opts), "model_wise", "start")
    for m in models:
        for p, s in itertools.product(densities, steps):
            trial = {**current, m: ModelParams(weight=s, density=p)}
            found = ev.evaluate(MergePlan(method, models, trial, opts), "model_wise", f"{m} p={p:g} s={s:g}")
            if _better(found, best):
                best = found
        current = dict(best.plan.params)
    return best


def hi_merging(
    probe: Probe,
    *,
    rounds: int = 3,
    grid: Sequence[float] = AUTHORS_GRID,
    model_wise: str = "shared",
    probes: str = "authors",
    pseudo_layers: bool = False,
    method: str = "ties",
    options: Mapping[str, float | int | bool | str] | None = None,
    threshold: float = 0.0,
    margin: float = 0.0,
    cross: bool = False,
    progress: Progress | None = None,
) -> HiMergingResult:
    """Hi-Merging without a person in the loop; returns the best plan it evaluated.

    0. *References*: θ₀ and each specialist alone, on every task (they fix the normalization;
       not logged, since a study has them as baselines).
    1. *Model-wise*: with ``model_wise="shared"`` (the authors' scripts), one (density p, scale s)
       pair for every model, each of grid × grid tried (|grid|² evaluations; the default grid is the
       authors' 0.1 … 1.0). With ``"per_model"``, every model starts at density = scale = max(grid);
       then, one model at a time (the others held at their current values), every pair of the grid
       is tried and the best kept — N·|grid|² evaluations instead of |grid|^(2N). Methods without
       density search s only.
    2. *Analysis*: :func:`analyze_contributions` on the current best plan's coefficients, with
       ``probes`` and ``pseudo_layers`` as documented there (by default the authors' probes of the
       decoder layers).
    3. *Resolution*: each conflict's culprit (:meth:`ContributionAnalysis.culprit`) is cut back
       on the conflicting layer by each of :data:`RESOLUTIONS` (``prune`` only for methods with a
       density), for all conflicting layers at once and, when there are several, one layer at a
       time. The best candidate is kept if it beats the current plan; then back to 2. It stops
       when no conflict remains, no candidate improves, or after ``rounds`` analyses.

    Plans are compared by the mean signed normalized score (see :class:`Evaluation`); a candidate
    replaces the current plan only when strictly better, so the result is the best plan of stages
    1 and 3 and never worse than stage 1's. ``options`` default to ``normalize: false``, so a
    model's weight is its absolute scale s, as in the paper (a normalizing merge would cancel it).
    """
    say = progress or quiet
    started = time.perf_counter()
    if rounds < 0:
        raise ConfigError(f"hi_merging rounds is {rounds}; use 0 (model-wise only) or more")
    steps = sorted({float(x) for x in grid})
    if not steps or any(not 0.0 < x <= 1.0 for x in steps):
        raise ConfigError(f"hi_merging grid {list(grid)} must be non-empty values in (0, 1], e.g. [0.1, 0.4, 0.7, 1.0]")
    if model_wise not in MODEL_WISE:
        raise ConfigError(f"hi_merging model_wise {model_wise!r} is not known; use one of {', '.join(MODEL_WISE)}")
    spec = get_method(method)
    # Only where the method normalizes by default: a method that already doesn't keeps its options
    # as the study's search space writes them, so its plans stay expressible as study parameters.
    opts: dict[str, float | int | bool | str] = {"normalize": False} if spec.options.get("normalize") else {}
    opts.update(options or {})
    models = tuple(probe.models)
    densities = steps if spec.uses_density else [1.0]
    analyses: list[ContributionAnalysis] = []
    probe_runs = 0

    say("stage 0: references")
    prober = _Counter(probe)
    base, specialist = _references(probe, prober)
    say(f"θ₀ {fmt(base)}; specialists {fmt(specialist)} (signed)")
    ev = _Evaluator(probe, say, base, specialist)

    say(f"stage 1: model-wise density and scale ({model_wise.replace('_', ' ')})")
    best = _model_wise(ev, model_wise, method, models, densities, steps, opts)

    for r in range(1, rounds + 1):
        say(f"stage 2: contribution analysis, round {r}")
        analysis = analyze_contributions(
            probe,
            base_method=method,
            model_params=best.plan.params,
            options=opts,
            probes=probes,
            pseudo_layers=pseudo_layers,
            cross=cross,
            progress=say,
        )
        analyses.append(analysis)
        probe_runs += analysis.probes
        targets = analysis.culprits(analysis.conflicts(threshold, margin=margin))
        if not targets:
            say("no conflicts left")
            break
        say("stage 3: resolving " + ", ".join(f"{m}.{layer}" for m, layer in targets))
        layers = list(dict.fromkeys(layer for _, layer in targets))
        groups = [("all", targets)] + (
            [(layer, [t for t in targets if t[1] == layer]) for layer in layers] if len(layers) > 1 else []
        )
        modes = [mode for mode in RESOLUTIONS if mode != "prune" or spec.uses_density]
        round_best = best
        for mode, (where, chosen) in itertools.product(modes, groups):
            plan = MergePlan(method, models, resolve_layers(best.plan.params, chosen, mode), opts)
            found = ev.evaluate(plan, f"resolve:{r}", f"{mode} {where}")
            if _better(found, round_best):
                round_best = found
        if round_best is best:
            say("no resolution improves the merge; stopping")
            break
        best = round_best

    return HiMergingResult(
        plan=best.plan,
        score=best.score,
        evaluations=ev.log,
        analyses=analyses,
        probes=probe_runs + prober.merges + ev.merges,
        seconds=round(time.perf_counter() - started, 3),
    )

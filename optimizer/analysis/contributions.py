"""Hi-Merging's layer-wise contribution analysis (Fu et al., ACL 2025; METHODS.md, "Seed 1").

This module owns the probes, their record and the unattended procedure built on them:

* :func:`probe_plan` — "task vectors restricted to one layer", written as an ordinary
  :class:`MergePlan` (model-level weight 0, the probed layer's scope set), so every engine runs a
  probe through its normal ``apply_plan``: one in-place merge and one scoring per probe;
* :func:`analyze_contributions` — for each model m and layer l (decoder layers ``L00``…, plus the
  ``embed`` and ``head`` pseudo-layers) the single-layer contribution

      αₘ,ₗ = Perfₘ(θ₀ + τ̂ₘ on layer l) − Perfₘ(θ₀)

  and the merged-layer contribution

      βₘ,ₗ = Perfₘ(θ₀ + (1/N) Σₖ τ̂ₖ on layer l) − Perfₘ(θ₀),

  where τ̂ₖ is model k's task vector under the coefficients being analysed (by default weight 1,
  density 1: the raw τₖ) and N the number of models. The paper merges two models and writes ½Σ;
  1/N is the same uniform average for any N. Under a normalizing method (TIES' default
  ``normalize: true``) the 1/N is a no-op, because the merge is already a weighted mean, so β is
  exactly "layer l of that merge";
* :class:`ContributionAnalysis` — the result: α, β, conflicts, warm-start plans and the scopes
  that deserve their own coefficients; JSON round-trips so a study can cache it;
* :func:`hi_merging` — the paper's three stages run unattended (model-wise grid, analysis,
  iterative conflict resolution), logging every full evaluation so a study can record them.

"Perfₘ" is the score of model m's own task (see :func:`model_tasks`), signed so that higher is
better (minimized metrics such as NLL are negated), which lets one conflict rule serve every metric.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from optimizer.errors import ConfigError
from optimizer.merge import MergePlan, ModelParams, get_method
from optimizer.models import TensorInfo, layer_key

if TYPE_CHECKING:
    from optimizer.engines.base import Engine
    from optimizer.search.prepare import Prepared
    from optimizer.search.space import SearchSpace

__all__ = [
    "PSEUDO_LAYERS",
    "RESOLUTIONS",
    "ContributionAnalysis",
    "Evaluation",
    "HiMergingResult",
    "analyze_contributions",
    "hi_merging",
    "layer_labels",
    "model_tasks",
    "params_for_space",
    "probe_plan",
    "resolve_layers",
    "stated_task",
]

#: Tensors outside the decoder stack, probed as if they were layers (plan scopes ``m.embed``,
#: ``m.head``). Cheap — two more probes per model — and embeddings are where vocabulary-level
#: specialisation often sits.
PSEUDO_LAYERS: tuple[str, ...] = ("embed", "head")

#: How a conflict is resolved on the culprit's layer scope: weight → 0, weight × ½, density × ½.
RESOLUTIONS: tuple[str, ...] = ("drop", "halve", "prune")

_FORMAT = 1  # bump when the JSON layout changes; from_json refuses other versions

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    """The default progress sink."""


def _signed(direction: str, value: float) -> float:
    """A score where higher is better, whatever the metric's direction."""
    return value if direction == "maximize" else -value


def layer_labels(num_layers: int, *, pseudo_layers: bool = True) -> tuple[str, ...]:
    """Probe labels in network order: ``embed``, ``L00`` … ``L{n-1}``, ``head``."""
    decoder = tuple(layer_key(i) for i in range(num_layers))
    embed, head = PSEUDO_LAYERS
    return (embed, *decoder, head) if pseudo_layers else decoder


# -- probes -------------------------------------------------------------------------------------


def probe_plan(
    method: str,
    models: Sequence[str],
    layer: str,
    active: Mapping[str, ModelParams],
    *,
    options: Mapping[str, float | int | bool | str] | None = None,
) -> MergePlan:
    """The plan that merges only ``layer`` of the ``active`` models, at the given coefficients.

    Every model gets weight 0 at model level, so every tensor outside ``layer`` stays θ₀; each
    active model k gets ``active[k]`` on the scope ``k.<layer>``, which is more specific than the
    model scope and so wins for exactly that layer's tensors (see ``scopes_for``).
    """
    unknown = [m for m in active if m not in models]
    if unknown:
        raise ValueError(f"probe for models {unknown} that the plan does not hold ({', '.join(models)})")
    scoped = {m: ModelParams(weight=0.0) for m in models}
    scoped.update({f"{m}.{layer}": p for m, p in active.items()})
    return MergePlan(method, tuple(models), scoped, dict(options or {}))


def _base_plan(models: Sequence[str]) -> MergePlan:
    """θ₀ itself: task arithmetic with every weight 0 (exact for every engine)."""
    return MergePlan("task_arithmetic", tuple(models), {m: ModelParams(weight=0.0) for m in models})


def _owner(scope: str) -> str:
    return scope.split(".", 1)[0]


def _at(params: Mapping[str, ModelParams], model: str, layer: str) -> ModelParams:
    """The coefficients ``model`` has on ``layer``: its layer scope, else its model scope."""
    return params.get(f"{model}.{layer}") or params.get(model) or ModelParams()


def _check_scopes(params: Mapping[str, ModelParams], models: Sequence[str], layers: Sequence[str]) -> None:
    """Probes read model scopes and model.layer scopes only; anything else would be silently ignored."""
    allowed = set(models) | {f"{m}.{layer}" for m in models for layer in layers}
    bad = sorted(s for s in params if s not in allowed)
    if bad:
        raise ConfigError(
            f"contribution analysis cannot read the coefficient scopes {', '.join(bad)}; it reads model scopes"
            f" ('{models[0]}') and layer scopes ('{models[0]}.{layers[0]}'). Analyse a model- or layer-wise plan"
        )


class _Prober:
    """Merges a plan into the engine and scores the requested tasks, counting the cost."""

    def __init__(self, prepared: Prepared, engine: Engine, split: str):
        self.engine = engine
        self.split = split
        self.tasks = {t.name: t for t in prepared.tasks}
        self.merges = 0

    def run(self, plan: MergePlan, tasks: Iterable[str]) -> dict[str, float]:
        """Signed scores of ``tasks`` under ``plan``."""
        self.engine.apply_plan(plan)
        self.merges += 1
        out = {}
        for name in tasks:
            task = self.tasks[name]
            out[name] = _signed(task.direction, task.score(self.engine, self.split).value)
        return out


def stated_task(prepared: Prepared, model: str) -> str | None:
    """The task the config says is ``model``'s own, if it says so.

    The objective whose ``specialist`` field names the model wins (an explicit statement, as in
    normalized gain); else the objective named after the model; else None.
    """
    for obj in prepared.config.objectives:
        if getattr(obj, "specialist", None) == model:
            return obj.name
    return model if any(t.name == model for t in prepared.tasks) else None


def model_tasks(prepared: Prepared, specialist_gain: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, str]:
    """Each model's own task: whose score is "Perfₘ".

    :func:`stated_task` where the config states it; otherwise the task the specialist improves
    most over the base, ``specialist_gain[model][task]`` (signed score minus base; ties to the
    earlier task). Improvement rather than raw score, because a raw score mostly says how easy a
    task is. Without ``specialist_gain`` an unmatched model raises.
    """
    names = [t.name for t in prepared.tasks]
    out: dict[str, str] = {}
    for m in prepared.config.models:
        stated = stated_task(prepared, m)
        if stated is not None:
            out[m] = stated
        elif specialist_gain is not None:
            gains = specialist_gain[m]
            out[m] = max(names, key=lambda t, g=gains: (g[t], -names.index(t)))
        else:
            raise ConfigError(
                f"model {m!r} has no task of its own; name an objective after it or set 'specialist: {m}'"
                " on the objective that measures it"
            )
    return out


# -- the analysis record --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContributionAnalysis:
    """α and β per model × layer, on the models' own tasks, with what the study does with them.

    ``alpha[m][l]`` / ``beta[m][l]`` are differences of signed scores (higher is better);
    ``base[m]`` and ``specialist[m]`` are the signed own-task scores of θ₀ and of model m alone
    under the analysed coefficients. ``cross[k][m][l]``, when measured, is the effect of model k's
    layer l alone on model m's task; it is what lets :meth:`culprit` name the model that hurts.
    ``probes`` counts merge-and-score runs.
    """

    models: tuple[str, ...]
    layers: tuple[str, ...]
    task_of: dict[str, str]
    alpha: dict[str, dict[str, float]]
    beta: dict[str, dict[str, float]]
    base: dict[str, float]
    specialist: dict[str, float]
    method: str = "task_arithmetic"
    model_params: dict[str, ModelParams] = field(default_factory=dict)
    options: dict[str, float | int | bool | str] = field(default_factory=dict)
    split: str = "search"
    cross: dict[str, dict[str, dict[str, float]]] | None = None
    probes: int = 0
    seconds: float = 0.0

    # -- conflicts ------------------------------------------------------------------------------
    def is_conflict(self, model: str, layer: str, threshold: float = 0.0, *, margin: float = 0.0) -> bool:
        """Whether merging ``layer`` hurts ``model``'s task beyond what the layer gives it alone.

        The rule: β < α − margin and β < threshold. The first clause says the merged layer does
        worse than the model's own layer (interference, or dilution of its τ by 1/N); the second
        that it does harm in absolute terms (with the default threshold 0, the merged layer makes
        the task worse than the base). ``margin`` (in signed-score units) keeps an exact-match
        difference of one example from counting as a conflict. A layer that hurts even alone
        (α ≤ β < 0) is not a conflict: no other model is to blame. A β that is NaN while α is
        finite (the merged layer broke the model) is a conflict.
        """
        a, b = self.alpha[model][layer], self.beta[model][layer]
        if math.isnan(b):
            return not math.isnan(a)
        return b < a - margin and b < threshold

    def conflicts(self, threshold: float = 0.0, *, margin: float = 0.0) -> list[tuple[str, str]]:
        """Every (model, layer) in conflict (see :meth:`is_conflict`), in model then network order."""
        return [
            (m, layer)
            for m in self.models
            for layer in self.layers
            if self.is_conflict(m, layer, threshold, margin=margin)
        ]

    def culprit(self, model: str, layer: str) -> str:
        """The other model whose layer ``layer`` is cut back to resolve ``model``'s conflict there.

        With cross probes: the model whose layer alone hurts ``model``'s task most. Without them
        nothing says who does the harm, so the one to yield is the model that loses least: the
        smallest αₖ,ₗ on its own task. With two models both rules name the other model. Ties go to
        the earlier model; with a single model there is no other, and the model itself is returned.
        """
        others = [k for k in self.models if k != model]
        if not others:
            return model

        def harm(k: str) -> tuple[float, float, int]:
            hurt = self.cross[k][model][layer] if self.cross is not None else 0.0
            return (_nan_last(hurt), _nan_last(self.alpha[k][layer]), self.models.index(k))

        return min(others, key=harm)

    def culprits(self, conflicts: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """(culprit, layer) for each conflict, without repeats, in model then network order."""
        found = {(self.culprit(m, layer), layer) for m, layer in conflicts}
        return sorted(found, key=lambda ml: (self.models.index(ml[0]), self.layers.index(ml[1])))

    def scopes_to_search(self, conflicts: Iterable[tuple[str, str]]) -> list[str]:
        """Plan scopes that should get their own coefficients: every model at every conflicting layer.

        A conflict is a property of how a layer merges, and each model's coefficients there take
        part in it (the victim's scale as much as the culprit's), so all of them are freed; every
        other tensor keeps sharing its model-wise coefficients. Model order, then network order,
        e.g. ``["rev.L02", "rot.L02", "sort.L02"]``.
        """
        layers = {layer for _, layer in conflicts}
        return [f"{m}.{layer}" for layer in self.layers if layer in layers for m in self.models]

    # -- warm starts ----------------------------------------------------------------------------
    def model_wise_params(self, method: str = "ties") -> dict[str, ModelParams]:
        """The analysed coefficients, completed with ``method``'s default density where absent."""
        spec = get_method(method)
        out = {m: ModelParams(weight=spec.default_weight, density=spec.default_density) for m in self.models}
        out.update(self.model_params)
        return out

    def warm_start_plans(
        self,
        method: str = "ties",
        *,
        options: Mapping[str, float | int | bool | str] | None = None,
        conflicts: Iterable[tuple[str, str]] | None = None,
        threshold: float = 0.0,
        margin: float = 0.0,
    ) -> dict[str, MergePlan]:
        """Label → plan, for the study to enqueue (in this order).

        * ``contrib:drop`` — the analysed (model-wise) coefficients, with each conflict's culprit
          (:meth:`culprit`) given weight 0 on the conflicting layer;
        * ``contrib:halve`` — the same, with those weights halved instead;
        * ``contrib:uniform`` — every model at weight 1/N and the method's default density.

        Without conflicts the first two are one plan, ``contrib:model_wise``. ``options`` are the
        plans' method options; pass the study's (``config.options`` plus its ``seed``) so a plan
        that fits the search space is enqueued as parameters (see :func:`params_for_space`).
        """
        found = self.conflicts(threshold, margin=margin) if conflicts is None else list(conflicts)
        spec = get_method(method)
        opts = dict(options or {})
        base = self.model_wise_params(method)
        plans: dict[str, MergePlan] = {}
        targets = self.culprits(found)
        if targets:
            for mode, label in (("drop", "contrib:drop"), ("halve", "contrib:halve")):
                plans[label] = MergePlan(method, self.models, resolve_layers(base, targets, mode), opts)
        else:
            plans["contrib:model_wise"] = MergePlan(method, self.models, base, opts)
        uniform = {m: ModelParams(weight=1.0 / len(self.models), density=spec.default_density) for m in self.models}
        plans["contrib:uniform"] = MergePlan(method, self.models, uniform, opts)
        return plans

    # -- storage --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (study user attr ``contributions`` and ``contributions.json``)."""
        return {
            "format": _FORMAT,
            "models": list(self.models),
            "layers": list(self.layers),
            "task_of": dict(self.task_of),
            "alpha": self.alpha,
            "beta": self.beta,
            "base": self.base,
            "specialist": self.specialist,
            "method": self.method,
            "model_params": {
                k: {"weight": v.weight, "density": v.density} for k, v in sorted(self.model_params.items())
            },
            "options": dict(self.options),
            "split": self.split,
            "cross": self.cross,
            "probes": self.probes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ContributionAnalysis:
        if data.get("format") != _FORMAT:
            raise ConfigError(
                f"stored contribution analysis has format {data.get('format')!r}, this mergeopt reads {_FORMAT};"
                " run 'mergeopt analyze contributions' again to refresh it"
            )
        return cls(
            models=tuple(data["models"]),
            layers=tuple(data["layers"]),
            task_of=dict(data["task_of"]),
            alpha={m: dict(v) for m, v in data["alpha"].items()},
            beta={m: dict(v) for m, v in data["beta"].items()},
            base=dict(data["base"]),
            specialist=dict(data["specialist"]),
            method=str(data["method"]),
            model_params={k: ModelParams(**v) for k, v in data["model_params"].items()},
            options=dict(data["options"]),
            split=str(data["split"]),
            cross=data.get("cross"),
            probes=int(data["probes"]),
            seconds=float(data["seconds"]),
        )

    def to_json(self) -> str:
        # NaN scores (a degenerate probe) are kept as NaN: Python's json reads its own output back.
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ContributionAnalysis:
        return cls.from_dict(json.loads(text))


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def resolve_layers(
    params: Mapping[str, ModelParams], targets: Iterable[tuple[str, str]], mode: str
) -> dict[str, ModelParams]:
    """``params`` with each (model, layer) in ``targets`` cut back on scope ``model.layer``.

    ``drop`` sets the weight to 0, ``halve`` halves it, ``prune`` halves the density (TIES-style
    methods keep fewer entries of that layer's task vector). The starting point is what the model
    has on that layer now (its layer scope, else its model scope), so repeated rounds compound.
    """
    if mode not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {mode!r}; use one of {', '.join(RESOLUTIONS)}")
    out = dict(params)
    for model, layer in targets:
        now = _at(params, model, layer)
        if mode == "drop":
            new = replace(now, weight=0.0)
        elif mode == "halve":
            new = replace(now, weight=now.weight / 2)
        else:
            new = replace(now, density=now.density / 2)
        out[f"{model}.{layer}"] = new
    return out


# -- the analysis ---------------------------------------------------------------------------------


def analyze_contributions(
    prepared: Prepared,
    engine: Engine,
    *,
    split: str = "search",
    base_method: str = "task_arithmetic",
    model_params: Mapping[str, ModelParams] | None = None,
    options: Mapping[str, float | int | bool | str] | None = None,
    pseudo_layers: bool = True,
    cross: bool = False,
    progress: Progress | None = None,
) -> ContributionAnalysis:
    """Probe every model × layer once alone (α) and every layer once merged (β).

    ``model_params`` are the coefficients under analysis, as plan scopes: ``"rev"`` (model-wise)
    and optionally ``"rev.L03"`` (one layer); absent models get weight 1, density 1. They are
    merged with ``base_method`` and ``options``. Cost, in merge-and-score runs: 1 (θ₀) + N (each
    model alone, for context) + L·N (α) + L (β, each scored on the N own tasks), with L counting
    the pseudo-layers. ``cross`` scores every α probe on every model's task too (N scorings instead
    of one, same number of merges), which lets :meth:`ContributionAnalysis.culprit` name the model
    that actually hurts instead of guessing. The engine is left holding the last probe.
    """
    say = progress or _quiet
    started = time.perf_counter()
    models = tuple(prepared.config.models)
    n = len(models)
    layers = layer_labels(prepared.space.num_layers, pseudo_layers=pseudo_layers)
    params = dict(model_params or {})
    _check_scopes(params, models, layer_labels(prepared.space.num_layers))
    get_method(base_method)  # an unknown method fails here, before any probe
    opts = dict(options or {})
    prober = _Prober(prepared, engine, split)
    all_tasks = [t.name for t in prepared.tasks]

    base_scores = prober.run(_base_plan(models), all_tasks)
    say(f"θ₀: {_fmt(base_scores)}")
    gains: dict[str, dict[str, float]] = {}
    alone: dict[str, dict[str, float]] = {}
    for m in models:
        only_m = {
            **{k: ModelParams(weight=0.0) for k in models if k != m},
            **{s: p for s, p in params.items() if _owner(s) == m},
        }
        stated = stated_task(prepared, m)
        # A model without a stated task is scored on every task, to find the one it is good at.
        alone[m] = prober.run(MergePlan(base_method, models, only_m, opts), [stated] if stated else all_tasks)
        gains[m] = {t: v - base_scores[t] for t, v in alone[m].items()}
    task_of = model_tasks(prepared, gains)
    say("own tasks: " + ", ".join(f"{m}→{t}" for m, t in task_of.items()))
    own_tasks = list(dict.fromkeys(task_of.values()))

    alpha: dict[str, dict[str, float]] = {m: {} for m in models}
    crossed: dict[str, dict[str, dict[str, float]]] = {k: {m: {} for m in models} for k in models}
    for m in models:
        for layer in layers:
            scores = prober.run(
                probe_plan(base_method, models, layer, {m: _at(params, m, layer)}, options=opts),
                own_tasks if cross else [task_of[m]],
            )
            alpha[m][layer] = scores[task_of[m]] - base_scores[task_of[m]]
            if cross:
                for k in models:
                    crossed[m][k][layer] = scores[task_of[k]] - base_scores[task_of[k]]
            say(f"α {m} {layer}: {alpha[m][layer]:+.4f}")

    beta: dict[str, dict[str, float]] = {m: {} for m in models}
    for layer in layers:
        # 1/N: the uniform average of the N task vectors (the paper's ½Σ for two models).
        merged = {k: replace(_at(params, k, layer), weight=_at(params, k, layer).weight / n) for k in models}
        scores = prober.run(probe_plan(base_method, models, layer, merged, options=opts), own_tasks)
        for m in models:
            beta[m][layer] = scores[task_of[m]] - base_scores[task_of[m]]
        say(f"β {layer}: " + ", ".join(f"{m} {beta[m][layer]:+.4f}" for m in models))

    return ContributionAnalysis(
        models=models,
        layers=layers,
        task_of=task_of,
        alpha=alpha,
        beta=beta,
        base={m: base_scores[task_of[m]] for m in models},
        specialist={m: alone[m][task_of[m]] for m in models},
        method=base_method,
        model_params=params,
        options=opts,
        split=split,
        cross=crossed if cross else None,
        probes=prober.merges,
        seconds=round(time.perf_counter() - started, 3),
    )


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


# -- search-space bridge ----------------------------------------------------------------------------


def _probe_infos(num_layers: int) -> list[TensorInfo]:
    """One stand-in tensor per (layer, kind): enough to compare how two plans resolve scopes."""
    infos = [TensorInfo(f"L{i}.{kind}", i, kind, kind) for i in range(num_layers) for kind in ("attn", "mlp")]
    return [*infos, TensorInfo("embed", None, "embed", "embed"), TensorInfo("head", None, "head", "head")]


def params_for_space(plan: MergePlan, space: SearchSpace) -> dict[str, float] | None:
    """The study parameters that stand for ``plan``, or None when the space cannot express it.

    Enqueuing a warm start as parameters (rather than as a stored plan) lets the sampler learn
    from it. It is expressible when the method and options match the space's and every tensor
    resolves to the same coefficients under ``plan`` and under the parameters' plan, with every
    value inside its range; a model-wise space cannot express a per-layer drop, for instance.
    """
    if plan.method != space.method.name or tuple(plan.models) != space.models:
        return None
    infos = _probe_infos(space.num_layers)
    distributions = space.distributions()
    values: dict[str, float] = {}
    for model_index, model in enumerate(space.models):
        for group in space.groups:
            stand_in = _stand_in(group.scopes[0])
            params = plan.for_tensor(stand_in)[model_index]
            for coef in space.coefficients():
                name = space.param_name(model, group, coef)
                value = float(getattr(params, coef))
                dist = distributions[name]
                if not dist.low <= value <= dist.high:
                    return None
                values[name] = value
    rebuilt = space.plan_from_params(values)
    if dict(rebuilt.options) != dict(plan.options):
        return None
    coefs = space.coefficients()
    for info in infos:
        for mine, theirs in zip(plan.for_tensor(info), rebuilt.for_tensor(info), strict=True):
            if any(getattr(mine, c) != getattr(theirs, c) for c in coefs):
                return None
    return values


def _stand_in(scope: str) -> TensorInfo:
    """A tensor that the group scope ``scope`` (``""``, ``L03``, ``L03.attn``, ``embed``) covers.

    For the model-wise group any tensor will do; the check in :func:`params_for_space` then
    compares every tensor anyway.
    """
    if scope in ("embed", "head"):
        return TensorInfo(scope, None, scope, scope)
    if not scope:
        return TensorInfo("embed", None, "embed", "embed")
    layer, _, kind = scope.partition(".")
    return TensorInfo(scope, int(layer[1:]), kind or "attn", kind or "attn")


# -- Hi-Merging, unattended ------------------------------------------------------------------------


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

    def __init__(
        self,
        prepared: Prepared,
        engine: Engine,
        split: str,
        say: Progress,
        base: Mapping[str, float],
        specialist: Mapping[str, float],
    ):
        self.tasks = prepared.tasks
        self.engine = engine
        self.split = split
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
        self.engine.apply_plan(plan)
        self.merges += 1
        values = {t.name: t.score(self.engine, self.split).value for t in self.tasks}
        found = Evaluation(stage, label, plan, values, self.score(values))
        self._seen[key] = found
        self.log.append(found)
        self.say(f"[{stage}] {label}: {found.score:+.4f} ({_fmt(values)})")
        return found

    def score(self, values: Mapping[str, float]) -> float:
        parts = []
        for t in self.tasks:
            x = _signed(t.direction, values[t.name])
            span = abs(self.specialist[t.name] - self.base[t.name])
            parts.append((x - self.base[t.name]) / span if span > 0 else x - self.base[t.name])
        return sum(parts) / len(parts)


def _better(a: Evaluation, b: Evaluation) -> bool:
    """Strictly better; a NaN score (a degenerate merge) loses to everything and beats nothing."""
    if math.isnan(a.score):
        return False
    return math.isnan(b.score) or a.score > b.score


def _references(prepared: Prepared, prober: _Prober) -> tuple[dict[str, float], dict[str, float]]:
    """Signed scores of θ₀ and of each task's specialist alone (chosen as normalized gain does).

    A task's specialist is the model its objective names, else the model with its name, else the
    specialist that scores best on it.
    """
    models = tuple(prepared.config.models)
    names = [t.name for t in prepared.tasks]
    base = prober.run(_base_plan(models), names)
    alone = {}
    for m in models:
        plan = MergePlan("task_arithmetic", models, {k: ModelParams(weight=1.0 if k == m else 0.0) for k in models})
        alone[m] = prober.run(plan, names)
    named = {o.name: getattr(o, "specialist", None) for o in prepared.config.objectives}
    specialist = {}
    for t in names:
        owner = named.get(t) or (t if t in models else max(models, key=lambda m, t=t: alone[m][t]))
        specialist[t] = alone[owner][t]
    return base, specialist


def hi_merging(
    prepared: Prepared,
    engine: Engine,
    *,
    rounds: int = 3,
    grid: Sequence[float] = (0.1, 0.4, 0.7, 1.0),
    method: str = "ties",
    options: Mapping[str, float | int | bool | str] | None = None,
    split: str = "search",
    threshold: float = 0.0,
    margin: float = 0.0,
    cross: bool = False,
    progress: Progress | None = None,
) -> HiMergingResult:
    """Hi-Merging without a person in the loop; returns the best plan it evaluated.

    0. *References*: θ₀ and each specialist alone, on every task (they fix the normalization;
       not logged, since a study has them as baselines).
    1. *Model-wise*: every model starts at density = scale = max(grid); then, one model at a time
       (the others held at their current values), every (density p, scale s) in grid × grid is
       tried and the best kept — N·|grid|² evaluations instead of |grid|^(2N). Methods without
       density search s only.
    2. *Analysis*: :func:`analyze_contributions` on the current best plan's coefficients.
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
    say = progress or _quiet
    started = time.perf_counter()
    if rounds < 0:
        raise ConfigError(f"hi_merging rounds is {rounds}; use 0 (model-wise only) or more")
    steps = sorted({float(x) for x in grid})
    if not steps or any(not 0.0 < x <= 1.0 for x in steps):
        raise ConfigError(f"hi_merging grid {list(grid)} must be non-empty values in (0, 1], e.g. [0.1, 0.4, 0.7, 1.0]")
    spec = get_method(method)
    # Only where the method normalizes by default: a method that already doesn't keeps its options
    # as the study's search space writes them, so its plans stay expressible as study parameters.
    opts: dict[str, float | int | bool | str] = {"normalize": False} if spec.options.get("normalize") else {}
    opts.update(options or {})
    models = tuple(prepared.config.models)
    densities = steps if spec.uses_density else [1.0]
    analyses: list[ContributionAnalysis] = []
    probes = 0

    say("stage 0: references")
    prober = _Prober(prepared, engine, split)
    base, specialist = _references(prepared, prober)
    say(f"θ₀ {_fmt(base)}; specialists {_fmt(specialist)} (signed)")
    ev = _Evaluator(prepared, engine, split, say, base, specialist)

    say("stage 1: model-wise density and scale")
    current = {m: ModelParams(weight=steps[-1], density=densities[-1]) for m in models}
    best = ev.evaluate(MergePlan(method, models, current, opts), "model_wise", "start")
    for m in models:
        for p, s in itertools.product(densities, steps):
            trial = {**current, m: ModelParams(weight=s, density=p)}
            found = ev.evaluate(MergePlan(method, models, trial, opts), "model_wise", f"{m} p={p:g} s={s:g}")
            if _better(found, best):
                best = found
        current = dict(best.plan.params)

    for r in range(1, rounds + 1):
        say(f"stage 2: contribution analysis, round {r}")
        analysis = analyze_contributions(
            prepared,
            engine,
            split=split,
            base_method=method,
            model_params=best.plan.params,
            options=opts,
            cross=cross,
            progress=say,
        )
        analyses.append(analysis)
        probes += analysis.probes
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
        probes=probes + prober.merges + ev.merges,
        seconds=round(time.perf_counter() - started, 3),
    )

"""Hi-Merging in a study: its probes scored through the study's engine, its results as trials.

Hi-Merging's analysis and procedure (:mod:`optimizer.merge.hi_merging`) reach a study through a
:class:`~optimizer.merge.hi_merging.Probe`; :class:`StudyProbe` is that probe. What they find lands
in the study as ordinary trials: the contribution analysis proposes plans (conflicting layers
dropped or halved) that are enqueued as warm starts, and the unattended procedure's every scored
plan is recorded as a COMPLETE trial. Each is stored as parameters where the search space can
express it (so the sampler learns from it: :func:`params_for_space`), else as a fixed plan, and
labelled so a report tells it apart from sampled trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from objectives.tasks import score_tasks
from optimizer.engines.base import Engine
from optimizer.errors import ConfigError
from optimizer.merge import MergePlan
from optimizer.merge.hi_merging import ContributionAnalysis, HiMergingResult, analyze_contributions, hi_merging
from optimizer.models import TensorInfo
from optimizer.search import attrs
from optimizer.search.overrides import record_layer_overrides, with_study_overrides
from optimizer.search.prepare import Prepared
from optimizer.search.space import SearchSpace

__all__ = [
    "AnalysisOutcome",
    "StudyProbe",
    "analyze_study",
    "enqueue_warm_starts",
    "params_for_space",
    "record_hi_merging",
    "run_hi_merging_stage",
]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StudyProbe:
    """A :class:`~optimizer.merge.hi_merging.Probe` over a prepared study and its engine."""

    prepared: Prepared
    engine: Engine
    split: str = "search"

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.prepared.config.models)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.prepared.tasks)

    @property
    def num_layers(self) -> int:
        return self.prepared.space.num_layers

    def maximize(self, task: str) -> bool:
        return next(t for t in self.prepared.tasks if t.name == task).direction == "maximize"

    def stated_task(self, model: str) -> str | None:
        own = self.prepared.config.stated_tasks(model)
        return own[0] if own else None

    def stated_specialist(self, task: str) -> str | None:
        return self.prepared.config.stated_specialist(task)

    def score(self, plan: MergePlan, tasks: Sequence[str]) -> dict[str, float]:
        """Merge ``plan`` and score ``tasks`` in one engine call per kind."""
        chosen = [t for t in self.prepared.tasks if t.name in tasks]
        self.engine.apply_plan(plan)
        results = score_tasks(self.engine, chosen, self.split)
        return {t.name: r.value for t, r in zip(chosen, results, strict=True)}


# -- the bridge to the search space ---------------------------------------------------------------


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


# -- the contribution analysis ----------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisOutcome:
    """What ``mergeopt analyze contributions`` did to a study."""

    analysis: ContributionAnalysis
    reused: bool  # the study's stored analysis, not a new one
    conflicts: list[tuple[str, str]]
    layers: list[str]  # the study's layer overrides after this analysis (empty: no conflicts)
    enqueued: list[str]  # warm-start labels enqueued


def analyze_study(
    study: optuna.Study,
    prepared: Prepared,
    engine: Engine,
    *,
    trial: int | None = None,
    split: str = "search",
    cross: bool = False,
    refresh: bool = False,
    threshold: float = 0.0,
    margin: float = 0.0,
    enqueue: bool = True,
    probes: str | None = None,
    embed_head: bool | None = None,
    progress: Progress | None = None,
) -> AnalysisOutcome:
    """Hi-Merging's layer probes on a study, and what the study keeps of them.

    The probes analyse every task vector at weight 1, or trial ``trial``'s coefficients; a stored
    analysis of the same trial is reused unless ``refresh``. Conflicting layers (``threshold``,
    ``margin``: :meth:`ContributionAnalysis.is_conflict`) get coefficients of their own in the
    study's space from now on, and with ``enqueue`` the analysis's warm starts are queued for the
    next ``mergeopt search``. ``probes`` and ``embed_head`` default to the study config's
    ``search.hi_merging`` (the authors' probes of the decoder layers unless it says otherwise).
    """
    if split not in ("search", "held_out"):
        raise ConfigError(f"--split {split!r} is not a split; use 'search' or 'held_out'")
    settings = prepared.config.search.hi_merging
    probes = settings.probes if probes is None else probes
    embed_head = settings.embed_head if embed_head is None else embed_head
    stored = study.user_attrs.get(attrs.CONTRIBUTIONS)
    reused = (
        isinstance(stored, dict)
        and not refresh
        and stored.get("trial") == trial
        and stored.get("weighting", "scaled") == probes
        and ("embed" in stored.get("layers", ())) == embed_head
    )
    if isinstance(stored, dict) and reused:
        analysis = ContributionAnalysis.from_dict(stored)
    else:
        plan = MergePlan("task_arithmetic", tuple(prepared.config.models))  # every task vector at weight 1
        if trial is not None:
            found = [t for t in study.get_trials(deepcopy=False) if t.number == trial and attrs.PLAN in t.user_attrs]
            if not found:
                raise ConfigError(f"study {study.study_name!r} has no trial {trial} with a plan; see 'mergeopt pareto'")
            plan = MergePlan.from_dict(found[0].user_attrs[attrs.PLAN])
        analysis = analyze_contributions(
            StudyProbe(prepared, engine, split),
            base_method=plan.method,
            model_params=plan.params,
            options=plan.options,
            probes=probes,
            pseudo_layers=embed_head,
            cross=cross,
            progress=progress,
        )
        study.set_user_attr(attrs.CONTRIBUTIONS, {**analysis.to_dict(), "trial": trial})
    conflicts = analysis.conflicts(threshold, margin=margin)
    layers = (
        record_layer_overrides(study, prepared.space.num_layers, (layer for _, layer in conflicts)) if conflicts else []
    )
    # The warm starts are parameters of the space as the next search opens it: with these layers.
    grown = with_study_overrides(study, prepared)
    labels = enqueue_warm_starts(study, grown, analysis, conflicts) if enqueue else []
    return AnalysisOutcome(analysis, reused, conflicts, layers, labels)


def enqueue_warm_starts(
    study: optuna.Study, prepared: Prepared, analysis: ContributionAnalysis, conflicts: list[tuple[str, str]]
) -> list[str]:
    """Enqueue the analysis's warm starts not already run or queued; returns the labels enqueued."""
    config = prepared.config
    options = {**config.options, "seed": config.search.seed}
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    have = {t.user_attrs.get(attrs.WARM_START) for t in study.get_trials(deepcopy=False, states=live)}
    done = []
    for label, plan in analysis.warm_start_plans(config.method, options=options, conflicts=conflicts).items():
        if label in have:
            continue
        params = params_for_space(plan, prepared.space)
        if params is not None:
            study.enqueue_trial(params, user_attrs={attrs.WARM_START: label})
        else:
            study.enqueue_trial({}, user_attrs={attrs.WARM_START: label, attrs.PLAN: plan.to_dict()})
        done.append(label)
    return done


# -- the unattended procedure -----------------------------------------------------------------------


def run_hi_merging_stage(
    study: optuna.Study, prepared: Prepared, engine: Engine, progress: Progress | None = None
) -> tuple[HiMergingResult, int] | None:
    """``method: hi_merging``: run the procedure once per study and record its plans as trials.

    Returns the result and how many trials it added, or None where there was nothing to do (another
    method, or a study that ran it already).
    """
    config = prepared.config
    if config.method != "hi_merging" or attrs.HI_MERGING in study.user_attrs:
        return None
    hm = config.search.hi_merging
    result = hi_merging(
        StudyProbe(prepared, engine),
        rounds=hm.rounds,
        grid=tuple(hm.grid),
        model_wise=hm.model_wise,
        probes=hm.probes,
        pseudo_layers=hm.embed_head,
        method="hi_merging",
        options={**config.options, "seed": config.search.seed},
        margin=hm.margin,
        cross=hm.cross,
        progress=progress,
    )
    return result, record_hi_merging(study, prepared, result)


def record_hi_merging(study: optuna.Study, prepared: Prepared, result: HiMergingResult) -> int:
    """Store every plan Hi-Merging scored as a COMPLETE trial; returns how many were added."""
    dists = prepared.space.distributions()
    names = [t.name for t in prepared.tasks]
    added = 0
    for ev in result.evaluations:
        values = [ev.values[n] for n in names]
        if not all(math.isfinite(v) for v in values):
            continue
        params = params_for_space(ev.plan, prepared.space) or {}
        user_attrs: dict[str, object] = {attrs.PLAN: ev.plan.to_dict(), attrs.HI_MERGING: f"{ev.stage}: {ev.label}"}
        if ev.plan == result.plan:
            user_attrs[attrs.HI_MERGING_CHOICE] = True
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, values=values, user_attrs=user_attrs
            )
        )
        added += 1
    study.set_user_attr(
        attrs.HI_MERGING,
        {"score": result.score, "plan": result.plan.to_dict(), "analyses": [a.to_dict() for a in result.analyses]},
    )
    return added

"""Hi-Merging's layer probes: how much each layer of each model helps alone, and merged.

For each model m and decoder layer l the single-layer contribution

    αₘ,ₗ = Perfₘ(θ₀ + τ̂ₘ on layer l) − Perfₘ(θ₀)

and the merged-layer contribution

    βₘ,ₗ = Perfₘ(merge of every τ̂ₖ on layer l) − Perfₘ(θ₀),

where τ̂ₖ is model k's task vector trimmed to the density under analysis. How the probes weigh the
task vectors (``probes``):

* ``authors`` (the default), as the authors' scripts run them through mergekit's ``ties``: the
  single-layer probe sets that layer of the one model to weight 1.0 (not to the model's model-wise
  scale), and the merged-layer probe sets every model's weight on the layer to 0.5 with the method's
  ``normalize`` on — so an entry only one model keeps enters at full size, and the merge is the
  disjoint mean of the entries the models agree on. A method without a ``normalize`` option gets
  1/N instead (0.5 for two models, the authors' case).
* ``scaled``, mergeopt's earlier variant: α at the model's own scale on that layer, β at its scale
  divided by N with the options under analysis (normalize off for Hi-Merging's merge), which halves
  an entry only one model keeps and can read mere dilution as a conflict.

The authors probe the decoder layers only: embeddings and the head keep the coefficients under
analysis. ``pseudo_layers=True`` probes them too, as the ``embed`` and ``head`` pseudo-layers (plan
scopes ``m.embed``, ``m.head``).

A probe is an ordinary :class:`MergePlan` (:func:`probe_plan`: model-level weight 0, the probed
layer's scope set), so every engine runs it through its normal ``apply_plan``. "Perfₘ" is the score
of model m's own task (:func:`model_tasks`), signed so that higher is better (minimized metrics
such as NLL are negated), which lets one conflict rule serve every metric. The study is reached
through the :class:`Probe` protocol only (``optimizer.search.warm_starts`` provides it), so this
module needs nothing above the merge core.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from optimizer.errors import ConfigError
from optimizer.merge._registry import get_method
from optimizer.merge.hi_merging.analysis import ContributionAnalysis, at
from optimizer.merge.plan import MergePlan, ModelParams, base_plan
from optimizer.models import layer_key

__all__ = [
    "PROBES",
    "PSEUDO_LAYERS",
    "Probe",
    "Progress",
    "analyze_contributions",
    "layer_labels",
    "model_tasks",
    "probe_plan",
]

#: Tensors outside the decoder stack, probed as if they were layers when asked (plan scopes
#: ``m.embed``, ``m.head``): two more probes per model, and embeddings are where vocabulary-level
#: specialisation often sits. The authors' layer lists leave them out, so by default so does mergeopt.
PSEUDO_LAYERS: tuple[str, ...] = ("embed", "head")

#: How the probes weigh the task vectors (module docstring): the authors' way first, the default.
PROBES: tuple[str, ...] = ("authors", "scaled")

Progress = Callable[[str], None]


class Probe(Protocol):
    """What Hi-Merging needs of a study: its models, tasks and depth, and a way to score a plan."""

    @property
    def models(self) -> tuple[str, ...]:
        """The specialists, in the plans' model order."""
        ...

    @property
    def tasks(self) -> tuple[str, ...]:
        """The study's task names, in objective order."""
        ...

    @property
    def num_layers(self) -> int:
        """Decoder layers of the base."""
        ...

    @property
    def split(self) -> str:
        """The split the probes score (``search`` or ``held_out``)."""
        ...

    def maximize(self, task: str) -> bool:
        """Whether higher is better on ``task``."""
        ...

    def stated_task(self, model: str) -> str | None:
        """The task the config says is ``model``'s own, if it says so."""
        ...

    def stated_specialist(self, task: str) -> str | None:
        """The model the config says ``task`` measures, if it says so."""
        ...

    def score(self, plan: MergePlan, tasks: Sequence[str]) -> dict[str, float]:
        """Merge ``plan`` in place and return the raw score of each of ``tasks``."""
        ...


def quiet(_message: str) -> None:
    """The default progress sink."""


def layer_labels(num_layers: int, *, pseudo_layers: bool = True) -> tuple[str, ...]:
    """Probe labels in network order: ``embed``, ``L00`` … ``L{n-1}``, ``head``."""
    decoder = tuple(layer_key(i) for i in range(num_layers))
    embed, head = PSEUDO_LAYERS
    return (embed, *decoder, head) if pseudo_layers else decoder


def fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


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


def _owner(scope: str) -> str:
    return scope.split(".", 1)[0]


def _check_scopes(params: Mapping[str, ModelParams], models: Sequence[str], layers: Sequence[str]) -> None:
    """Probes read model scopes and model.layer scopes only; anything else would be silently ignored."""
    allowed = set(models) | {f"{m}.{layer}" for m in models for layer in layers}
    bad = sorted(s for s in params if s not in allowed)
    if bad:
        raise ConfigError(
            f"contribution analysis cannot read the coefficient scopes {', '.join(bad)}; it reads model scopes"
            f" ('{models[0]}') and layer scopes ('{models[0]}.{layers[0]}'). Analyse a model- or layer-wise plan"
        )


class _Counter:
    """Runs probes through the study's :class:`Probe`, signed so that higher is better, and counts them."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.merges = 0

    def run(self, plan: MergePlan, tasks: Sequence[str]) -> dict[str, float]:
        """Signed scores of ``tasks`` under ``plan``."""
        self.merges += 1
        values = self.probe.score(plan, list(tasks))
        return {name: values[name] if self.probe.maximize(name) else -values[name] for name in tasks}


def model_tasks(probe: Probe, specialist_gain: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, str]:
    """Each model's own task: whose score is "Perfₘ".

    The task the config states (:meth:`Probe.stated_task`) where it states one; otherwise the task
    the specialist improves most over the base, ``specialist_gain[model][task]`` (signed score minus
    base; ties to the earlier task). Improvement rather than raw score, because a raw score mostly
    says how easy a task is. Without ``specialist_gain`` an unmatched model raises.
    """
    names = list(probe.tasks)
    out: dict[str, str] = {}
    for m in probe.models:
        stated = probe.stated_task(m)
        if stated is not None:
            out[m] = stated
        elif specialist_gain is not None:
            gains = specialist_gain[m]

            def improvement(task: str, gains: Mapping[str, float] = gains) -> tuple[float, int]:
                return gains[task], -names.index(task)  # ties to the earlier task

            out[m] = max(names, key=improvement)
        else:
            raise ConfigError(
                f"model {m!r} has no task of its own; name an objective after it or set 'specialist: {m}'"
                " on the objective that measures it"
            )
    return out


def _single_layer(params: Mapping[str, ModelParams], model: str, layer: str, probes: str) -> ModelParams:
    """Model ``model``'s coefficients in its single-layer probe of ``layer``."""
    own = at(params, model, layer)
    return replace(own, weight=1.0) if probes == "authors" else own


def _merged_layer(
    params: Mapping[str, ModelParams],
    models: Sequence[str],
    layer: str,
    probes: str,
    normalizes: bool,
) -> dict[str, ModelParams]:
    """Every model's coefficients in the merged-layer probe of ``layer``."""
    n = len(models)
    if probes == "authors":
        weight = 0.5 if normalizes else 1.0 / n  # normalized, any equal weight is the same merge
        return {k: replace(at(params, k, layer), weight=weight) for k in models}
    # 1/N: the uniform average of the N task vectors at their own scales.
    return {k: replace(at(params, k, layer), weight=at(params, k, layer).weight / n) for k in models}


def analyze_contributions(
    probe: Probe,
    *,
    base_method: str = "task_arithmetic",
    model_params: Mapping[str, ModelParams] | None = None,
    options: Mapping[str, float | int | bool | str] | None = None,
    probes: str = "authors",
    pseudo_layers: bool = False,
    cross: bool = False,
    progress: Progress | None = None,
) -> ContributionAnalysis:
    """Probe every model × layer once alone (α) and every layer once merged (β).

    ``model_params`` are the coefficients under analysis, as plan scopes: ``"rev"`` (model-wise)
    and optionally ``"rev.L03"`` (one layer); absent models get weight 1, density 1. They are
    merged with ``base_method`` and ``options``; ``probes`` says how the probes weigh them (module
    docstring) and ``pseudo_layers`` whether the embedding and the head are probed too. Cost, in
    merge-and-score runs: 1 (θ₀) + N (each model alone, for context) + L·N (α) + L (β, each scored
    on the N own tasks). ``cross`` scores every α probe on every model's task too (N scorings
    instead of one, same number of merges), which lets :meth:`ContributionAnalysis.culprit` name
    the model that actually hurts instead of guessing. The engine is left holding the last probe.
    """
    say = progress or quiet
    started = time.perf_counter()
    if probes not in PROBES:
        raise ConfigError(f"hi_merging probes {probes!r} is not known; use one of {', '.join(PROBES)}")
    models = tuple(probe.models)
    layers = layer_labels(probe.num_layers, pseudo_layers=pseudo_layers)
    params = dict(model_params or {})
    _check_scopes(params, models, layer_labels(probe.num_layers))
    spec = get_method(base_method)  # an unknown method fails here, before any probe
    opts = dict(options or {})
    normalizes = "normalize" in spec.options
    # The authors' merged-layer probe: mergekit's ties with its default normalize (on).
    merged_opts = {**opts, "normalize": True} if probes == "authors" and normalizes else opts
    prober = _Counter(probe)
    all_tasks = list(probe.tasks)
    base_scores = prober.run(base_plan(models), all_tasks)
    say(f"θ₀: {fmt(base_scores)}")
    gains: dict[str, dict[str, float]] = {}
    alone: dict[str, dict[str, float]] = {}
    for m in models:
        only_m = {
            **{k: ModelParams(weight=0.0) for k in models if k != m},
            **{s: p for s, p in params.items() if _owner(s) == m},
        }
        stated = probe.stated_task(m)
        # A model without a stated task is scored on every task, to find the one it is good at.
        alone[m] = prober.run(MergePlan(base_method, models, only_m, opts), [stated] if stated else all_tasks)
        gains[m] = {t: v - base_scores[t] for t, v in alone[m].items()}
    task_of = model_tasks(probe, gains)
    say("own tasks: " + ", ".join(f"{m}→{t}" for m, t in task_of.items()))
    own_tasks = list(dict.fromkeys(task_of.values()))

    alpha: dict[str, dict[str, float]] = {m: {} for m in models}
    crossed: dict[str, dict[str, dict[str, float]]] = {k: {m: {} for m in models} for k in models}
    for m in models:
        for layer in layers:
            scores = prober.run(
                probe_plan(base_method, models, layer, {m: _single_layer(params, m, layer, probes)}, options=opts),
                own_tasks if cross else [task_of[m]],
            )
            alpha[m][layer] = scores[task_of[m]] - base_scores[task_of[m]]
            if cross:
                for k in models:
                    crossed[m][k][layer] = scores[task_of[k]] - base_scores[task_of[k]]
            say(f"α {m} {layer}: {alpha[m][layer]:+.4f}")

    beta: dict[str, dict[str, float]] = {m: {} for m in models}
    for layer in layers:
        merged = _merged_layer(params, models, layer, probes, normalizes)
        scores = prober.run(probe_plan(base_method, models, layer, merged, options=merged_opts), own_tasks)
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
        split=probe.split,
        cross=crossed if cross else None,
        probes=prober.merges,
        seconds=round(time.perf_counter() - started, 3),
        weighting=probes,
    )

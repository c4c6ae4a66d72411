"""Hi-Merging's contribution analysis as a record: α, β, conflicts and what to do about them.

:class:`ContributionAnalysis` holds what the probes measured (:mod:`optimizer.merge.hi_merging.probes`)
and says which layers conflict, who to blame, which plans to try (warm starts) and which scopes
deserve their own coefficients; it round-trips through JSON so a study can cache it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from optimizer.errors import ConfigError
from optimizer.merge._registry import get_method
from optimizer.merge.plan import MergePlan, ModelParams

__all__ = ["RESOLUTIONS", "ContributionAnalysis", "at", "resolve_layers"]

#: How a conflict is resolved on the culprit's layer scope: weight → 0, weight × ½, density × ½.
RESOLUTIONS: tuple[str, ...] = ("drop", "halve", "prune")

_FORMAT = 1  # bump when the JSON layout changes; from_json refuses other versions


def at(params: Mapping[str, ModelParams], model: str, layer: str) -> ModelParams:
    """The coefficients ``model`` has on ``layer``: its layer scope, else its model scope."""
    return params.get(f"{model}.{layer}") or params.get(model) or ModelParams()


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
    weighting: str = "authors"

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
            "weighting": self.weighting,
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
            weighting=str(data.get("weighting", "scaled")),  # stored before the authors' probes existed
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
        now = at(params, model, layer)
        if mode == "drop":
            new = replace(now, weight=0.0)
        elif mode == "halve":
            new = replace(now, weight=now.weight / 2)
        else:
            new = replace(now, density=now.density / 2)
        out[f"{model}.{layer}"] = new
    return out

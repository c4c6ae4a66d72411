"""The search space: config → named Optuna parameters → MergePlan.

Parameter names are the plan's scope names plus the coefficient (``rev.L03.attn.weight``,
``rev.L00-01.density``, ``rev.embed.weight``, or ``rev.weight`` for model-wise search). They
are stored in every saved study, so they must never change meaning between versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import optuna

from optimizer.config import StudyConfig
from optimizer.merge import MergePlan, ModelParams, get_method
from optimizer.models import expert_key, layer_key

__all__ = ["Group", "SearchSpace"]


@dataclass(frozen=True)
class Group:
    """One set of tensors that share coefficients: a scope label and the plan scopes it covers."""

    label: str  # as it appears in parameter names, e.g. "L00-01.attn", "embed", "" (model-wise)
    scopes: tuple[str, ...]  # plan scope suffixes, e.g. ("L00.attn", "L01.attn")


def _layer_groups(num_layers: int, size: int) -> list[tuple[str, list[int]]]:
    groups = []
    for start in range(0, num_layers, size):
        layers = list(range(start, min(start + size, num_layers)))
        label = layer_key(layers[0]) if len(layers) == 1 else f"{layer_key(layers[0])}-{layers[-1]:02d}"
        groups.append((label, layers))
    return groups


class SearchSpace:
    """Turns a study config into parameters and a trial into a plan."""

    def __init__(
        self, config: StudyConfig, num_layers: int, layer_overrides: tuple[str, ...] = (), num_experts: int = 0
    ):
        """``layer_overrides``: layers (``L03``, ``embed``, ``head``) that get coefficients of their own
        in a model-wise space — the conflicting layers of a contribution analysis. ``num_experts``:
        experts per layer searched apart (``experts: each``; 0 when a layer's experts share the MLP's)."""
        self.config = config
        self.models = tuple(config.models)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.method = get_method(config.method)
        self.layer_overrides = tuple(layer_overrides) if config.granularity == "model" else ()
        self.groups = self._groups(config, num_layers, num_experts)
        self.groups += [Group(label, (label,)) for label in self.layer_overrides]

    @staticmethod
    def _groups(config: StudyConfig, num_layers: int, num_experts: int) -> list[Group]:
        if config.granularity == "model":
            return [Group("", ("",))]
        size = 1 if config.granularity == "layer" else config.group_size
        kinds = ("attn", "mlp") if config.split_modules else (None,)
        groups: list[Group] = []
        for label, layers in _layer_groups(num_layers, size):
            for kind in kinds:
                suffix = f".{kind}" if kind else ""
                groups.append(Group(label + suffix, tuple(layer_key(i) + suffix for i in layers)))
            for e in range(num_experts):  # after the MLP's group: the router, norms and shared experts keep it
                tail = f".mlp.{expert_key(e)}"
                groups.append(Group(label + tail, tuple(layer_key(i) + tail for i in layers)))
        # Outside the decoder stack: embeddings and the head (final norm + lm_head).
        groups += [Group("embed", ("embed",)), Group("head", ("head",))]
        return groups

    # -- names -----------------------------------------------------------------------------------
    def coefficients(self) -> tuple[str, ...]:
        out = []
        if self.method.uses_weight:
            out.append("weight")
        if self.method.uses_density:
            out.append("density")
        return tuple(out)

    @staticmethod
    def param_name(model: str, group: Group, coef: str) -> str:
        return ".".join(x for x in (model, group.label, coef) if x)

    def distributions(self) -> dict[str, optuna.distributions.FloatDistribution]:
        """Every parameter of the study with its range, in a stable order."""
        out: dict[str, optuna.distributions.FloatDistribution] = {}
        for model in self.models:
            for group in self.groups:
                for coef in self.coefficients():
                    bounds = self.config.weight if coef == "weight" else self.config.density
                    out[self.param_name(model, group, coef)] = optuna.distributions.FloatDistribution(
                        bounds.low, bounds.high
                    )
        for name, (low, high, log) in self.searched_options().items():
            out[f"option.{name}"] = optuna.distributions.FloatDistribution(low, high, log=log)
        return out

    def searched_options(self) -> dict[str, tuple[float, float, bool]]:
        """Method options the study searches: the config's ``search_options``, else the method's
        default ``searchable`` ones that the config does not fix in ``options``."""
        if self.config.search_options:
            return {k: (b.low, b.high, b.log) for k, b in self.config.search_options.items()}
        return {k: v for k, v in self.method.searchable.items() if k not in self.config.options}

    # -- trial → plan ----------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> MergePlan:
        """Ask the sampler for every parameter and build the plan."""
        params = {name: trial.suggest_float(name, dist.low, dist.high) for name, dist in self.distributions().items()}
        return self.plan_from_params(params)

    def plan_from_params(self, params: Mapping[str, float]) -> MergePlan:
        """The plan a set of parameter values stands for (used by export and tests too)."""
        scoped: dict[str, ModelParams] = {}
        for model in self.models:
            for group in self.groups:
                weight = params.get(self.param_name(model, group, "weight"), self.method.default_weight)
                density = params.get(self.param_name(model, group, "density"), self.method.default_density)
                for scope in group.scopes:
                    key = f"{model}.{scope}" if scope else model
                    scoped[key] = ModelParams(weight=float(weight), density=float(density))
        options: dict[str, float | int | bool] = {**self.config.options, "seed": self.config.search.seed}
        for name in self.searched_options():
            if f"option.{name}" in params:
                options[name] = float(params[f"option.{name}"])
        return MergePlan(self.config.method, self.models, scoped, options)

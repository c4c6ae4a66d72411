"""MergePlan: the coefficients of one candidate, and nothing else.

A plan is what crosses process boundaries (into a vLLM worker, into the study's storage, into an
export), so it holds only numbers and names: the method, the specialists in order, method-wide
options, and per-scope ``ModelParams``. Scopes are the same dotted names the search space uses
(``math``, ``math.L03``, ``math.L03.attn``, ``math.embed``): a tensor takes the most specific scope
that exists, so a model-wise plan and a per-layer, per-module plan are the same type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from optimizer.models import TensorInfo, expert_key, layer_key

__all__ = ["MergePlan", "ModelParams", "base_plan", "is_expert_scope", "scopes_for", "specialist_plan"]


@dataclass(frozen=True, slots=True)
class ModelParams:
    """One specialist's coefficients for one tensor: scale λ (``weight``) and prune ``density``."""

    weight: float = 1.0
    density: float = 1.0


_EXPERT_SCOPE = re.compile(r"\.mlp\.(?:e\d+|router)$")


def is_expert_scope(scope: str) -> bool:
    """Whether ``scope`` gives one expert of a mixture-of-experts layer, or its router, params of their
    own (``m.L03.mlp.e05``, ``m.L03.mlp.router``)."""
    return _EXPERT_SCOPE.search(scope) is not None


def scopes_for(model: str, info: TensorInfo) -> tuple[str, ...]:
    """Scope names that may hold ``model``'s params for this tensor, most specific first."""
    if info.layer is None:
        return (f"{model}.{info.kind}", model)
    lk = layer_key(info.layer)
    scopes = (f"{model}.{lk}.{info.kind}", f"{model}.{lk}", f"{model}.{info.kind}", model)
    if info.expert is not None:  # an expert of a mixture-of-experts layer: L03.mlp.e05 first
        return (f"{model}.{lk}.{info.kind}.{expert_key(info.expert)}", *scopes)
    if info.role == "router":  # a mixture-of-experts router (and gate of shared experts): L03.mlp.router
        return (f"{model}.{lk}.{info.kind}.router", *scopes)
    return scopes


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to build one merged model from the base and its specialists.

    ``params`` maps scope → ModelParams; a model with no matching scope gets ``ModelParams()``
    (weight 1, density 1), so ``MergePlan("task_arithmetic", ("a", "b"))`` is plain task arithmetic.
    ``options`` are method-wide values (``normalize``, ``lambda``, ``seed``...).
    """

    method: str
    models: tuple[str, ...]
    params: Mapping[str, ModelParams] = field(default_factory=dict)
    options: Mapping[str, float | int | bool | str] = field(default_factory=dict)

    def for_tensor(self, info: TensorInfo) -> tuple[ModelParams, ...]:
        """Each model's params for this tensor, in ``models`` order."""
        out = []
        for model in self.models:
            for scope in scopes_for(model, info):
                if scope in self.params:
                    out.append(self.params[scope])
                    break
            else:
                out.append(ModelParams())
        return tuple(out)

    def to_dict(self) -> dict:
        """A JSON-ready dict (used for storage user attrs and engine RPC)."""
        return {
            "method": self.method,
            "models": list(self.models),
            "params": {k: {"weight": v.weight, "density": v.density} for k, v in sorted(self.params.items())},
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> MergePlan:
        return cls(
            method=str(data["method"]),
            models=tuple(data["models"]),
            params={k: ModelParams(**v) for k, v in data.get("params", {}).items()},
            options=dict(data.get("options", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergePlan:
        return cls.from_dict(json.loads(text))


def base_plan(models: tuple[str, ...]) -> MergePlan:
    """θ₀ itself: task arithmetic with every weight 0 (exact for every engine)."""
    return MergePlan("task_arithmetic", tuple(models), {m: ModelParams(weight=0.0) for m in models})


def specialist_plan(models: tuple[str, ...], model: str) -> MergePlan:
    """Specialist ``model`` alone, θ₀ + τₘ: task arithmetic with its weight 1 and the others' 0."""
    return MergePlan(
        "task_arithmetic", tuple(models), {k: ModelParams(weight=1.0 if k == model else 0.0) for k in models}
    )

"""The merge-method registry: one way to register, one way to look up.

A method is a frozen :class:`MergeMethod` record whose ``merge`` is a pure torch function on one
tensor. Methods register themselves at import (``register(MergeMethod(...))`` at the bottom of
their module); ``get_method`` names the valid methods when asked for an unknown one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optimizer.errors import ConfigError
from optimizer.merge.plan import ModelParams

__all__ = ["MergeFn", "MergeMethod", "get_method", "method_names", "register"]

#: ``merge(base, deltas, params, options, generator) -> merged tensor``.
#: ``deltas[m]`` is specialist m's task vector τₘ = θₘ − θ₀ for this tensor and ``params[m]`` its
#: coefficients; ``options`` holds method-wide values with the method's defaults filled in;
#: ``generator`` is seeded per tensor for methods that draw random masks (DARE), else unused.
MergeFn = Callable[
    [torch.Tensor, Sequence[torch.Tensor], Sequence[ModelParams], Mapping[str, object], torch.Generator],
    torch.Tensor,
]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the search sees it.

    ``uses_weight`` / ``uses_density`` say which per-model coefficients the search space should
    create; ``options`` are method-wide defaults (overridable in the config). ``mergekit`` is the
    name of the equivalent mergekit method, or None where mergekit has none.
    """

    name: str
    merge: MergeFn
    summary: str
    uses_weight: bool = True
    uses_density: bool = False
    default_weight: float = 1.0
    default_density: float = 1.0
    options: Mapping[str, float | int | bool] = field(default_factory=dict)
    mergekit: str | None = None
    needs: str | None = None
    bind: Callable[[Mapping[str, Mapping[str, torch.Tensor]], Path], MergeMethod] | None = None
    searchable: Mapping[str, tuple[float, float, bool]] = field(default_factory=dict)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method; a second method under the same name is a programming error."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice; give the new one another name")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; choose one of: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)

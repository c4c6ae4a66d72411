"""The merge-method registry: one way to register, one way to look up.

A method is a frozen :class:`MergeMethod` record whose ``merge`` is a pure torch function on one
tensor. Methods register themselves at import (``register(MergeMethod(...))`` at the bottom of
their module); ``get_method`` names the valid methods when asked for an unknown one. A method
that needs data measured once per study (RegMean's Grams, HILA's importances) declares it as a
:class:`~optimizer.merge.study_data.StudyData` and has no ``merge`` until it is bound to that data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from optimizer.checkpoints import ModelSet
from optimizer.errors import ConfigError
from optimizer.merge.plan import ModelParams

__all__ = [
    "MergeFn",
    "MergeMethod",
    "StudyData",
    "StudyInputs",
    "get_method",
    "method_names",
    "number_option",
    "register",
]

#: ``merge(name, base, deltas, params, options, generator) -> merged tensor``.
#: ``name`` is the checkpoint tensor's name (methods bound to per-tensor data, e.g. RegMean's Grams,
#: look it up; most ignore it); ``deltas[m]`` is specialist m's task vector τₘ = θₘ − θ₀ for this
#: tensor and ``params[m]`` its coefficients; ``options`` holds method-wide values with the method's
#: defaults filled in; ``generator`` is seeded per tensor for methods that draw random masks (DARE).
MergeFn = Callable[
    [str, torch.Tensor, Sequence[torch.Tensor], Sequence[ModelParams], Mapping[str, object], torch.Generator],
    torch.Tensor,
]


#: Measured study data: model name → key → tensor (one safetensors file per study and kind).
Measured = dict[str, dict[str, torch.Tensor]]


class StudyInputs(Protocol):
    """What a study offers a method's measurement; the study (``optimizer.search.study_data``)
    provides it, so a method's measuring code needs nothing above the merge core."""

    @property
    def models(self) -> ModelSet:
        """The base and the specialists, in the plan's model order."""
        ...

    def calibration(self, model: str) -> list[str]:
        """Training-like text of ``model`` (its own tasks' calibration rows, prompt and answer),
        never the search split; at most the study's ``calibration.examples``."""
        ...

    def golden(self, model: str) -> list[dict[str, str]]:
        """``model``'s own greedy answers to its tasks' prompts (rows with ``prompt``, ``target``)."""
        ...

    def say(self, message: str) -> None:
        """Report progress to whoever runs the study."""
        ...


class StudyData(ABC):
    """What a method measures once per study, how that is keyed, and how the method merges with it.

    Life cycle: the study asks :meth:`key` (cheap) and compares it, with the models' fingerprints,
    against the file cached beside the study (``<kind>.safetensors``); only on a miss does it call
    :meth:`measure` and write the file. Every process that merges (the study, a vLLM worker, an
    export) then loads the file and calls :meth:`bind`.
    """

    #: The cache file's stem beside the study, e.g. ``grams``.
    kind: str = ""
    #: Bumped when what :meth:`measure` computes changes, so old files are measured again.
    version: int = 1

    @abstractmethod
    def key(self, inputs: StudyInputs) -> object:
        """Everything besides the model files that the data depends on (JSON-serialisable)."""

    @abstractmethod
    def measure(self, inputs: StudyInputs) -> Measured:
        """The data, per model in ``inputs.models`` order (slow: once per study)."""

    @abstractmethod
    def bind(self, data: Mapping[str, Mapping[str, torch.Tensor]], base: Path) -> MergeFn:
        """The method's merge function over ``data`` (``base``: the base model's directory)."""


#: (one tensor's per-model params, the method's options) → (c₀, [cₘ]) of c₀·θ₀ + Σ cₘ τₘ.
LinearCoefficients = Callable[[Sequence[ModelParams], Mapping[str, object]], tuple[float, list[float]]]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the search sees it.

    ``uses_weight`` / ``uses_density`` say which per-model coefficients the search space should
    create; ``options`` are method-wide defaults (overridable in the config) and ``searchable``
    the options a study searches by default (option → (low, high, log scale)). ``mergekit`` is the
    name of the equivalent mergekit method, or None where mergekit has none. ``study_data`` is what
    the method measures once per study; such a method's ``merge`` is None until
    :func:`~optimizer.merge.study_data.bind` gives it the study's data.
    """

    name: str
    merge: MergeFn | None
    summary: str
    uses_weight: bool = True
    uses_density: bool = False
    default_weight: float = 1.0
    default_density: float = 1.0
    options: Mapping[str, float | int | bool] = field(default_factory=dict)
    mergekit: str | None = None
    study_data: StudyData | None = None
    searchable: Mapping[str, tuple[float, float, bool]] = field(default_factory=dict)
    #: For a method whose merge is c₀·θ₀ + Σ cₘ τₘ (task arithmetic, linear): one tensor's
    #: coefficients (c₀, [cₘ]). With it, adapters' task vectors are combined from their factors in
    #: one stacked matmul instead of each being expanded (:func:`optimizer.low_rank.combine`).
    linear_in_deltas: LinearCoefficients | None = None


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


def number_option(options: Mapping[str, object], key: str, default: float, method: str) -> float:
    """A numeric method option from a plan's options (a bool or a string is refused with the fix)."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{method} option {key}={value!r}: must be a number")
    return float(value)


def method_names() -> list[str]:
    return sorted(_REGISTRY)

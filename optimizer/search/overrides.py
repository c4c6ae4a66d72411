"""What a study learned about its own search space: layers that deserve their own coefficients.

A contribution analysis (``mergeopt analyze contributions``) finds layers that help a model alone
but hurt in the merge. The study records them (user attr ``layer_overrides``) and from then on a
model-wise space gives those layers their own weight/density per model while every other layer
keeps sharing the model-wise ones: the search spends parameters where the conflict is. Optuna's
samplers accept a space that grows (new parameters are sampled independently at first). The
space is built with them when the study is opened (:func:`optimizer.search.study.open_study`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import optuna

from optimizer.errors import ConfigError
from optimizer.models import layer_key
from optimizer.search import attrs
from optimizer.search.prepare import Prepared
from optimizer.search.space import SearchSpace

__all__ = ["record_layer_overrides", "study_overrides", "with_study_overrides"]


def _check(labels: Iterable[str], num_layers: int) -> list[str]:
    valid = {"embed", "head", *(layer_key(i) for i in range(num_layers))}
    out = sorted(set(labels))
    bad = [label for label in out if label not in valid]
    if bad:
        raise ConfigError(
            f"layer {bad[0]!r} is not a layer of this model; use embed, head or L00..{layer_key(num_layers - 1)}"
        )
    return out


def study_overrides(study: optuna.Study) -> tuple[str, ...]:
    """The layers the study has recorded so far."""
    return tuple(study.user_attrs.get(attrs.LAYER_OVERRIDES, []))


def record_layer_overrides(study: optuna.Study, num_layers: int, labels: Iterable[str]) -> list[str]:
    """Store the layers (merged with those already stored) and return the full list."""
    merged = _check([*study_overrides(study), *labels], num_layers)
    study.set_user_attr(attrs.LAYER_OVERRIDES, merged)
    return merged


def with_study_overrides(study: optuna.Study, prepared: Prepared) -> Prepared:
    """``prepared`` with a space that includes the study's recorded layer overrides."""
    labels = study_overrides(study)
    if not labels or prepared.config.granularity != "model" or labels == prepared.space.layer_overrides:
        return prepared
    space = SearchSpace(
        prepared.config, prepared.space.num_layers, layer_overrides=labels, num_experts=prepared.space.num_experts
    )
    return replace(prepared, space=space)

"""The merge core: pure torch, no I/O.

Each method lives in its own module and registers itself on import; this package imports them
all so ``get_method(name)`` sees every built-in method.
"""

from __future__ import annotations

from optimizer.merge import (  # noqa: F401  (registration)
    breadcrumbs,
    dare,
    della,
    hi_merging,
    hila,
    linear,
    model_stock,
    multislerp,
    regmean,
    sce,
    task_arithmetic,
    ties,
    widen,
)
from optimizer.merge._registry import MergeMethod, get_method, method_names, register
from optimizer.merge.apply import iter_merged, merge_state_dict, merge_tensor, task_vectors
from optimizer.merge.plan import MergePlan, ModelParams

__all__ = [
    "MergeMethod",
    "MergePlan",
    "ModelParams",
    "get_method",
    "iter_merged",
    "merge_state_dict",
    "merge_tensor",
    "method_names",
    "register",
    "task_vectors",
]

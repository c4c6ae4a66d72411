"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
with Sparse Masks", ECCV 2024).

Both tails of |τ| are noise for merging: the tiny entries carry little, and the few huge outliers
dominate and conflict between tasks. Breadcrumbs drops the top ``gamma`` fraction and as many of
the smallest as needed to keep ``density`` of the entries, then adds the survivors (task
arithmetic); ``breadcrumbs_ties`` adds TIES' sign election instead.

``gamma`` is method-wide here (one outlier fraction per study); mergekit allows it per model, and
the export writes ours as its global value. Defaults are mergekit's (``gamma`` 0.01, no
``normalize``, no rescale); density 0.9 is the paper's regime of dropping mostly small entries
(mergekit's own default, 1.0, would skip the pruning altogether, outliers included).
"""

from __future__ import annotations

from optimizer.merge._generalized import Consensus, Sparsification, generalized_method
from optimizer.merge._registry import register

_OPTIONS = {"normalize": False, "lambda": 1.0, "rescale": False, "gamma": 0.01}

BREADCRUMBS = register(
    generalized_method(
        name="breadcrumbs",
        summary="drop both magnitude tails, then task arithmetic (Davari & Belilovsky, 2024)",
        sparsification=Sparsification.BREADCRUMBS,
        consensus=Consensus.NONE,
        options=_OPTIONS,
        default_density=0.9,
        mergekit="breadcrumbs",
    )
)

BREADCRUMBS_TIES = register(
    generalized_method(
        name="breadcrumbs_ties",
        summary="drop both magnitude tails, then TIES sign election (Davari & Belilovsky, 2024)",
        sparsification=Sparsification.BREADCRUMBS,
        consensus=Consensus.SIGN,
        options=_OPTIONS,
        default_density=0.9,
        mergekit="breadcrumbs_ties",
    )
)

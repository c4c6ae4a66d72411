"""TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023).

Trim each task vector to its top-``density`` entries by magnitude, elect a sign per entry from the
weighted mass, and average only the entries that agree with it (divided by the weights of the
models that agree). Interference between specialists shows up as opposite signs on the same
weight; the vote settles it instead of letting the two cancel.

Defaults follow the paper (density 0.2 — "keep the top 20%") and mergekit's
``ties`` (``normalize`` on, no rescale, ``lambda`` 1).
"""

from __future__ import annotations

from optimizer.merge._generalized import Consensus, Sparsification, generalized_method
from optimizer.merge._registry import register

TIES = register(
    generalized_method(
        name="ties",
        summary="trim to top-k, elect signs, disjoint mean (Yadav et al., 2023)",
        sparsification=Sparsification.MAGNITUDE,
        consensus=Consensus.SIGN,
        options={"normalize": True, "lambda": 1.0, "rescale": False},
        default_density=0.2,
        mergekit="ties",
    )
)

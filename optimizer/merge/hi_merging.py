"""Hi-Merging's merge (Fu et al., ACL 2025): TIES trim and sign vote, each model at its absolute scale.

TIES divides by the summed weights, which cancels a per-model scale; Hi-Merging scales each
pruned task vector and sums, so its scales mean what the paper's grid search means. The procedure
that chooses the scales (model-wise grid, layer contribution analysis, iterative resolution of
conflicting layers) is :func:`optimizer.analysis.contributions.hi_merging`; a study with
``method: hi_merging`` runs it first and then searches on from its result.
"""

from __future__ import annotations

from optimizer.merge._generalized import Consensus, Sparsification, generalized_method
from optimizer.merge._registry import register

HI_MERGING = register(
    generalized_method(
        name="hi_merging",
        summary="TIES trim and sign vote with absolute per-model scales (Fu et al., 2025)",
        sparsification=Sparsification.MAGNITUDE,
        consensus=Consensus.SIGN,
        options={"normalize": False, "lambda": 1.0, "rescale": False},
        default_density=0.7,
        mergekit="ties",
    )
)

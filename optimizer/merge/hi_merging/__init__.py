"""Hi-Merging (Fu et al., ACL 2025): TIES trim and sign vote, each model at its absolute scale,
with scales chosen by a model-wise grid, a layer contribution analysis and conflict resolution.

The merge: TIES divides by the summed weights, which cancels a per-model scale; Hi-Merging scales
each pruned task vector and sums, so its scales mean what the paper's grid search means.

The method's pieces, all in this folder: the layer probes (``probes.py``), their record
(``analysis.py``: α, β, conflicts, warm starts) and the unattended procedure (``procedure.py``). A
study with ``method: hi_merging`` runs the procedure once before its search and records every plan
it scored as a trial (``optimizer.search.warm_starts``), then searches on from its result.
"""

from __future__ import annotations

from optimizer.merge._generalized import Consensus, Sparsification, generalized_method
from optimizer.merge._registry import register
from optimizer.merge.hi_merging.analysis import RESOLUTIONS, ContributionAnalysis, resolve_layers
from optimizer.merge.hi_merging.probes import (
    PROBES,
    PSEUDO_LAYERS,
    Probe,
    analyze_contributions,
    layer_labels,
    model_tasks,
    probe_plan,
)
from optimizer.merge.hi_merging.procedure import AUTHORS_GRID, MODEL_WISE, Evaluation, HiMergingResult, hi_merging

__all__ = [
    "AUTHORS_GRID",
    "HI_MERGING",
    "MODEL_WISE",
    "PROBES",
    "PSEUDO_LAYERS",
    "RESOLUTIONS",
    "ContributionAnalysis",
    "Evaluation",
    "HiMergingResult",
    "Probe",
    "analyze_contributions",
    "hi_merging",
    "layer_labels",
    "model_tasks",
    "probe_plan",
    "resolve_layers",
]

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

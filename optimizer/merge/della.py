"""DELLA (Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024).

DARE drops every entry of a task vector with the same probability; DELLA's MagPrune keeps an entry
more often the larger it is within its row: probabilities run from density − ``epsilon`` (smallest)
to density + ``epsilon`` (largest), and each kept entry is divided by its own probability. Then
``della`` elects signs and merges the agreeing entries as TIES does; ``della_linear`` adds them as
task arithmetic does. ``epsilon`` is method-wide (mergekit allows it per model) and searched by
default. Defaults are mergekit's (ε 0.15, rescale on; ``della`` normalised, ``della_linear`` not);
the survivors' rescale is the paper's 1/p per entry, where mergekit matches the L1 norm, so
mergekit's rebuild agrees in distribution, not entry for entry (as for DARE).
"""

from __future__ import annotations

from optimizer.merge._generalized import Consensus, Sparsification, generalized_method
from optimizer.merge._registry import register

_SEARCHED = {"epsilon": (0.0, 0.3, False)}

DELLA = register(
    generalized_method(
        name="della",
        summary="keep entries by magnitude rank, rescale, TIES sign election (Deep et al., 2024)",
        sparsification=Sparsification.DELLA,
        consensus=Consensus.SIGN,
        options={"normalize": True, "lambda": 1.0, "rescale": True, "epsilon": 0.15},
        default_density=0.7,
        mergekit="della",
        searchable=_SEARCHED,
    )
)

DELLA_LINEAR = register(
    generalized_method(
        name="della_linear",
        summary="keep entries by magnitude rank, rescale, then task arithmetic (Deep et al., 2024)",
        sparsification=Sparsification.DELLA,
        consensus=Consensus.NONE,
        options={"normalize": False, "lambda": 1.0, "rescale": True, "epsilon": 0.15},
        default_density=0.7,
        mergekit="della_linear",
        searchable=_SEARCHED,
    )
)

"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024): Drop And REscale.

Fine-tuning deltas of LLMs are highly redundant: dropping each entry with probability 1 − density
and scaling the survivors by 1/density leaves the task vector unchanged in expectation while most
of it is gone, which reduces interference when several are added. Two variants, as in the paper
and mergekit:

- ``dare_linear``: then task arithmetic, W = θ₀ + λ Σ wₘ τ̂ₘ;
- ``dare_ties``: then TIES' sign election and disjoint merge.

Masks are drawn from the per-tensor generator that ``apply.py`` seeds from the plan's ``seed``
and the tensor name, so one plan always builds the same model. ``rescale`` is 1/density (the
paper's estimator); mergekit instead matches the L1 norm of the kept entries to the original,
which is the same factor up to O(1/√(density·n)) noise. Defaults are mergekit's (``normalize``
off for both, ``rescale`` on); density 0.5 is the setting mergekit's examples and most published
DARE merges of LLMs start from (mergekit's own default, 1.0, would drop nothing).
"""

from __future__ import annotations

from optimizer.merge._generalized import Consensus, Sparsification, generalized_method
from optimizer.merge._registry import register

_OPTIONS = {"normalize": False, "lambda": 1.0, "rescale": True}

DARE_LINEAR = register(
    generalized_method(
        name="dare_linear",
        summary="random drop + rescale, then task arithmetic (Yu et al., 2024)",
        sparsification=Sparsification.RANDOM,
        consensus=Consensus.NONE,
        options=_OPTIONS,
        default_density=0.5,
        mergekit="dare_linear",
    )
)

DARE_TIES = register(
    generalized_method(
        name="dare_ties",
        summary="random drop + rescale, then TIES sign election (Yu et al., 2024)",
        sparsification=Sparsification.RANDOM,
        consensus=Consensus.SIGN,
        options=_OPTIONS,
        default_density=0.5,
        mergekit="dare_ties",
    )
)

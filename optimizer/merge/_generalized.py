"""Generalized task arithmetic: one merge = a sparsification choice × a consensus choice.

TIES, DARE and Model Breadcrumbs are not separate algorithms so much as the same three steps with
different choices in two of them (the composition mergekit's ``GeneralizedTaskArithmeticMerge``
popularised, and the one their papers describe):

1. *sparsify* each task vector τₘ on its own (:mod:`optimizer.merge._sparsify`): none, magnitude
   top-k (TIES), random drop + rescale (DARE) or both-tails drop (Breadcrumbs);
2. scale by the model's weight λₘ and, with *sign consensus* (TIES), elect a sign per entry from the
   summed mass, γ = sign(Σ λₘ τ̂ₘ) with a zero sum electing +, and keep only agreeing entries;
3. sum, optionally divide by the summed weights (per entry under consensus: Σ λₘ·maskₘ), scale by
   the method-wide ``lambda`` and add to the base.

Each variant's module (``ties.py``, ``dare.py``, ``breadcrumbs.py``) only picks the two choices and
the defaults, so a fix here fixes all of them. The order of operations and the zero rules follow
mergekit 0.1.5 exactly, because mergekit is what exported plans run on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from optimizer.merge import _sparsify
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeMethod, number_option
from optimizer.merge.plan import ModelParams

__all__ = ["Consensus", "GeneralizedMerge", "Sparsification", "generalized_method"]


class Sparsification(str, Enum):
    """How each task vector is thinned before models are combined."""

    NONE = "none"
    MAGNITUDE = "magnitude"  # TIES trim: top-k by |τ|
    RANDOM = "random"  # DARE: Bernoulli(density) keep, optional 1/density rescale
    BREADCRUMBS = "breadcrumbs"  # drop the largest gamma and the smallest entries
    DELLA = "della"  # keep with a probability that grows with the entry's magnitude rank


class Consensus(str, Enum):
    """Whether models vote on each entry's sign before they are summed."""

    NONE = "none"
    SIGN = "sign"  # TIES elect + disjoint merge, sign elected by total mass


@dataclass(frozen=True)
class GeneralizedMerge:
    """A :data:`~optimizer.merge._registry.MergeFn` for one (sparsification, consensus) pair.

    Options read: ``normalize`` (divide by the summed weights), ``lambda`` (final scale),
    ``rescale`` (DARE: ×1/density; DELLA: ×1/p per entry; magnitude/breadcrumbs: L1-norm match, as
    mergekit), ``gamma`` (breadcrumbs' outlier fraction) and ``epsilon`` (DELLA's spread of keep
    probabilities around the density).
    """

    sparsification: Sparsification
    consensus: Consensus

    def __call__(
        self,
        name: str,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: Mapping[str, object],
        generator: torch.Generator,
    ) -> torch.Tensor:
        if not base.is_floating_point() or not deltas:
            # Integer buffers (position ids, masks) are not learned: nothing to merge.
            return base.clone()
        # Sign votes and sums in bf16 lose the small entries that sparsification keeps; work in fp32.
        work = work_dtype(base)
        rescale = bool(options.get("rescale", False))
        gamma = number_option(options, "gamma", 0.01, "breadcrumbs")
        epsilon = number_option(options, "epsilon", 0.15, "della")
        model_gens = self._model_generators(generator, len(deltas))

        thinned = [
            self._sparsify(tau.to(work), p.density, rescale, gamma, epsilon, gen)
            for tau, p, gen in zip(deltas, params, model_gens, strict=True)
        ]
        # Few, in-place ops: on small tensors a merge costs per op, not per byte (39 tensors × 3
        # models per candidate on the zoo), so every temporary saved is time saved.
        weights = torch.tensor([p.weight for p in params], dtype=work, device=base.device)
        weights = weights.reshape(-1, *([1] * base.dim()))  # (M, 1, ..., 1)
        weighted = torch.stack(thinned).mul_(weights)  # (M, *shape); the stack is ours to modify

        if self.consensus is Consensus.SIGN:
            # Elected sign e = ±1: + where the summed mass is ≥ 0. An entry agrees when its sign is
            # e, i.e. when e·(λτ̂) > 0; a trimmed entry (0) never agrees, so it neither adds nor
            # counts. All in float arithmetic: multiplying by ±1 is exact, so for finite inputs
            # Σ agreeing entries = e·Σ max(e·λτ̂, 0) bit for bit (up to the sign of a zero), and
            # on CPU the float ops run much faster than the same steps through bool masks.
            elected = weighted.sum(dim=0).sign_().add_(1).sign_().mul_(2).sub_(1)  # -1, 0, +1 → -1, +1, +1
            agreeing = weighted.mul_(elected).clamp_min_(0)
            merged = agreeing.sum(dim=0).mul_(elected)
            divisor = agreeing.sign_().mul_(weights).sum(dim=0)  # Σ λₘ over the models that agree
            divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))  # no one agrees: ÷ 1
        else:
            merged = weighted.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1  # all weights off: keep the plain sum (zero)

        if options.get("normalize", False):
            merged = merged / divisor
        scale = number_option(options, "lambda", 1.0, "merge")
        if scale != 1.0:
            merged = merged * scale
        return (base.to(work) + merged).to(base.dtype)

    def _model_generators(self, generator: torch.Generator, n: int) -> list[torch.Generator | None]:
        """One generator per model, forked from the tensor's generator.

        Forking (rather than drawing every model's mask from one stream) keeps model m's mask a
        function of (plan seed, tensor, m) alone: changing another model's density or weight,
        or skipping a draw at density 1, does not reshuffle it.
        """
        if self.sparsification not in (Sparsification.RANDOM, Sparsification.DELLA):
            return [None] * n
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device)
        gens: list[torch.Generator | None] = []
        for seed in seeds.tolist():
            g = torch.Generator(device=generator.device)
            g.manual_seed(seed)
            gens.append(g)
        return gens

    def _sparsify(
        self,
        tau: torch.Tensor,
        density: float,
        rescale: bool,
        gamma: float,
        epsilon: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        kind = self.sparsification
        if kind is Sparsification.NONE:
            return tau
        if kind is Sparsification.MAGNITUDE:
            return _sparsify.magnitude(tau, density, rescale=rescale)
        if kind is Sparsification.BREADCRUMBS:
            return _sparsify.breadcrumbs(tau, density, gamma, rescale=rescale)
        assert generator is not None  # set by _model_generators for the random kinds
        if kind is Sparsification.RANDOM:
            return _sparsify.random_drop(tau, density, generator, rescale=rescale)
        return _sparsify.magnitude_sampled(tau, density, epsilon, generator, rescale=rescale)


def generalized_method(
    *,
    name: str,
    summary: str,
    sparsification: Sparsification,
    consensus: Consensus,
    options: Mapping[str, float | int | bool],
    default_density: float = 1.0,
    mergekit: str | None = None,
    searchable: Mapping[str, tuple[float, float, bool]] | None = None,
) -> MergeMethod:
    """The registry record for one composition; density is searched whenever entries are pruned."""
    return MergeMethod(
        name=name,
        merge=GeneralizedMerge(sparsification, consensus),
        summary=summary,
        uses_density=sparsification is not Sparsification.NONE,
        default_density=default_density,
        options=dict(options),
        mergekit=mergekit,
        searchable=dict(searchable or {}),
    )

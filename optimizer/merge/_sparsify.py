"""Sparsification of one task vector: which entries of τₘ survive before models are combined.

Three choices, each from its paper, with mergekit's conventions where the papers leave a detail
open (mergekit is our parity reference, see ``tests/test_mergekit_parity.py``):

- :func:`magnitude` — keep the ``density`` fraction of entries with the largest |τ| (TIES-Merging,
  Yadav et al., NeurIPS 2023). At least one entry survives a positive density, as in mergekit.
- :func:`random_drop` — keep each entry with probability ``density`` and rescale survivors by
  1/density so the task vector is unchanged in expectation (DARE, Yu et al., ICML 2024).
- :func:`breadcrumbs` — drop the largest ``gamma`` fraction (outliers) *and* the smallest entries,
  keeping ``density`` of them in between (Model Breadcrumbs, Davari & Belilovsky, ECCV 2024).
- :func:`magnitude_sampled` — keep each entry with a probability that grows with its magnitude rank
  in its row, from density − ε to density + ε, survivors × 1/p (DELLA's MagPrune, Deep et al., 2024).

All functions take and return one tensor of any shape (1-D norms included); ``density >= 1`` returns
the input unchanged and ``density <= 0`` returns zeros, so the search may touch both bounds.
"""

from __future__ import annotations

import torch

__all__ = [
    "breadcrumbs",
    "keep_mask",
    "l1_rescale",
    "magnitude",
    "magnitude_sampled",
    "random_drop",
    "top_k_indices",
    "top_k_mask",
]


def l1_rescale(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals ``original``'s.

    Deterministic pruning has no expectation to preserve, so mergekit's ``rescale`` for magnitude
    and breadcrumbs pruning restores the total mass instead; we follow it for parity. Near-zero
    norms are left alone rather than amplified.
    """
    before = original.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _keep_count(density: float, numel: int) -> int:
    # int(), not round(): mergekit truncates, and parity needs the same count for the same density.
    return int(density * numel)


#: Below this size a plain top-k is as fast as anything; above it, :func:`top_k_indices` narrows
#: the selection to a thin band around the threshold first.
_BAND_MIN_NUMEL = 1 << 20
_SAMPLE = 1 << 16


def top_k_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of the 1-D ``values`` (any order), faster than
    ``torch.topk`` on large tensors (2–3× on 16M entries, 2 CPU cores).

    A full top-k (or sort) of a 7B model's tensors costs seconds per merge; but the k largest are
    exactly the entries above the threshold, and a random sample locates the threshold within a
    thin band. So: estimate the band [lo, hi] from a sample's quantiles, take every entry above
    ``hi`` (one comparison pass) and the rest from a top-k of the band alone. If the band misses
    the threshold (a rare, unlucky sample) it falls back to the full top-k. The chosen set equals
    ``torch.topk``'s except where entries tie exactly at the threshold, where any choice is a
    valid top-k (mergekit's included).
    """
    n = values.numel()
    if n < _BAND_MIN_NUMEL or k <= 0 or k >= n:
        return torch.topk(values, k, sorted=False).indices
    lo, hi = _band(values, k)
    above = values > hi
    need = k - int(above.sum())
    band_mask = (values > lo) & ~above
    band_idx = band_mask.nonzero().squeeze(1)
    if need < 0 or need > band_idx.numel():
        return torch.topk(values, k, sorted=False).indices
    chosen = band_idx[torch.topk(values[band_idx], need, sorted=False).indices] if need else band_idx[:0]
    return torch.cat([above.nonzero().squeeze(1), chosen])


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """A 0/1 mask (see :func:`keep_mask`) of the ``k`` largest entries of 1-D ``values``.

    The threshold is the k-th largest value, located as in :func:`top_k_indices` (a sample's
    quantiles bound it; only the thin band between them is searched), then one comparison pass
    makes the mask. None for small tensors, an unlucky sample, or exact ties at the threshold that
    would keep more than k (then index selection decides which of the tied entries stay).
    """
    n = values.numel()
    if n < _BAND_MIN_NUMEL or k <= 0 or k >= n:
        return None
    lo, hi = _band(values, k)
    above = int((values > hi).sum())
    band = values[(values > lo) & (values <= hi)]
    need = k - above
    if need <= 0 or need > band.numel():
        return None
    threshold = float(torch.kthvalue(band, band.numel() - need + 1).values)
    mask = keep_mask(values, threshold)
    return mask if int(torch.count_nonzero(mask)) == k else None  # exact count (a float sum is not, past 2²⁴)


def keep_mask(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 where ``values >= threshold``, else 0.0, in ``values``' dtype.

    A float mask, not a bool one: masking is then one multiply, and on CPU every bool kernel
    (``torch.where`` on a bool condition, bool→float casts, ``masked_fill``) runs several times
    slower than the float comparison writing into a float buffer (see benchmarks/README.md).
    For finite values the product equals ``torch.where(mask, x, 0)`` (a dropped negative entry
    becomes −0.0, which compares equal); a dropped ±Inf or NaN would become NaN, which the
    engines' finiteness check then reports as a degenerate candidate.
    """
    return torch.ge(values, threshold, out=torch.empty_like(values))


def _band(values: torch.Tensor, k: int) -> tuple[float, float]:
    """Bounds that hold the k-th largest of ``values`` with high probability (from a sample)."""
    n = values.numel()
    gen = torch.Generator(device=values.device).manual_seed(n ^ k)  # deterministic per shape
    sample = values[torch.randint(n, (_SAMPLE,), generator=gen, device=values.device)]
    q = 1.0 - k / n
    bounds = torch.quantile(sample, torch.tensor([max(0.0, q - 0.01), min(1.0, q + 0.01)], device=values.device))
    return float(bounds[0]), float(bounds[1])


#: Attribute under which a task vector carries its own |τ| sorted once (see _sorted_top_k_mask).
_SORTED_ATTR = "_mergeopt_sorted_magnitudes"


def _sorted_top_k_mask(delta: torch.Tensor, mags: torch.Tensor, k: int) -> torch.Tensor | None:
    """Top-k mask of a small task vector from its magnitudes sorted once, not once per merge.

    A search merges the same task vectors hundreds of times with only the density changing, and
    on small tensors a ``topk`` per tensor and model was most of a TIES merge (29 of 52 ms per
    candidate on the zoo). The order of |τ| never changes, so the k-th largest is one lookup in a
    descending copy kept on the tensor itself (it lives and dies with the task vector; its
    ``_version`` guards against in-place edits). Only below the band-search size, where the copy
    is cheap; None for larger tensors, for a transient tensor (a dtype cast made per merge would
    only pay the sort), and for exact ties at the threshold (then index selection picks exactly k).
    """
    n = mags.numel()
    if n >= _BAND_MIN_NUMEL or k >= n:
        return None
    cached = getattr(delta, _SORTED_ATTR, None)
    if cached is None or cached[0] != delta._version:
        cached = (delta._version, torch.sort(mags, descending=True).values)
        try:
            setattr(delta, _SORTED_ATTR, cached)
        except (AttributeError, RuntimeError):  # a tensor type without attributes: nothing to keep
            return None
    ordered = cached[1]
    threshold = ordered[k - 1]
    if bool(ordered[k] == threshold):  # ties at the threshold: "≥ threshold" would keep more than k
        return None
    return keep_mask(mags, float(threshold))


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Top-k by magnitude over the whole tensor, k = max(1, ⌊density·numel⌋)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, _keep_count(density, delta.numel()))
    flat = delta.reshape(-1)
    # Selection on |τ| in float32 at least, so bf16 ties are broken the same way on every device.
    mags = flat.abs().float()
    mask = _sorted_top_k_mask(delta, mags, k)
    if mask is None:
        mask = top_k_mask(mags, k)
    if mask is not None:  # a threshold and one multiply, no index lists
        kept = flat * mask.to(flat.dtype)
    else:
        idx = top_k_indices(mags, k)
        kept = torch.zeros_like(flat)
        kept[idx] = flat[idx]
    kept = kept.reshape(delta.shape)
    return l1_rescale(delta, kept) if rescale else kept


def random_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; survivors × 1/density when ``rescale``.

    The mask is ``u < density`` for uniform draws ``u`` from ``generator``: with the same generator
    state a higher density keeps a superset of the entries, so the objective moves smoothly as the
    search changes the density instead of redrawing every mask.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    u = torch.rand(delta.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if u.device == delta.device:  # float mask: on CPU the bool kernels are the slow part
        kept = delta * torch.lt(u, density, out=torch.empty_like(u)).to(delta.dtype)
    else:  # the draws stay on the generator's device: ship 1-byte bools, not 4-byte floats
        kept = delta * (u < density).to(delta.device).to(delta.dtype)
    return kept / density if rescale else kept


def magnitude_sampled(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    """DELLA's MagPrune: keep entry i with probability pᵢ = (d − ε) + 2ε·rᵢ, survivors × 1/pᵢ.

    rᵢ ∈ [0, 1] is the entry's magnitude rank within its row (the first dimension's rows of a
    matrix; a vector is one row), so large entries are kept more often and each kept one is scaled
    so the task vector is unchanged in expectation (the paper's rescale; mergekit's ``della``
    matches the L1 norm instead). ε is capped at min(d, 1 − d) so every pᵢ is a probability
    (mergekit refuses those densities).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    eps = min(epsilon, density, 1 - density)
    width = rows.shape[1]
    if width > 1:
        rank = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) / (width - 1)
    else:
        rank = torch.full(rows.shape, 0.5, device=rows.device)
    probs = (density - eps) + 2 * eps * rank
    u = torch.rand(rows.shape, generator=generator, device=generator.device, dtype=torch.float32)
    keep = u.to(rows.device) < probs
    kept = torch.where(keep, rows / probs.to(rows.dtype) if rescale else rows, torch.zeros_like(rows))
    return kept.reshape(delta.shape)


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False) -> torch.Tensor:
    """Drop the top ``gamma`` fraction by |τ| and enough of the smallest to keep ``density``.

    Ranks are by |τ| ascending; entries ranked [n_bot, n_bot + ⌊density·n⌋) survive, with
    n_bot = n − ⌊density·n⌋ − ⌊gamma·n⌋. When density + gamma > 1 the outlier cut shrinks (n_bot
    clamps at 0) so the requested density is still met — mergekit's ``magnitude_outliers`` rule.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    keep = _keep_count(density, n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    flat = delta.reshape(-1)
    idx = _band_indices(flat.abs().float(), keep, n - n_bot - keep) if n >= _BAND_MIN_NUMEL else None
    if idx is None:
        order = torch.argsort(flat.abs().float(), stable=True)  # ascending |τ|
        idx = order[n_bot : n_bot + keep]
    kept = torch.zeros_like(flat)
    kept[idx] = flat[idx]
    kept = kept.reshape(delta.shape)
    return l1_rescale(delta, kept) if rescale else kept


def _band_indices(values: torch.Tensor, keep: int, n_top: int) -> torch.Tensor | None:
    """The ``keep`` entries ranked just below the ``n_top`` largest, without a full sort.

    The top (keep + n_top) minus the top n_top, both by :func:`top_k_indices`; None when exact
    ties at a boundary make the difference miscount (then the caller sorts).
    """
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[top_k_indices(values, keep + n_top)] = True
    if n_top:
        mask[top_k_indices(values, n_top)] = False
    idx = mask.nonzero().squeeze(1)
    return idx if idx.numel() == keep else None

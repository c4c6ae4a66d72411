"""Sparsification of one task vector: which entries of τₘ survive before models are combined.

Three choices, each from its paper, with mergekit's conventions where the papers leave a detail
open (mergekit is our parity reference, see ``tests/test_mergekit_parity.py``):

- :func:`magnitude` — keep the ``density`` fraction of entries with the largest |τ| (TIES-Merging,
  Yadav et al., NeurIPS 2023). At least one entry survives a positive density, as in mergekit.
- :func:`random_drop` — keep each entry with probability ``density`` and rescale survivors by
  1/density so the task vector is unchanged in expectation (DARE, Yu et al., ICML 2024).
- :func:`breadcrumbs` — drop the largest ``gamma`` fraction (outliers) *and* the smallest entries,
  keeping ``density`` of them in between (Model Breadcrumbs, Davari & Belilovsky, ECCV 2024).

All functions take and return one tensor of any shape (1-D norms included); ``density >= 1`` returns
the input unchanged and ``density <= 0`` returns zeros, so the search may touch both bounds.
"""

from __future__ import annotations

import torch

__all__ = ["breadcrumbs", "l1_rescale", "magnitude", "random_drop"]


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


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Top-k by magnitude over the whole tensor, k = max(1, ⌊density·numel⌋)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, _keep_count(density, delta.numel()))
    flat = delta.reshape(-1)
    # Selection on |τ| in float32 at least, so bf16 ties are broken the same way on every device.
    idx = torch.topk(flat.abs().float(), k, sorted=False).indices
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
    mask = (u < density).to(delta.device)
    kept = torch.where(mask, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return kept / density if rescale else kept


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
    order = torch.argsort(flat.abs().float(), stable=True)  # ascending |τ|
    idx = order[n_bot : n_bot + keep]
    kept = torch.zeros_like(flat)
    kept[idx] = flat[idx]
    kept = kept.reshape(delta.shape)
    return l1_rescale(delta, kept) if rescale else kept

"""RegMean's maths: the least-squares solve of one linear layer and which Gram each tensor uses.

Pure torch; see :mod:`optimizer.merge.regmean` for the method and its derivation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optimizer.errors import ConfigError

__all__ = ["gram_key", "regmean_fallback", "regmean_solve", "shrink_gram"]

# Ridges tried, relative to the mean diagonal of Σ λ G̃, when the system is singular (a feature no
# model ever saw). Small first: a ridge biases the solution towards the plain average.
_RIDGES = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


# --------------------------------------------------------------------------- the maths


def _lambdas(n: int, lambdas: Sequence[float] | None) -> list[float]:
    if lambdas is None:
        return [1.0] * n
    values = [float(x) for x in lambdas]
    if len(values) != n:
        raise ValueError(f"got {len(values)} lambdas for {n} models; give one per model")
    if any(x < 0 for x in values) or sum(values) <= 0:
        raise ValueError(f"lambdas {values}: must be >= 0 with a positive sum (they weight the regression)")
    return values


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonals scaled by α, the diagonal kept."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_solve(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    alpha: float,
    lambdas: Sequence[float] | None = None,
) -> torch.Tensor:
    """W* with W*ᵀ = (Σₘ λₘ G̃ₘ)⁻¹ Σₘ λₘ G̃ₘ Wₘᵀ, for weights (out, in) and Grams (in, in).

    ``lambdas`` weight each model's term in the regression (all 1: the paper); scaling them all
    by the same factor changes nothing. Solved in float64 by Cholesky (Σ λ G̃ is symmetric positive
    semi-definite); if it is singular, a ridge r·(Σ λ)·I is added to the left and r·Σ λₘ Wₘᵀ to the
    right, i.e. every G̃ₘ gains r·I, so directions no model's input spans fall back to the λ-weighted
    mean of the weights rather than to zero. Returns the dtype of ``weights[0]``.
    """
    if not weights or len(weights) != len(grams):
        raise ValueError(f"regmean_solve needs one Gram per weight; got {len(weights)} weights, {len(grams)} Grams")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean option alpha={alpha}: must lie in [0, 1] (the paper's usual range is 0.1-0.95)")
    lam = _lambdas(len(weights), lambdas)
    out, inp = weights[0].shape
    for w, g in zip(weights, grams, strict=True):
        if w.shape != (out, inp) or g.shape != (inp, inp):
            raise ValueError(
                f"weight {tuple(w.shape)} / Gram {tuple(g.shape)}: expected ({out}, {inp}) / ({inp}, {inp})"
            )

    device = weights[0].device
    f64 = torch.float64
    lhs = torch.zeros(inp, inp, dtype=f64, device=device)  # Σ λ G̃
    rhs = torch.zeros(inp, out, dtype=f64, device=device)  # Σ λ G̃ Wᵀ
    mean_wt = torch.zeros(inp, out, dtype=f64, device=device)  # Σ λ Wᵀ, for the ridge
    for lm, w, g in zip(lam, weights, grams, strict=True):
        if lm == 0:
            continue
        g_tilde = shrink_gram(g.to(device=device, dtype=f64), alpha)
        wt = w.to(f64).T
        lhs.add_(g_tilde, alpha=lm)
        rhs.add_(g_tilde @ wt, alpha=lm)
        mean_wt.add_(wt, alpha=lm)
    return _solve_spd(lhs, rhs, mean_wt, sum(lam)).T.to(weights[0].dtype).contiguous()


def _solve_spd(lhs: torch.Tensor, rhs: torch.Tensor, mean_wt: torch.Tensor, total: float) -> torch.Tensor:
    """X with lhs X = rhs, ridged as :func:`regmean_solve` describes when lhs is singular."""
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    scale = float(torch.diagonal(lhs).abs().mean()) or 1.0
    eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    for ridge in _RIDGES:
        r = ridge * scale
        chol, info = torch.linalg.cholesky_ex(lhs + (r * total) * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs + r * mean_wt, chol)
    # Not reachable for PSD Grams; kept so a corrupted Gram gives a least-norm answer, not a crash.
    return torch.linalg.pinv(lhs, hermitian=True) @ rhs


def regmean_fallback(weights: Sequence[torch.Tensor], lambdas: Sequence[float] | None = None) -> torch.Tensor:
    """Σ λₘ Wₘ / Σ λₘ for tensors RegMean cannot regress (embeddings, norms, biases).

    The same λ semantics as :func:`regmean_solve`: with every Gram the identity it gives this.
    """
    if not weights:
        raise ValueError("regmean_fallback needs at least one weight")
    lam = _lambdas(len(weights), lambdas)
    work = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    merged = torch.zeros_like(weights[0], dtype=work)
    for lm, w in zip(lam, weights, strict=True):
        merged.add_(w.to(work), alpha=lm / sum(lam))
    return merged.to(weights[0].dtype)


# --------------------------------------------------------------------------- which Gram a tensor uses

_SHARED = {
    "q_proj": "qkv_input",
    "k_proj": "qkv_input",
    "v_proj": "qkv_input",
    "gate_proj": "gate_up_input",
    "up_proj": "gate_up_input",
    "qkv_proj": "qkv_input",  # Phi-3 stores q/k/v and gate/up fused: one Gram, the same input
    "gate_up_proj": "gate_up_input",
}
_OWN = ("o_proj", "down_proj", "lm_head")


def gram_key(name: str) -> str | None:
    """The Gram key of a checkpoint tensor, or None where RegMean averages instead.

    q/k/v read the same normed hidden state, and gate/up another: one Gram each, keyed by the
    parent module (``model.layers.3.self_attn.qkv_input``, ``model.layers.3.mlp.gate_up_input``).
    o_proj, down_proj and lm_head (whose input is the final norm's output) have their own, keyed by
    the module (``model.layers.3.mlp.down_proj``, ``lm_head``). Biases, norms, embeddings, routers and
    mixture-of-experts experts: None.
    """
    if not name.endswith(".weight") or ".experts." in name:
        # An expert sees only the tokens routed to it, and transformers runs experts as slices of
        # fused tensors that no hook can see apart: experts are averaged, like norms.
        return None
    module = name.removesuffix(".weight")
    role = module.rsplit(".", 1)[-1]  # the module's own name, whatever the family
    if role in _SHARED:
        return f"{module.rsplit('.', 1)[0]}.{_SHARED[role]}"
    if role in _OWN:
        return module
    return None

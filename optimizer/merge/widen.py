"""WIDEN (Yu et al., 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained LLMs via Weight
Disentanglement").

Task arithmetic adds every task vector at full strength; that works while the deltas are small and
fails when one model was continually *pre-trained* and moved far from the base. WIDEN weighs each
model per input column instead: a column that a model changed a lot, relative to the other columns
of the same model, is where that model's knowledge lives, so it gets that model's delta.

Per 2-D weight W (out, in), column j, model m (``docs/methods.md`` and the paper's Sec. 3):

1. disentangle: magnitude ‖W[:, j]‖ and direction W[:, j] / ‖W[:, j]‖; compare with the base:
   ΔMₘ,ⱼ = |‖θₘ[:, j]‖ − ‖θ₀[:, j]‖|,  ΔDₘ,ⱼ = 1 − cos(θₘ[:, j], θ₀[:, j]);
2. rank each within its model across columns, normalised to [0, 1): rank / number of columns;
3. softmax the ranks across models per column (÷ ``temperature``; the paper's is 1) → Sᴹ, Sᴰ;
4. calibrate: where a model's rank exceeds ``t`` × its mean rank over the columns, its score
   becomes ``s`` (so a model's most-changed columns are kept at a fixed strength, not shared);
5. column weight wₘ,ⱼ = ½ (Sᴹ + Sᴰ); W = θ₀ + Σₘ λₘ wₘ,ⱼ τₘ[:, j].

1-D tensors (norms, biases) cannot be disentangled: as in the paper and the authors' code, the
significance is |τ| itself (no ranking), softmaxed across models per entry and calibrated the same
way. Other ranks (0-D, >2-D; none in Llama/Qwen2) are treated entry-wise like 1-D tensors.

Choices beyond the paper, each for a reason:

* λₘ (``params[m].weight``, default 1 = the paper) multiplies model m's weighted delta *after* the
  scores are computed, so the search can scale a model without changing which columns it owns.
* Ties get the mean of the ranks they span (fractional ranking). The paper breaks ties by column
  index, which makes an untouched column's weight depend on where it sits; on real, continuous
  deltas the two agree.
* ΔM and ΔD are computed from τ rather than as differences of norms and cosines: a fine-tune turns
  a column by ~1e-3 rad, so 1 − cos is ~1e-6, which fp32 cancellation would drown.
* ``calibrate: false`` switches step 4 off (then the weights of each column sum to 1), so the
  search can compare both; ``temperature`` lets it sharpen (→ 0: winner takes the column) or flatten
  (→ ∞: plain average) the softmax.
* The column axis is the input axis of every 2-D weight but the token embedding, which the
  authors' code (``merging_methods.py`` in their MergeLLM repository) transposes so that its
  columns are tokens: a model that moved some tokens' rows a lot (a continually pre-trained
  language's tokens, WIDEN's own use case) keeps them, instead of each hidden dimension being
  shared. ``per_token_embeddings: false`` weighs the embedding per hidden dimension instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.errors import ConfigError
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeMethod, number_option, register
from optimizer.merge.plan import ModelParams

__all__ = ["WIDEN", "column_differences", "fractional_rank", "importance_scores", "merge_widen", "widen_weights"]


def column_differences(base: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔM, ΔD) per input column of θ = base + delta against base, both shaped (in,).

    Written in terms of τ so that nothing small is obtained by subtracting two large numbers:
    ‖b‖ − ‖a‖ = (2 a·τ + ‖τ‖²) / (‖a‖ + ‖b‖), and 1 − cos = ½ ‖b/‖b‖ − a/‖a‖‖² with the difference
    of unit vectors expanded as τ/‖b‖ − a (‖b‖ − ‖a‖) / (‖a‖ ‖b‖).
    """
    a, tau = base, delta
    norm_a = a.norm(dim=0)  # (in,)
    norm_b = (a + tau).norm(dim=0)
    grow = (2 * (a * tau).sum(dim=0) + (tau * tau).sum(dim=0)) / (norm_a + norm_b).clamp_min(1e-30)
    magnitude = grow.abs()

    both = (norm_a > 0) & (norm_b > 0)
    safe_a, safe_b = torch.where(both, norm_a, 1.0), torch.where(both, norm_b, 1.0)
    unit_diff = tau / safe_b - a * (grow / (safe_a * safe_b))  # (out, in)
    direction = 0.5 * (unit_diff * unit_diff).sum(dim=0)
    # A zero column has no direction: losing or gaining one counts as orthogonal (1 − cos 0),
    # staying zero as unchanged.
    one_zero = (norm_a > 0) ^ (norm_b > 0)
    direction = torch.where(both, direction, one_zero.to(direction.dtype))
    return magnitude, direction


def fractional_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, ascending, divided by the row length: (M, k) → [0, 1).

    Equal values share the mean of the ranks they span, so the result does not depend on order.
    """
    k = values.shape[-1]
    out = torch.empty_like(values)
    for row, target in zip(values, out, strict=True):
        order = torch.argsort(row, stable=True)
        _, inverse, counts = torch.unique_consecutive(row[order], return_inverse=True, return_counts=True)
        # The group starting at position p with c members holds ranks p … p + c − 1: mean p + (c − 1)/2.
        starts = torch.cumsum(counts, 0) - counts
        mean_rank = starts.to(values.dtype) + (counts.to(values.dtype) - 1) / 2
        target[order] = mean_rank[inverse]
    return out / k


def importance_scores(
    significance: torch.Tensor, *, t: float, s: float, temperature: float, calibrate: bool
) -> torch.Tensor:
    """Scores (M, k) from significance (M, k): softmax across models, then the paper's calibration.

    The calibration threshold is per model (its mean significance over the k columns or entries),
    as in the authors' code: it picks each model's own most-changed columns, whatever the others did.
    """
    scores = torch.softmax(significance / temperature, dim=0)
    if calibrate:
        above = significance > t * significance.mean(dim=1, keepdim=True)
        scores = torch.where(above, torch.full_like(scores, s), scores)
    return scores


def _options(options: Mapping[str, object]) -> tuple[float, float, float, bool]:
    t = number_option(options, "t", 1.0, "widen")
    s = number_option(options, "s", 1.0, "widen")
    temperature = number_option(options, "temperature", 1.0, "widen")
    calibrate = bool(options.get("calibrate", True))
    if not temperature > 0:
        raise ConfigError(f"widen option temperature={temperature}: must be > 0 (1 is the paper's softmax)")
    return t, s, temperature, calibrate


def widen_weights(base: torch.Tensor, deltas: Sequence[torch.Tensor], options: Mapping[str, object]) -> torch.Tensor:
    """Per-model weights before λ: (M, in) for a 2-D tensor, (M, *shape) for any other.

    ``base`` and ``deltas`` should already be in the working dtype (fp32 or fp64).
    """
    t, s, temperature, calibrate = _options(options)
    if base.dim() == 2:
        diffs = [column_differences(base, tau) for tau in deltas]
        ranks_m = fractional_rank(torch.stack([m for m, _ in diffs]))  # (M, in)
        ranks_d = fractional_rank(torch.stack([d for _, d in diffs]))
        score_m = importance_scores(ranks_m, t=t, s=s, temperature=temperature, calibrate=calibrate)
        score_d = importance_scores(ranks_d, t=t, s=s, temperature=temperature, calibrate=calibrate)
        return 0.5 * (score_m + score_d)
    significance = torch.stack([tau.reshape(-1).abs() for tau in deltas])  # (M, numel)
    scores = importance_scores(significance, t=t, s=s, temperature=temperature, calibrate=calibrate)
    return scores.reshape(len(deltas), *base.shape)


def merge_widen(
    name: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    """The WIDEN merge of one tensor (a :data:`~optimizer.merge._registry.MergeFn`)."""
    if not base.is_floating_point() or not deltas:
        # Integer buffers (position ids, masks) are not learned: nothing to merge.
        return base.clone()
    # Ranks of ~1e-6 quantities and softmaxes are not for bf16; work in fp32 (fp64 stays fp64).
    work = work_dtype(base)
    b = base.to(work)
    taus = [tau.to(work) for tau in deltas]
    # The token embedding (vocab, hidden) is weighed per token: its transpose's columns are tokens.
    per_token = base.dim() == 2 and name.endswith("embed_tokens.weight") and bool(options["per_token_embeddings"])
    if per_token:
        b, taus = b.T, [tau.T for tau in taus]
    weights = widen_weights(b, taus, options)  # (M, in) or (M, *shape)
    merged = b.clone()
    for w, tau, p in zip(weights, taus, params, strict=True):
        # A 2-D weight's (in,) column weights broadcast over the rows.
        merged.add_(tau * w, alpha=p.weight)
    return (merged.T if per_token else merged).to(base.dtype)


WIDEN = register(
    MergeMethod(
        name="widen",
        merge=merge_widen,
        summary="per-column weights from magnitude/direction change ranks (Yu et al., 2024)",
        options={"t": 1.0, "s": 1.0, "temperature": 1.0, "calibrate": True, "per_token_embeddings": True},
        mergekit=None,
        # The paper's calibration knobs; t ≥ 2 switches calibration off for 2-D weights.
        searchable={"t": (0.5, 2.5, False), "s": (0.5, 2.0, False)},
    )
)

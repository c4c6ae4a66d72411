"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

A linear layer y = x Wᵀ (torch's ``nn.Linear`` layout, W is (out, in)) is merged by least squares:
the merged W should reproduce every model's outputs on that model's own inputs,

    W* = argmin Σₘ λₘ ‖Xₘ Wᵀ − Xₘ Wₘᵀ‖²   ⇒   W*ᵀ = (Σₘ λₘ Gₘ)⁻¹ Σₘ λₘ Gₘ Wₘᵀ,   Gₘ = XₘᵀXₘ,

so only the Gram matrices of the layer inputs are needed, never the data. Each Gram is shrunk
towards its diagonal, G̃ = α G + (1 − α) diag(G): α = 1 is the exact least-squares solution, α = 0
a per-input-feature average weighted by each model's input energy (Σₘ λₘ Gₘ[j, j]).

This module owns the maths and the Grams' plumbing:

* :func:`regmean_solve` / :func:`regmean_fallback`: the merged weight of one tensor (pure torch);
* :func:`gram_key`: which Gram a checkpoint tensor uses (q/k/v share one, gate/up another);
* :func:`collect_grams` / :class:`GramCollector`: Grams of one model via forward hooks;
* :class:`RegMeanMerge`: the merge bound to a study's Grams. A :data:`MergeFn` does not receive
  the tensor's name, so RegMean is bound per tensor with :meth:`RegMeanMerge.for_tensor`; the
  registered ``regmean`` record has no Grams and says so when called.

The search's λₘ (``params[m].weight``) scales task vectors, as METHODS.md's delta form
W = W₀ + (Σ G̃ₘ)⁻¹ Σ G̃ₘ λₘ τₘ: λ = 1 for all is the paper's RegMean, λ = 0 puts the base in that
model's place. Tensors without a Gram (embeddings, norms, biases) are averaged, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from optimizer.errors import ConfigError, ModelError
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import MergeFn, MergeMethod, register
from optimizer.merge.plan import ModelParams
from optimizer.models import describe

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "REGMEAN",
    "GramCollector",
    "RegMeanMerge",
    "collect_grams",
    "gram_key",
    "regmean_fallback",
    "regmean_method",
    "regmean_solve",
    "shrink_gram",
]

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
}
_OWN = ("o_proj", "down_proj", "lm_head")


def gram_key(name: str) -> str | None:
    """The Gram key of a checkpoint tensor, or None where RegMean averages instead.

    q/k/v read the same normed hidden state, and gate/up another: one Gram each, keyed by the
    parent module (``model.layers.3.self_attn.qkv_input``, ``model.layers.3.mlp.gate_up_input``).
    o_proj, down_proj and lm_head (whose input is the final norm's output) have their own, keyed by
    the module (``model.layers.3.mlp.down_proj``, ``lm_head``). Biases, norms and embeddings: None.
    """
    if not name.endswith(".weight"):
        return None
    role = describe(name).role
    module = name.removesuffix(".weight")
    if role in _SHARED:
        return f"{module.rsplit('.', 1)[0]}.{_SHARED[role]}"
    if role in _OWN:
        return module
    return None


# --------------------------------------------------------------------------- collecting Grams


@dataclass
class GramCollector:
    """Forward hooks that sum xᵀx (float64) and count tokens at the input of each RegMean linear.

    Use as a context manager around forward passes: hooks are attached on enter and removed on
    exit, also when a forward raises. Padding is left out when :meth:`set_mask` is given the batch's
    attention mask. ``keys`` limits collection to some Grams (e.g. a few layers per pass, when all
    float64 sums would not fit on the device at once).
    """

    model: nn.Module
    keys: Container[str] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list, repr=False)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def modules(self) -> dict[str, nn.Module]:
        """Gram key → the one linear module whose input defines it (q_proj for q/k/v, and so on)."""
        from torch import nn

        chosen: dict[str, nn.Module] = {}
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            try:
                key = gram_key(f"{name}.weight")
            except ModelError:
                continue  # a linear outside the decoder stack mergeopt knows (e.g. a vision tower)
            if key is not None and key not in chosen and (self.keys is None or key in self.keys):
                chosen[key] = module
        return chosen

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Tokens where ``attention_mask`` is 0 (padding) are skipped until the next call."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def _hook(self, key: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in)
            if self._mask is not None and self._mask.numel() == x.shape[0]:
                x = x[self._mask.to(x.device)]
            x = x.to(torch.float64)
            if key not in self.sums:
                self.sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.counts[key] = 0
            self.sums[key].addmm_(x.T, x)
            self.counts[key] += x.shape[0]

        return hook

    def __enter__(self) -> GramCollector:
        for key, module in self.modules().items():
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None

    def grams(self, *, mean: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The collected Grams on the CPU: XᵀX / n (METHODS.md) when ``mean``, else the sums XᵀX."""
        out = {}
        for key, total in self.sums.items():
            g = total / max(self.counts[key], 1) if mean else total
            out[key] = g.to(device="cpu", dtype=dtype)
        return out


def collect_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    keys: Container[str] | None = None,
    mean: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Gram key → Gram of the inputs ``model`` feeds that Gram's linears over ``batches``.

    Each batch is passed as ``model(**batch)`` (tensors moved to the model's device) in eval mode
    without gradients; the mode is restored afterwards. Padding tokens (``attention_mask`` 0) are
    left out. ``mean`` divides by the token count, so models seen on different amounts of data
    weigh the same in :func:`regmean_solve`.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with GramCollector(model, keys) as collector, torch.no_grad():
            for batch in batches:
                moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                collector.set_mask(moved.get("attention_mask"))
                model(**moved)
    finally:
        model.train(was_training)
    return collector.grams(mean=mean, dtype=dtype)


# --------------------------------------------------------------------------- the merge method


@dataclass(frozen=True)
class RegMeanMerge:
    """RegMean bound to a study's Grams: Gram key → one Gram per model, in the plan's model order.

    Call :meth:`for_tensor` with a checkpoint tensor name to get that tensor's MergeFn. Option read:
    ``alpha`` (off-diagonal shrinkage).
    """

    grams: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_models(cls, per_model: Sequence[Mapping[str, torch.Tensor]]) -> RegMeanMerge:
        """From one :func:`collect_grams` result per model (in the plan's model order)."""
        keys = set(per_model[0]) if per_model else set()
        for i, grams in enumerate(per_model):
            if set(grams) != keys:
                missing = sorted(keys ^ set(grams))[0]
                raise ConfigError(
                    f"model #{i}'s Grams differ from model #0's at {missing!r}; collect every model's Grams"
                    " with the same collect_grams call"
                )
        return cls({key: [g[key] for g in per_model] for key in sorted(keys)})

    def for_tensor(self, name: str) -> MergeFn:
        """The MergeFn of tensor ``name``: a Gram solve for linear weights, the mean otherwise."""
        key = gram_key(name)
        if key is None:
            return _merge_mean
        if key not in self.grams:
            raise ConfigError(
                f"regmean has no Gram {key!r} for tensor {name!r}; collect each model's Grams with"
                " optimizer.merge.regmean.collect_grams and pass them to regmean_method()"
            )
        grams = self.grams[key]

        def merge(
            base: torch.Tensor,
            deltas: Sequence[torch.Tensor],
            params: Sequence[ModelParams],
            options: Mapping[str, object],
            generator: torch.Generator,
        ) -> torch.Tensor:
            if len(grams) != len(deltas):
                raise ConfigError(
                    f"regmean: tensor {name!r} has {len(deltas)} models but Gram {key!r} has {len(grams)};"
                    " collect one Gram set per model in the plan"
                )
            alpha = float(options.get("alpha", 0.9))  # type: ignore[arg-type]
            # Delta form: the solve is affine, so (Σ G̃)⁻¹ Σ G̃ (W₀ + λτ)ᵀ = W₀ᵀ + (Σ G̃)⁻¹ Σ G̃ λ τᵀ, and
            # solving for the small deltas keeps the base out of the float64 round trip.
            work = work_dtype(base)
            scaled = [tau.to(work) * p.weight for tau, p in zip(deltas, params, strict=True)]
            return (base.to(work) + regmean_solve(scaled, grams, alpha)).to(base.dtype)

        return merge

    def __call__(
        self,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: Mapping[str, object],
        generator: torch.Generator,
    ) -> torch.Tensor:
        raise ConfigError(
            "regmean needs the tensor's name to find its Gram: merge through RegMeanMerge.for_tensor(name),"
            " with Grams from collect_grams (see optimizer.merge.regmean.regmean_method)"
        )


def _merge_mean(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: Mapping[str, object],
    generator: torch.Generator,
) -> torch.Tensor:
    """The paper's average for non-linear tensors: mean over models of W₀ + λₘ τₘ."""
    if not base.is_floating_point() or not deltas:
        return base.clone()
    work = work_dtype(base)
    mean_delta = regmean_fallback([tau.to(work) * p.weight for tau, p in zip(deltas, params, strict=True)])
    return (base.to(work) + mean_delta).to(base.dtype)


def regmean_method(grams: RegMeanMerge | Sequence[Mapping[str, torch.Tensor]]) -> MergeMethod:
    """The ``regmean`` record bound to Grams: one :func:`collect_grams` result per model, in order."""
    merge = grams if isinstance(grams, RegMeanMerge) else RegMeanMerge.from_models(grams)
    return replace(REGMEAN, merge=merge, bind=None)


REGMEAN = register(
    MergeMethod(
        name="regmean",
        merge=RegMeanMerge(),
        summary="least-squares merge of linear layers from input Grams (Jin et al., 2023)",
        options={"alpha": 0.9},
        mergekit=None,
        needs="grams",
        bind=lambda data, _base: regmean_method(list(data.values())),
        searchable={"alpha": (0.1, 0.95, False)},
    )
)

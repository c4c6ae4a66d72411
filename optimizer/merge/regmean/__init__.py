"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

A linear layer y = x Wᵀ (torch's ``nn.Linear`` layout, W is (out, in)) is merged by least squares:
the merged W should reproduce every model's outputs on that model's own inputs,

    W* = argmin Σₘ λₘ ‖Xₘ Wᵀ − Xₘ Wₘᵀ‖²   ⇒   W*ᵀ = (Σₘ λₘ Gₘ)⁻¹ Σₘ λₘ Gₘ Wₘᵀ,   Gₘ = XₘᵀXₘ,

so only the Gram matrices of the layer inputs are needed, never the data. Each Gram is shrunk
towards its diagonal, G̃ = α G + (1 − α) diag(G): α = 1 is the exact least-squares solution, α = 0
a per-input-feature average weighted by each model's input energy (Σₘ λₘ Gₘ[j, j]).

The method's pieces, all in this folder:

* ``_solve.py``: :func:`regmean_solve` / :func:`regmean_fallback`, the merged weight of one tensor,
  and :func:`gram_key`, which Gram a checkpoint tensor uses (q/k/v share one, gate/up another);
* ``_grams.py``: :func:`collect_grams` / :class:`GramCollector`, one model's Grams via forward hooks;
* here: :class:`GramsData`, the Grams measured once per study (each specialist on its own tasks'
  text) and cached beside it, and :class:`RegMeanMerge`, the merge over them.

The search's λₘ (``params[m].weight``) scales task vectors, in the delta form
W = W₀ + (Σ G̃ₘ)⁻¹ Σ G̃ₘ λₘ τₘ (``docs/methods.md``): λ = 1 for all is the paper's RegMean, λ = 0 puts the
base in that model's place. Tensors without a Gram (embeddings, norms, biases) are averaged, as
in the paper.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from optimizer.errors import ConfigError
from optimizer.merge._precision import work_dtype
from optimizer.merge._registry import Measured, MergeFn, MergeMethod, StudyData, StudyInputs, number_option, register
from optimizer.merge.plan import ModelParams
from optimizer.merge.regmean._grams import GramCollector, collect_grams, model_grams
from optimizer.merge.regmean._solve import gram_key, regmean_fallback, regmean_solve, shrink_gram

__all__ = [
    "REGMEAN",
    "GramCollector",
    "GramsData",
    "RegMeanMerge",
    "collect_grams",
    "gram_key",
    "regmean_fallback",
    "regmean_method",
    "regmean_solve",
    "shrink_gram",
]

#: Off-diagonal shrinkage: the authors' released experiment configs use 0.1 in 9 of 10 RegMean runs
#: (``regmean_reduce_nondiag``; one DeBERTa NER run uses 0.9).
DEFAULT_ALPHA = 0.1


@dataclass(frozen=True)
class RegMeanMerge:
    """RegMean over a study's Grams: Gram key → one Gram per model, in the plan's model order.

    A :data:`~optimizer.merge._registry.MergeFn`: linear weights get the Gram solve, every other
    tensor the mean. Option read: ``alpha`` (off-diagonal shrinkage).
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

    def __call__(
        self,
        name: str,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: Mapping[str, object],
        generator: torch.Generator,
    ) -> torch.Tensor:
        key = gram_key(name)
        if key is None:
            return _merge_mean(base, deltas, params)
        if key not in self.grams:
            raise ConfigError(
                f"regmean has no Gram {key!r} for tensor {name!r}; collect each model's Grams with"
                " optimizer.merge.regmean.collect_grams and pass them to regmean_method()"
            )
        grams = self.grams[key]
        if len(grams) != len(deltas):
            raise ConfigError(
                f"regmean: tensor {name!r} has {len(deltas)} models but Gram {key!r} has {len(grams)};"
                " collect one Gram set per model in the plan"
            )
        alpha = number_option(options, "alpha", DEFAULT_ALPHA, "regmean")
        # Delta form: the solve is affine, so (Σ G̃)⁻¹ Σ G̃ (W₀ + λτ)ᵀ = W₀ᵀ + (Σ G̃)⁻¹ Σ G̃ λ τᵀ, and
        # solving for the small deltas keeps the base out of the float64 round trip.
        work = work_dtype(base)
        scaled = [tau.to(work) * p.weight for tau, p in zip(deltas, params, strict=True)]
        return (base.to(work) + regmean_solve(scaled, grams, alpha)).to(base.dtype)


def _merge_mean(base: torch.Tensor, deltas: Sequence[torch.Tensor], params: Sequence[ModelParams]) -> torch.Tensor:
    """The paper's average for non-linear tensors: mean over models of W₀ + λₘ τₘ."""
    if not base.is_floating_point() or not deltas:
        return base.clone()
    work = work_dtype(base)
    mean_delta = regmean_fallback([tau.to(work) * p.weight for tau, p in zip(deltas, params, strict=True)])
    return (base.to(work) + mean_delta).to(base.dtype)


class GramsData(StudyData):
    """Each specialist's input Grams, on its calibration text (:meth:`StudyInputs.calibration`).

    As the authors measure them: on each model's own training-like data (their configs read up to
    1000 batches), not on the examples the search then scores, which would fit the merge to its test.
    """

    kind = "grams"
    version = 2  # 1: measured on up to 256 search examples

    def _texts(self, inputs: StudyInputs) -> dict[str, list[str]]:
        return {m: inputs.calibration(m) for m in inputs.models.names}

    def key(self, inputs: StudyInputs) -> object:
        # A digest: thousands of texts would otherwise land in the cache file's metadata.
        texts = json.dumps(self._texts(inputs), sort_keys=True).encode()
        return hashlib.sha256(texts).hexdigest()

    def measure(self, inputs: StudyInputs) -> Measured:
        texts = self._texts(inputs)
        out: Measured = {}
        for model, path in inputs.models.specialists.items():
            inputs.say(f"measuring RegMean Grams of {model} on {len(texts[model])} calibration examples")
            out[model] = model_grams(path, texts[model], inputs.models.base)
        return out

    def bind(self, data: Mapping[str, Mapping[str, torch.Tensor]], base: Path) -> MergeFn:
        return RegMeanMerge.from_models(list(data.values()))


def regmean_method(grams: RegMeanMerge | Sequence[Mapping[str, torch.Tensor]]) -> MergeMethod:
    """The ``regmean`` record bound to Grams: one :func:`collect_grams` result per model, in order."""
    merge = grams if isinstance(grams, RegMeanMerge) else RegMeanMerge.from_models(grams)
    return replace(REGMEAN, merge=merge)


REGMEAN = register(
    MergeMethod(
        name="regmean",
        merge=None,
        summary="least-squares merge of linear layers from input Grams (Jin et al., 2023)",
        options={"alpha": DEFAULT_ALPHA},
        mergekit=None,
        study_data=GramsData(),
        searchable={"alpha": (0.1, 0.95, False)},
    )
)

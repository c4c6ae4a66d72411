"""HILA's measurement: the importance of each unit of each specialist's task vector.

Importance of unit u for specialist m is how much m's golden loss rises when u's part of τₘ is
removed (units: :mod:`optimizer.merge.hila._units`),

    Iₘ,ᵤ = L(θ₀ + τₘ − τₘ,ᵤ) − L(θ₀ + τₘ),   L = mean token NLL of m's golden responses,

measured exactly (:func:`importance_exact`: one forward pass over the golden data per unit and
model; what a study measures) or to first order (:func:`importance_first_order`:
Iₘ,ᵤ ≈ −∇L(θ₀ + τₘ) · τₘ,ᵤ, one backward pass per model, for models where the exact measure is
too slow). The golden data is each specialist's own greedy answers, which the study generates
(:mod:`objectives.golden`) and hands over through :class:`~optimizer.merge._registry.StudyInputs`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from optimizer.checkpoints import ModelSet, load_state_dict, load_task_vector, model_config, torch_dtype
from optimizer.errors import ConfigError, DataError
from optimizer.low_rank import dense
from optimizer.merge.hila._prefix import DEFAULT_BUDGET, PrefixCache
from optimizer.merge.hila._units import Unit, check_fits, unit_slices
from optimizer.tokens import encode_pair

__all__ = ["Importance", "importance_exact", "importance_first_order"]

#: Model name → unit name → Iₘ,ᵤ (nats per golden token; positive: the unit's delta helps).
Importance = dict[str, dict[str, float]]


@dataclass(frozen=True)
class _Batch:
    ids: torch.Tensor  # (B, T), right padded
    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the token each position predicts, −100 outside responses
    scored: torch.Tensor  # positions where some row predicts a response token (the logits needed)


def _batches(
    tokenizer: object, rows: Sequence[Mapping[str, object]], batch_size: int, prompt_field: str, target_field: str
) -> tuple[list[_Batch], int]:
    """Teacher-forcing batches of golden rows and their response token count.

    Tokenized with :func:`encode_pair`, as the engines score ``nll``, so importance is measured on
    the very tokens the study's golden objective scores.
    """
    pairs = []
    for i, row in enumerate(rows):
        if prompt_field not in row or target_field not in row:
            raise DataError(
                f"golden row {i} lacks {prompt_field!r} or {target_field!r} (it has: {', '.join(map(str, row))})"
            )
        ctx, cont = encode_pair(tokenizer, str(row[prompt_field]), str(row[target_field]))
        if not ctx:
            raise DataError(f"golden row {i} has an empty prompt and the tokenizer adds no BOS: nothing predicts it")
        if cont:  # an empty golden answer has no token to score
            pairs.append((ctx, cont))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    batches, total = [], 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(c) + len(r) for c, r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (ctx, cont) in enumerate(chunk):
            seq = ctx + cont
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            # Position t predicts token t + 1: the response's tokens are predicted from len(ctx) − 1 on.
            labels[i, len(ctx) - 1 : len(seq) - 1] = torch.tensor(cont)
            total += len(cont)
        batches.append(_Batch(ids, mask, labels, labels.ne(-100).any(0).nonzero().flatten()))
    return batches, total


class _Probe:
    """The base network in this process, loaded with θ₀ + τₘ, scoring golden data by teacher forcing."""

    def __init__(self, models: ModelSet, *, device: str, dtype: torch.dtype, prefix_bytes: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load is noise in a study log
        self.models = models
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(models.base))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=dtype)
        # transformers wraps .to() in a decorator whose annotations mypy reads as unbound
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.params = dict(self.model.named_parameters())  # tied weights once, as the engines merge them
        base = load_state_dict(models.base)
        self.base = {k: v.to(self.device) for k, v in base.items() if k in self.params}
        self.tau: dict[str, torch.Tensor] = {}
        self.prefix = PrefixCache(self.model, budget=prefix_bytes)
        # Logits only where a golden token is predicted: the head over every prompt position is
        # most of its cost on chat prompts, and the loss reads none of them.
        self.logits_at_targets = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def units(self, units: Sequence[Unit] | None) -> list[Unit]:
        chosen = list(units) if units is not None else unit_slices(model_config(self.models.base), self.base)
        for u in chosen:
            check_fits(u, self.base)
        return chosen

    @torch.no_grad()
    def load(self, model: str, at: float = 1.0) -> None:
        """Weights ← θ₀ + at·τₘ; τₘ (float32) is kept for removals and gradient products."""
        # One specialist's τ at a time, dense (an adapter's factors expanded for this measurement only).
        self.prefix.clear()  # recorded for other weights
        self.tau = {k: dense(v) for k, v in load_task_vector(self.base, self.models.specialists[model], model).items()}
        for name, b in self.base.items():
            self.params[name].copy_(b + at * self.tau[name])

    @contextmanager
    def removed(self, unit: Unit) -> Iterator[None]:
        """Unit u's slices at θ₀ (its delta removed) inside the block, θ₀ + τₘ again after it."""
        present = [s for s in unit.slices if s.tensor in self.base]
        with torch.no_grad():
            for s in present:
                self.params[s.tensor][s.index()] = self.base[s.tensor][s.index()]
        try:
            yield
        finally:
            with torch.no_grad():
                for s in present:
                    self.params[s.tensor][s.index()] = self.base[s.tensor][s.index()] + self.tau[s.tensor][s.index()]

    def _nll_sum(self, batch: _Batch) -> torch.Tensor:
        labels = batch.labels.to(self.device)
        kwargs: dict[str, object] = {}
        if self.logits_at_targets:
            keep = batch.scored.to(self.device)
            kwargs["logits_to_keep"], labels = keep, labels[:, keep]
        ids, mask = batch.ids.to(self.device), batch.mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )

    @torch.no_grad()
    def loss(self, batches: Sequence[_Batch], total: int, *, removed: Unit | None = None) -> float:
        """Mean NLL per golden token (the ``nll`` metric's value), summed in float64.

        ``removed``: the unit whose delta the caller has removed; the passes skip the layers below
        it that :meth:`record_specialist` recorded (:mod:`~optimizer.merge.hila._prefix`).
        """
        return self._loss(batches, total, self.prefix.start(removed) if removed is not None else None)

    def _loss(self, batches: Sequence[_Batch], total: int, upto: int | None) -> float:
        nll = 0.0
        with self.prefix.skipping(upto):
            for i, b in enumerate(batches):
                self.prefix.batch = i
                nll += float(self._nll_sum(b).double())
        return nll / total

    @torch.no_grad()
    def record_specialist(self, batches: Sequence[_Batch], total: int) -> float:
        """The loaded specialist's loss; its decoder-layer outputs are recorded for the unit passes.

        The records are kept only where a pass that skips to the deepest recorded layer repeats
        that loss bit for bit: a model whose layers hand each other more than their outputs fails
        that check (or raises in it) and is then measured computing every layer.
        """
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        size = torch.finfo(self.model.dtype).bits // 8
        layer_bytes = sum(b.ids.numel() for b in batches) * hidden * size
        with self.prefix.record(len(batches), self.prefix.plan(layer_bytes) if hidden else []):
            full = self._loss(batches, total, None)
        deepest = self.prefix.deepest()
        if deepest is not None:
            try:
                again = self._loss(batches, total, deepest)
            except Exception:  # any failure of a skipping pass only means: compute every layer
                again = None
            if again != full:
                self.prefix.clear()
        return full

    def gradient_products(self, batches: Sequence[_Batch], total: int, units: Sequence[Unit]) -> dict[str, float]:
        """−∇L · τₘ,ᵤ for each unit, from one backward pass at the loaded weights."""
        self.model.zero_grad(set_to_none=True)
        wanted = {s.tensor for u in units for s in u.slices if s.tensor in self.base}
        for name, p in self.params.items():
            p.requires_grad_(name in wanted)
        try:
            for b in batches:  # gradients of the token mean accumulate over batches
                (self._nll_sum(b) / total).backward()
            out = {}
            for u in units:
                dot = 0.0
                for s in u.slices:
                    if s.tensor in self.base:
                        g = self.params[s.tensor].grad
                        if g is not None:
                            dot += float((g[s.index()].double() * self.tau[s.tensor][s.index()].double()).sum())
                out[u.name] = -dot
            return out
        finally:
            self.model.zero_grad(set_to_none=True)
            for p in self.params.values():
                p.requires_grad_(False)


def _golden_for(
    probe: _Probe, golden: Mapping[str, Sequence[Mapping[str, object]]], batch_size: int, fields: tuple[str, str]
) -> dict[str, tuple[list[_Batch], int]]:
    out = {}
    for model in probe.models.names:
        if model not in golden:
            raise ConfigError(
                f"no golden data for model {model!r} (have: {', '.join(golden) or 'none'}); every specialist's"
                " importance is measured on its own golden answers: generate them with `mergeopt golden CONFIG`"
            )
        batches, total = _batches(probe.tokenizer, golden[model], batch_size, *fields)
        if total == 0:
            raise DataError(f"model {model!r}: its golden answers are all empty, so there is no loss to measure")
        out[model] = (batches, total)
    return out


def importance_exact(
    models: ModelSet,
    golden: Mapping[str, Sequence[Mapping[str, object]]],
    *,
    units: Sequence[Unit] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    prompt_field: str = "prompt",
    target_field: str = "target",
    prefix_bytes: int = DEFAULT_BUDGET,
) -> Importance:
    """Iₘ,ᵤ = L(θ₀ + τₘ with u's delta removed) − L(θ₀ + τₘ) for every specialist and unit.

    ``golden[m]`` are specialist m's golden rows (:func:`objectives.golden.golden_by_specialist`):
    a model is judged on what its own task vector was trained to do. Costs (units + 1) passes over
    the golden data per model: seconds for the zoo, hours for a 7B model with 40 units a layer on
    a CPU, where :func:`importance_first_order` is the practical choice. On a GPU when there is one
    (``device="auto"``), float32 by default, because importances are differences of nearby losses.

    A unit's pass starts above the layers below it, from their outputs recorded in the
    specialist's own pass (up to ``prefix_bytes`` of them; 0 computes every layer every time):
    the same losses, bit for bit, for about half the layer work.
    """
    probe = _Probe(models, device=device, dtype=torch_dtype(dtype), prefix_bytes=prefix_bytes)
    chosen = probe.units(units)
    data = _golden_for(probe, golden, batch_size, (prompt_field, target_field))
    out: Importance = {}
    for model in models.names:
        batches, total = data[model]
        probe.load(model)
        full = probe.record_specialist(batches, total)
        row = {}
        for u in chosen:
            with probe.removed(u):
                row[u.name] = probe.loss(batches, total, removed=u) - full
        out[model] = row
    return out


def importance_first_order(
    models: ModelSet,
    golden: Mapping[str, Sequence[Mapping[str, object]]],
    *,
    units: Sequence[Unit] | None = None,
    at: float = 1.0,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    prompt_field: str = "prompt",
    target_field: str = "target",
) -> Importance:
    """Iₘ,ᵤ ≈ −∇L(θ₀ + at·τₘ) · τₘ,ᵤ: one backward pass per model instead of one pass per unit.

    ``at = 1`` (the default) is the tangent at the specialist (``docs/methods.md``), where u is removed from.
    A specialist sits near a minimum of its own golden loss, so that tangent is small and the
    removal's curvature, which it cannot see, dominates: on the zoo its ranking agrees with
    :func:`importance_exact` only loosely (Spearman ρ 0.3-0.6 pooled over models and units, down to
    ~0 within one model, varying with the golden sample). ``at < 1`` takes the gradient part-way
    along τₘ; no single value was reliably better on the zoo, so it is exposed for experiments,
    not recommended. Use the exact measure where it is affordable. Same inputs as
    :func:`importance_exact`.
    """
    probe = _Probe(models, device=device, dtype=torch_dtype(dtype))
    chosen = probe.units(units)
    data = _golden_for(probe, golden, batch_size, (prompt_field, target_field))
    out: Importance = {}
    for model in models.names:
        batches, total = data[model]
        probe.load(model, at=at)
        out[model] = probe.gradient_products(batches, total, chosen)
    return out

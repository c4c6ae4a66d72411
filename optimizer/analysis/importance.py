"""Head and MLP importance of each specialist's task vector (HILA-Merging, METHODS.md seed 4).

A *unit* is a piece of a decoder layer whose delta can be removed on its own: one attention head,
one shared KV head (under grouped-query attention), or one layer's MLP. Importance of unit u for
specialist m is how much m's golden loss rises when u's part of τₘ is removed,

    Iₘ,ᵤ = L(θ₀ + τₘ − τₘ,ᵤ) − L(θ₀ + τₘ),   L = mean token NLL of m's golden responses,

measured exactly (:func:`importance_exact`: one forward pass over the golden data per unit and
model) or to first order (:func:`importance_first_order`: Iₘ,ᵤ ≈ −∇L(θ₀ + τₘ) · τₘ,ᵤ, one backward
pass per model). HILA (:mod:`optimizer.merge.hila`) prunes and weights units by these numbers.

Which slices a unit owns (``nn.Linear`` layout, W is (out, in); d = head_dim, n = heads,
k = KV heads, g = n / k query heads per KV head):

* head h (``L03.attn.h5``): q_proj rows [h·d, (h+1)·d) (and those q bias entries), o_proj input
  columns [h·d, (h+1)·d). When g = 1 (multi-head attention) head h also owns its own KV head's
  rows of k_proj and v_proj, which is the paper's head.
* KV head j (``L03.attn.kv1``), only when g > 1: k_proj and v_proj rows [j·d, (j+1)·d). Several query
  heads read one KV head, so "remove head h" cannot remove KV rows that its group's other heads
  still use; making the KV head a unit of its own keeps every unit's removal well defined and gives
  the shared rows an importance of their own, measured the same way, instead of a rule that removes
  them only when the whole group goes.
* MLP (``L03.mlp``): gate_proj, up_proj, down_proj whole.

So the units partition q/k/v/o_proj and the MLP exactly; norms (including Qwen3's per-head-dim
q_norm/k_norm, shared by every head), o_proj's bias, embeddings and lm_head belong to no unit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from optimizer.errors import ConfigError, DataError, ModelError
from optimizer.models import check_compatible, layer_key, load_config, load_state_dict

if TYPE_CHECKING:
    from optimizer.engines.base import ModelSet

__all__ = [
    "Importance",
    "TensorSlice",
    "Unit",
    "importance_exact",
    "importance_first_order",
    "load_importance",
    "rank_correlation",
    "remove_unit",
    "save_importance",
    "unit_slices",
]

#: Model name → unit name → Iₘ,ᵤ (nats per golden token; positive: the unit's delta helps).
Importance = dict[str, dict[str, float]]

_FORMAT = 1


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """Indices [start, stop) along dimension ``dim`` of checkpoint tensor ``tensor``."""

    tensor: str
    dim: int
    start: int
    stop: int

    def index(self) -> tuple[slice, ...]:
        """The index expression of this slice (``t[s.index()]``)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


@dataclass(frozen=True, slots=True)
class Unit:
    """One removable piece of a layer and the tensor slices it owns."""

    name: str  # L03.attn.h1, L03.attn.kv0, L03.mlp: stable, since importance files key on it
    layer: int
    kind: Literal["head", "kv", "mlp"]
    slices: tuple[TensorSlice, ...]


# --------------------------------------------------------------------------- units


def _int(config: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or value <= 0:
        raise ModelError(f"config.json: {key}={value!r}; head/MLP units need a positive integer {key}")
    return value


def unit_slices(config: Mapping[str, object], names: Iterable[str] | None = None) -> list[Unit]:
    """The units of a Llama/Mistral/Qwen-style model, layer by layer (heads, KV heads, then MLP).

    ``config`` is the model's ``config.json``. With ``names`` (the checkpoint's tensor names), the
    tensor prefix (``model.`` or none) is read off them and slices of tensors the checkpoint lacks
    (biases of a bias-free model) are left out; without it, names start with ``model.`` and bias
    slices are listed too (a consumer skips tensors it does not have).
    """
    layers = _int(config, "num_hidden_layers")
    hidden = _int(config, "hidden_size")
    n_heads = _int(config, "num_attention_heads")
    n_kv = _int(config, "num_key_value_heads", n_heads)
    inter = _int(config, "intermediate_size")
    head_dim = config.get("head_dim") or hidden // n_heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ModelError(f"config.json: head_dim={head_dim!r}; it must be a positive integer")
    if n_heads % n_kv:
        raise ModelError(
            f"config.json: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv};"
            " grouped-query attention needs whole groups"
        )
    group = n_heads // n_kv
    known = set(names) if names is not None else None
    prefix = "model."
    if known is not None and any(n.startswith("layers.") for n in known):
        prefix = ""

    def slices(layer: int, parts: Iterable[tuple[str, int, int, int]]) -> tuple[TensorSlice, ...]:
        out = []
        for module, dim, start, stop in parts:
            for suffix in ("weight", "bias"):
                if suffix == "bias" and dim != 0:
                    continue  # a bias has one entry per output row; input columns own none of it
                tensor = f"{prefix}layers.{layer}.{module}.{suffix}"
                if known is None or tensor in known:
                    out.append(TensorSlice(tensor, dim, start, stop))
        return tuple(out)

    units: list[Unit] = []
    for layer in range(layers):
        lk = layer_key(layer)
        for h in range(n_heads):
            rows = (h * head_dim, (h + 1) * head_dim)
            parts = [("self_attn.q_proj", 0, *rows), ("self_attn.o_proj", 1, *rows)]
            if group == 1:  # multi-head attention: head h alone reads KV head h
                parts += [("self_attn.k_proj", 0, *rows), ("self_attn.v_proj", 0, *rows)]
            units.append(Unit(f"{lk}.attn.h{h}", layer, "head", slices(layer, parts)))
        if group > 1:
            for j in range(n_kv):
                rows = (j * head_dim, (j + 1) * head_dim)
                parts = [("self_attn.k_proj", 0, *rows), ("self_attn.v_proj", 0, *rows)]
                units.append(Unit(f"{lk}.attn.kv{j}", layer, "kv", slices(layer, parts)))
        mlp = [("mlp.gate_proj", 0, 0, inter), ("mlp.up_proj", 0, 0, inter), ("mlp.down_proj", 0, 0, hidden)]
        units.append(Unit(f"{lk}.mlp", layer, "mlp", slices(layer, mlp)))
    return units


def _check_fits(unit: Unit, state: Mapping[str, torch.Tensor]) -> None:
    for s in unit.slices:
        t = state.get(s.tensor)
        if t is not None and (t.dim() <= s.dim or t.shape[s.dim] < s.stop):
            raise ModelError(
                f"unit {unit.name}: tensor {s.tensor!r} has shape {tuple(t.shape)}, too small for indices"
                f" [{s.start}, {s.stop}) on dim {s.dim}; the units were built from another model's config.json"
            )


def remove_unit(delta_state: Mapping[str, torch.Tensor], unit: Unit) -> dict[str, torch.Tensor]:
    """``delta_state`` with exactly ``unit``'s slices zeroed; other tensors are shared, not copied.

    The input is left untouched (the same task vectors serve every unit). Slices of tensors the
    state lacks are skipped (see :func:`unit_slices`).
    """
    _check_fits(unit, delta_state)
    out = dict(delta_state)
    copied: set[str] = set()
    for s in unit.slices:
        if s.tensor not in out:
            continue
        if s.tensor not in copied:
            out[s.tensor] = out[s.tensor].clone()
            copied.add(s.tensor)
        out[s.tensor][s.index()] = 0
    return out


# --------------------------------------------------------------------------- golden loss


@dataclass(frozen=True)
class _Batch:
    ids: torch.Tensor  # (B, T), right padded
    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the token each position predicts, −100 outside responses


def _batches(
    tokenizer: object, rows: Sequence[Mapping[str, object]], batch_size: int, prompt_field: str, target_field: str
) -> tuple[list[_Batch], int]:
    """Teacher-forcing batches of golden rows and their response token count.

    Tokenized with :func:`encode_pair`, as the engines score ``nll``, so importance is measured on
    the very tokens the study's golden objective scores.
    """
    from optimizer.engines.base import encode_pair

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
        batches.append(_Batch(ids, mask, labels))
    return batches, total


class _Probe:
    """The base network in this process, loaded with θ₀ + τₘ, scoring golden data by teacher forcing."""

    def __init__(self, models: ModelSet, *, device: str, dtype: torch.dtype):
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
        self.model = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=dtype).to(self.device).eval()
        self.params = dict(self.model.named_parameters())  # tied weights once, as the engines merge them
        base = load_state_dict(models.base)
        self.base = {k: v.to(self.device) for k, v in base.items() if k in self.params}
        self.tau: dict[str, torch.Tensor] = {}

    def units(self, units: Sequence[Unit] | None) -> list[Unit]:
        chosen = list(units) if units is not None else unit_slices(load_config(self.models.base), self.base)
        for u in chosen:
            _check_fits(u, self.base)
        return chosen

    @torch.no_grad()
    def load(self, model: str, at: float = 1.0) -> None:
        """Weights ← θ₀ + at·τₘ; τₘ (float32) is kept for removals and gradient products."""
        state = load_state_dict(self.models.specialists[model])
        check_compatible(self.base, {k: v for k, v in state.items() if k in self.base}, model)
        self.tau = {k: state[k].to(self.device) - b for k, b in self.base.items()}
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
        logits = self.model(input_ids=batch.ids.to(self.device), attention_mask=batch.mask.to(self.device)).logits
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch.labels.to(self.device).flatten(), ignore_index=-100, reduction="sum"
        )

    @torch.no_grad()
    def loss(self, batches: Sequence[_Batch], total: int) -> float:
        """Mean NLL per golden token (the ``nll`` metric's value), summed in float64."""
        return sum(float(self._nll_sum(b).double()) for b in batches) / total

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


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not known; use one of: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def importance_exact(
    models: ModelSet,
    golden: Mapping[str, Sequence[Mapping[str, object]]],
    *,
    units: Sequence[Unit] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    prompt_field: str = "prompt",
    target_field: str = "target",
) -> Importance:
    """Iₘ,ᵤ = L(θ₀ + τₘ with u's delta removed) − L(θ₀ + τₘ) for every specialist and unit.

    ``golden[m]`` are specialist m's golden rows (:func:`objectives.golden.golden_by_specialist`):
    a model is judged on what its own task vector was trained to do. Costs (units + 1) passes over
    the golden data per model: seconds for the zoo, hours for a 7B model with 40 units a layer,
    where :func:`importance_first_order` is the practical choice. float32 by default, because
    importances are differences of nearby losses.
    """
    probe = _Probe(models, device=device, dtype=_dtype(dtype))
    chosen = probe.units(units)
    data = _golden_for(probe, golden, batch_size, (prompt_field, target_field))
    out: Importance = {}
    for model in models.names:
        batches, total = data[model]
        probe.load(model)
        full = probe.loss(batches, total)
        row = {}
        for u in chosen:
            with probe.removed(u):
                row[u.name] = probe.loss(batches, total) - full
        out[model] = row
    return out


def importance_first_order(
    models: ModelSet,
    golden: Mapping[str, Sequence[Mapping[str, object]]],
    *,
    units: Sequence[Unit] | None = None,
    at: float = 1.0,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    prompt_field: str = "prompt",
    target_field: str = "target",
) -> Importance:
    """Iₘ,ᵤ ≈ −∇L(θ₀ + at·τₘ) · τₘ,ᵤ: one backward pass per model instead of one pass per unit.

    ``at = 1`` (the default) is METHODS.md's tangent at the specialist, where u is removed from.
    A specialist sits near a minimum of its own golden loss, so that tangent is small and the
    removal's curvature, which it cannot see, dominates: on the zoo its ranking agrees with
    :func:`importance_exact` only loosely (Spearman ρ 0.3-0.6 pooled over models and units, down to
    ~0 within one model, varying with the golden sample). ``at < 1`` takes the gradient part-way
    along τₘ; no single value was reliably better on the zoo, so it is exposed for experiments,
    not recommended. Use the exact measure where it is affordable. Same inputs as
    :func:`importance_exact`.
    """
    probe = _Probe(models, device=device, dtype=_dtype(dtype))
    chosen = probe.units(units)
    data = _golden_for(probe, golden, batch_size, (prompt_field, target_field))
    out: Importance = {}
    for model in models.names:
        batches, total = data[model]
        probe.load(model, at=at)
        out[model] = probe.gradient_products(batches, total, chosen)
    return out


# --------------------------------------------------------------------------- agreement and files


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their average rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def rank_correlation(a: Importance, b: Importance, *, per_model: bool = False) -> float | dict[str, float]:
    """Spearman's ρ between two importance tables over their common (model, unit) pairs.

    ``per_model`` gives one ρ per model instead (the ranking within a model is what a per-model
    choice would use; HILA's global quantile uses the pooled one).
    """

    def rho(x: list[float], y: list[float]) -> float:
        rx, ry = _ranks(x), _ranks(y)
        mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
        cov = sum((p - mx) * (q - my) for p, q in zip(rx, ry, strict=True))
        sx = math.sqrt(sum((p - mx) ** 2 for p in rx))
        sy = math.sqrt(sum((q - my) ** 2 for q in ry))
        return cov / (sx * sy) if sx and sy else float("nan")

    pairs = {m: [u for u in a[m] if u in b.get(m, {})] for m in a}
    if per_model:
        return {m: rho([a[m][u] for u in us], [b[m][u] for u in us]) for m, us in pairs.items() if us}
    xs = [a[m][u] for m, us in pairs.items() for u in us]
    ys = [b[m][u] for m, us in pairs.items() for u in us]
    if len(xs) < 2:
        raise ValueError("the two importance tables share fewer than two (model, unit) pairs")
    return rho(xs, ys)


def save_importance(
    path: Path, importance: Importance, *, method: str, meta: Mapping[str, object] | None = None
) -> Path:
    """Write an importance table as JSON (atomically), with how it was measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": _FORMAT, "method": method, "meta": dict(meta or {}), "importance": importance}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_importance(path: Path) -> Importance:
    """An importance table written by :func:`save_importance`, model → unit → value."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the importance file ({exc}); measure importance again") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("importance"), dict):
        raise ConfigError(f"{path}: not a mergeopt importance file (format {_FORMAT}); measure importance again")
    return {str(m): {str(u): float(v) for u, v in row.items()} for m, row in data["importance"].items()}

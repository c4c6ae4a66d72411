"""HILA's units: the pieces of a decoder layer whose delta can be removed on its own.

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

Phi-3 stores q, k and v as the row blocks [q; k; v] of one ``qkv_proj`` (n·d, then k·d and k·d
rows) and gate/up as ``gate_up_proj``: the same units own the same rows there. A mixture of
experts' MLP unit is every expert, the router and any shared expert of the layer, whole.

So the units partition q/k/v/o_proj and the MLP exactly; norms (including Qwen3's per-head-dim
q_norm/k_norm, shared by every head), o_proj's bias, embeddings and lm_head belong to no unit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from optimizer.errors import ModelError
from optimizer.families import family_of
from optimizer.models import describe, layer_key

__all__ = ["TensorSlice", "Unit", "check_fits", "remove_unit", "unit_slices"]


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """Indices [start, stop) along dimension ``dim`` of checkpoint tensor ``tensor`` (stop None: to the end)."""

    tensor: str
    dim: int
    start: int
    stop: int | None

    def index(self) -> tuple[slice, ...]:
        """The index expression of this slice (``t[s.index()]``)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` has these indices."""
        return len(shape) > self.dim and shape[self.dim] >= (self.stop if self.stop is not None else self.start)


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
    family = family_of(config)
    known = set(names) if names is not None else None
    prefix = "model."
    if known is not None and any(n.startswith("layers.") for n in known):
        prefix = ""

    def mlp_slices(layer: int) -> tuple[TensorSlice, ...]:
        if family.experts and known is not None:
            # A mixture of experts: every expert, the router and shared experts, whole (no norm).
            infos = (describe(n, family) for n in sorted(known) if f"layers.{layer}." in n)
            return tuple(
                TensorSlice(i.name, 0, 0, None)
                for i in infos
                if i.layer == layer and i.kind == "mlp" and not i.role.endswith("norm")
            )
        if family.fused_gate_up:
            return slices(layer, [("mlp.gate_up_proj", 0, 0, 2 * inter), ("mlp.down_proj", 0, 0, hidden)])
        parts = [("mlp.gate_proj", 0, 0, inter), ("mlp.up_proj", 0, 0, inter), ("mlp.down_proj", 0, 0, hidden)]
        return slices(layer, parts)

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

    def kv_rows(j: int) -> list[tuple[str, int, int, int]]:
        # KV head j's rows of k_proj and v_proj; Phi-3 stacks [q; k; v] in one qkv_proj.
        d = head_dim
        if family.fused_qkv:
            k, v = n_heads * d + j * d, (n_heads + n_kv) * d + j * d
            return [("self_attn.qkv_proj", 0, k, k + d), ("self_attn.qkv_proj", 0, v, v + d)]
        return [("self_attn.k_proj", 0, j * d, (j + 1) * d), ("self_attn.v_proj", 0, j * d, (j + 1) * d)]

    q_proj = "self_attn.qkv_proj" if family.fused_qkv else "self_attn.q_proj"
    units: list[Unit] = []
    for layer in range(layers):
        lk = layer_key(layer)
        for h in range(n_heads):
            rows = (h * head_dim, (h + 1) * head_dim)
            parts = [(q_proj, 0, *rows), ("self_attn.o_proj", 1, *rows)]
            if group == 1:  # multi-head attention: head h alone reads KV head h
                parts += kv_rows(h)
            units.append(Unit(f"{lk}.attn.h{h}", layer, "head", slices(layer, parts)))
        if group > 1:
            for j in range(n_kv):
                units.append(Unit(f"{lk}.attn.kv{j}", layer, "kv", slices(layer, kv_rows(j))))
        units.append(Unit(f"{lk}.mlp", layer, "mlp", mlp_slices(layer)))
    return units


def check_fits(unit: Unit, state: Mapping[str, torch.Tensor]) -> None:
    for s in unit.slices:
        t = state.get(s.tensor)
        if t is not None and not s.fits(t.shape):
            raise ModelError(
                f"unit {unit.name}: tensor {s.tensor!r} has shape {tuple(t.shape)}, too small for indices"
                f" [{s.start}, {s.stop}) on dim {s.dim}; the units were built from another model's config.json"
            )


def remove_unit(delta_state: Mapping[str, torch.Tensor], unit: Unit) -> dict[str, torch.Tensor]:
    """``delta_state`` with exactly ``unit``'s slices zeroed; other tensors are shared, not copied.

    The input is left untouched (the same task vectors serve every unit). Slices of tensors the
    state lacks are skipped (see :func:`unit_slices`).
    """
    check_fits(unit, delta_state)
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

"""Architecture families: which block each module of a decoder layer belongs to, per family.

Checkpoints of different families share most tensor names (``self_attn.q_proj``, ``mlp.down_proj``)
but not their meaning: Llama's ``post_attention_layernorm`` normalises the MLP's input, while
Gemma 2's normalises the attention's *output* (Gemma 2 and 3 put ``pre_feedforward_layernorm`` in
front of the MLP instead). A per-kind coefficient must move the norm with its block, and an exported
mergekit config must filter the same names, so the family decides, read from ``config.json``'s
``model_type``. :mod:`optimizer.models` classifies one tensor name against a family; this module
only declares the families.

Mixture-of-experts families name their experts (``…experts.<e>.<proj>``) and router; both belong
to the MLP block. A model type mergeopt has not been taught gets Llama's layout (most decoders
copy it): any tensor that does not fit is refused by name, with the families known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["FAMILIES", "LLAMA", "Family", "expert_count", "family_of", "known_families"]


@dataclass(frozen=True, slots=True)
class Family:
    """Where a family's per-layer modules sit.

    Prefixes are relative to a layer (``model.layers.3.``) and end with a dot, so they double as
    mergekit's substring filters. ``experts`` is the prefix under which expert ``<e>.`` modules
    live; ``router`` lists router modules (their tensors get the role ``router``). ``fused_qkv``
    and ``fused_gate_up`` say that q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``) are stored as
    one tensor each, which head-level methods must slice.

    mergekit 0.1.5 names a mixture of experts' tensors as transformers 5 holds them in memory: one
    3-D ``mlp.experts.gate_up_proj`` and ``down_proj`` per layer, and Mixtral's router under
    ``mlp.``. ``mergekit_mlp`` are the further filters its names need. Its methods that keep a
    top-k share then rank all experts of a layer at once, where mergeopt ranks each expert's own
    tensor (as a checkpoint stores it), so only methods without a density rebuild the same model.
    """

    name: str
    model_types: tuple[str, ...]
    attn: tuple[str, ...] = ("self_attn.", "input_layernorm.")
    mlp: tuple[str, ...] = ("mlp.", "post_attention_layernorm.")
    experts: str | None = None
    router: tuple[str, ...] = ()
    fused_qkv: bool = False
    fused_gate_up: bool = False
    mergekit_mlp: tuple[str, ...] = ()

    def block_of(self, module_path: str) -> str | None:
        """``attn`` or ``mlp`` for a module path inside a layer (``self_attn.q_proj.weight``)."""
        for kind, prefixes in (("attn", self.attn), ("mlp", self.mlp)):
            if any(module_path.startswith(p) for p in prefixes):
                return kind
        return None


LLAMA = Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma"))
GEMMA2 = Family(
    "gemma2",
    ("gemma2", "gemma3_text"),
    attn=("self_attn.", "input_layernorm.", "post_attention_layernorm."),
    mlp=("mlp.", "pre_feedforward_layernorm.", "post_feedforward_layernorm."),
)
PHI3 = Family("phi3", ("phi3",), fused_qkv=True, fused_gate_up=True)
MIXTRAL = Family(
    "mixtral",
    ("mixtral",),
    mlp=("block_sparse_moe.", "post_attention_layernorm."),
    experts="block_sparse_moe.experts.",
    router=("block_sparse_moe.gate.",),
    mergekit_mlp=("mlp.",),
)
QWEN_MOE = Family(
    "qwen_moe",
    ("qwen2_moe", "qwen3_moe"),
    experts="mlp.experts.",
    router=("mlp.gate.", "mlp.shared_expert_gate."),
)

FAMILIES: tuple[Family, ...] = (LLAMA, GEMMA2, PHI3, MIXTRAL, QWEN_MOE)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of(config: Mapping[str, object]) -> Family:
    """The family of a model from its ``config.json``; Llama's layout for a type not listed."""
    model_type = config.get("model_type")
    return _BY_TYPE.get(model_type, LLAMA) if isinstance(model_type, str) else LLAMA


def known_families() -> str:
    """The model types mergeopt knows, for error messages."""
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def expert_count(config: Mapping[str, object]) -> int:
    """Experts per mixture-of-experts layer (``num_local_experts`` or ``num_experts``); 0 for a dense model."""
    for key in ("num_local_experts", "num_experts"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0

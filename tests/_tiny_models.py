"""Tiny random Llama-family models on disk, for tests that need real checkpoints.

A base model is a freshly initialised transformers model (so names, shapes and config.json are
exactly what transformers and mergekit expect); each "specialist" is the base plus a small random
delta on every tensor, with its own scale, so TIES sees sign conflicts and every tensor has a
task vector. Shapes are small but keep the structure that matters: head_dim 64, grouped-query
attention (fewer KV heads than query heads), several layers, float32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FAMILIES", "TinyModels", "build_tiny_models"]


@dataclass(frozen=True)
class TinyModels:
    base: Path
    specialists: dict[str, Path]
    num_layers: int

    @property
    def paths(self) -> dict[str, Path]:
        return dict(self.specialists)


#: Extra config fields per family, beyond the shared small shape (MoE: 4 experts, 2 per token).
_FAMILY_FIELDS: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 64},
    "gemma3_text": {"query_pre_attn_scalar": 64, "sliding_window": 64},
    "phi3": {"pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "decoder_sparse_step": 1,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1},
}
FAMILIES = tuple(_FAMILY_FIELDS)


def _config(family: str, *, num_layers: int, hidden: int, tie: bool, vocab: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        dtype="float32",
        **_FAMILY_FIELDS[family],
    )


def build_tiny_models(
    root: Path,
    *,
    names: tuple[str, ...] = ("math", "code"),
    family: str = "llama",
    num_layers: int = 4,
    hidden: int = 128,
    vocab: int = 256,
    delta_scale: float = 0.01,
    tie_word_embeddings: bool = False,
    variant: str | None = None,
    seed: int = 0,
    tokenizer: bool = False,
) -> TinyModels:
    """Write ``root/base`` and ``root/<name>`` for each specialist; return their paths.

    ``variant`` alters the *last* specialist to test refusals: ``"shape_mismatch"`` gives one MLP
    tensor an extra row, ``"renamed"`` renames it (so it is missing and an extra name appears).
    ``hidden`` must be a multiple of 128 (2 query heads of 64 per KV head). ``tokenizer`` saves the
    zoo's byte tokenizer beside each model (``vocab`` must then hold its 259 ids), for engines.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if hidden % 128:
        raise ValueError("hidden must be a multiple of 128 (head_dim 64, GQA with 2 query heads per KV)")
    root = Path(root)
    config = _config(family, num_layers=num_layers, hidden=hidden, tie=tie_word_embeddings, vocab=vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    if family in ("qwen2", "qwen2_moe"):
        # Fresh biases are zero; give them values so bias tensors are not trivially equal.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.02)
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    if tokenizer:
        from optimizer.zoo._tokenizer import build_tokenizer

        build_tokenizer().save_pretrained(base_dir)
    base_state = load_file(str(base_dir / "model.safetensors"))

    gen = torch.Generator().manual_seed(seed + 1)
    specialists: dict[str, Path] = {}
    for i, name in enumerate(names):
        scale = delta_scale * (1.0 + 0.5 * i)
        state = {k: (v + scale * torch.randn(v.shape, generator=gen)).contiguous() for k, v in base_state.items()}
        if variant and i == len(names) - 1:
            target = "model.layers.1.mlp.up_proj.weight"
            if variant == "shape_mismatch":
                state[target] = torch.cat([state[target], state[target][:1]])
            elif variant == "renamed":
                state["model.layers.1.mlp.upper_proj.weight"] = state.pop(target)
            else:
                raise ValueError(f"unknown variant {variant!r}; use 'shape_mismatch' or 'renamed'")
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        for item in base_dir.iterdir():
            if item.suffix != ".safetensors":
                shutil.copy(item, out / item.name)
        specialists[name] = out
    return TinyModels(base=base_dir, specialists=specialists, num_layers=num_layers)


def write_config(model_dir: Path, **updates: object) -> None:
    """Patch a model's config.json in place (e.g. to flip ``tie_word_embeddings``)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(updates)
    path.write_text(json.dumps(config, indent=2))

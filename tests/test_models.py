"""optimizer.models: tensor naming, model directories, and compatibility checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from optimizer.checkpoints import check_compatible, load_state_dict, read_shapes, weight_files
from optimizer.checkpoints import model_config as load_config
from optimizer.errors import ModelError
from optimizer.models import KINDS, describe, layer_key, num_layers
from tests._tiny_models import build_tiny_models

# --------------------------------------------------------------------------- describe()


@pytest.mark.parametrize(
    ("name", "layer", "kind", "role"),
    [
        ("model.embed_tokens.weight", None, "embed", "embed_tokens"),
        ("model.layers.0.input_layernorm.weight", 0, "attn", "input_layernorm"),
        ("model.layers.3.self_attn.q_proj.weight", 3, "attn", "q_proj"),
        ("model.layers.3.self_attn.k_proj.weight", 3, "attn", "k_proj"),
        ("model.layers.12.self_attn.o_proj.weight", 12, "attn", "o_proj"),
        # Qwen2 has q/k/v biases; Qwen3 has per-head q/k norms: all attention.
        ("model.layers.7.self_attn.q_proj.bias", 7, "attn", "q_proj"),
        ("model.layers.7.self_attn.k_proj.bias", 7, "attn", "k_proj"),
        ("model.layers.7.self_attn.v_proj.bias", 7, "attn", "v_proj"),
        ("model.layers.2.self_attn.q_norm.weight", 2, "attn", "q_norm"),
        ("model.layers.5.post_attention_layernorm.weight", 5, "mlp", "post_attention_layernorm"),
        ("model.layers.5.mlp.gate_proj.weight", 5, "mlp", "gate_proj"),
        ("model.layers.5.mlp.up_proj.weight", 5, "mlp", "up_proj"),
        ("model.layers.31.mlp.down_proj.weight", 31, "mlp", "down_proj"),
        ("model.norm.weight", None, "head", "norm"),
        ("lm_head.weight", None, "head", "lm_head"),
        # Bare (no "model.") prefix, as some exports write them.
        ("layers.4.mlp.up_proj.weight", 4, "mlp", "up_proj"),
        ("embed_tokens.weight", None, "embed", "embed_tokens"),
    ],
)
def test_describe_llama_and_qwen2_names(name, layer, kind, role):
    info = describe(name)
    assert (info.name, info.layer, info.kind, info.role) == (name, layer, kind, role)
    assert info.kind in KINDS


@pytest.mark.parametrize(
    "name",
    [
        "transformer.h.0.attn.c_attn.weight",  # GPT-2
        "model.layers.0.block_sparse_moe.gate.weight",  # Mixtral router: not attn, not mlp
        "model.layers.1.weight",
        "model.vision_tower.patch_embed.weight",
    ],
)
def test_unknown_names_raise_with_the_name(name):
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        describe(name)


def test_layer_helpers():
    assert layer_key(3) == "L03" and layer_key(12) == "L12"
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.5.mlp.up_proj.weight"]
    assert num_layers(names) == 6
    assert num_layers(["lm_head.weight"]) == 0


# --------------------------------------------------------------------------- check_compatible()


def _state(**shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {name.replace("__", "."): torch.zeros(shape) for name, shape in shapes.items()}


BASE = _state(
    model__embed_tokens__weight=(8, 4),
    model__layers__0__mlp__up_proj__weight=(6, 4),
    model__layers__1__mlp__up_proj__weight=(6, 4),
    lm_head__weight=(8, 4),
)


def test_compatible_models_pass():
    check_compatible(BASE, {k: v.clone() for k, v in BASE.items()}, "math")


def test_shape_mismatch_names_the_first_offending_tensor():
    other = dict(BASE)
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 4)
    other["lm_head.weight"] = torch.zeros(9, 4)
    with pytest.raises(ModelError, match=r"'math'.*'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(7, 4\)"):
        check_compatible(BASE, other, "math")


def test_missing_and_extra_tensors_are_named():
    missing = {k: v for k, v in BASE.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ModelError, match=r"'code' lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        check_compatible(BASE, missing, "code")
    extra = {**BASE, "model.layers.1.mlp.extra.weight": torch.zeros(1), "model.layers.0.z.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match=r"'code' has tensor 'model\.layers\.0\.z\.weight' that the base lacks"):
        check_compatible(BASE, extra, "code")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {
        v: build_tiny_models(root / v, names=("math", "code"), num_layers=4, variant=v)
        for v in ("shape_mismatch", "renamed")
    }


def test_on_disk_shape_mismatch_is_refused(variants):
    tiny = variants["shape_mismatch"]
    base = load_state_dict(tiny.base)
    check_compatible(base, load_state_dict(tiny.specialists["math"]), "math")  # untouched specialist
    with pytest.raises(ModelError, match=r"'code'.*'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(257, 128\)"):
        check_compatible(base, load_state_dict(tiny.specialists["code"]), "code")


def test_on_disk_renamed_tensor_is_refused(variants):
    tiny = variants["renamed"]
    with pytest.raises(ModelError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        check_compatible(load_state_dict(tiny.base), load_state_dict(tiny.specialists["code"]), "code")


# --------------------------------------------------------------------------- model directories


def test_pickled_weights_are_refused_with_the_fix(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(ModelError, match=r"pickled weights \(pytorch_model\.bin\).*safe_serialization=True"):
        weight_files(tmp_path)
    with pytest.raises(ModelError, match="pickled"):
        load_state_dict(tmp_path)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        weight_files(tmp_path / "nope")
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        weight_files(tmp_path)


def test_unreadable_safetensors_and_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_state_dict(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json is not valid JSON"):
        load_config(tmp_path)


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tied"), names=("math",), family="qwen2", tie_word_embeddings=True)


def test_tied_head_is_the_embedding(qwen_tied):
    on_disk = load_file(str(qwen_tied.base / "model.safetensors"))
    assert "lm_head.weight" not in on_disk  # stored once...
    state = load_state_dict(qwen_tied.base)
    assert "lm_head.weight" not in state  # ...and merged once, as vLLM and mergekit load it
    assert "model.embed_tokens.weight" in state
    assert describe("lm_head.weight").kind == "head"
    assert "model.layers.0.self_attn.q_proj.bias" in state


def test_untied_head_is_its_own_tensor(tmp_path):
    tiny = build_tiny_models(tmp_path, names=("math",), num_layers=4)
    state = load_state_dict(tiny.specialists["math"])
    assert json.loads((tiny.base / "config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert num_layers(state) == 4


def test_load_state_dict_casts_floating_tensors(qwen_tied):
    state = load_state_dict(qwen_tied.base, dtype=torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_read_shapes_agrees_with_loading_and_feeds_check_compatible(qwen_tied, variants):
    shapes = read_shapes(qwen_tied.base)
    state = load_state_dict(qwen_tied.base)
    assert shapes == {name: tuple(t.shape) for name, t in state.items()}  # no separate tied head
    tiny = variants["shape_mismatch"]
    base = read_shapes(tiny.base)
    check_compatible(base, read_shapes(tiny.specialists["math"]), "math")
    with pytest.raises(ModelError, match=r"up_proj\.weight' has shape \(257, 128\), the base has \(256, 128\)"):
        check_compatible(base, read_shapes(tiny.specialists["code"]), "code")

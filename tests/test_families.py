"""The model families users merge: each one's tensors placed in the right block, merged in place by
the transformers engine exactly as its export loads, and rebuilt tensor for tensor by mergekit.

Every family is a tiny random-weight model built here by transformers itself (so names, shapes,
fused layouts and config.json are what a real checkpoint of that family has), with two specialists
that are the base plus random task vectors.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from optimizer.checkpoints import ModelSet, load_state_dict, model_config, read_shapes
from optimizer.families import family_of
from optimizer.merge import MergePlan, merge_state_dict, task_vectors
from optimizer.merge.plan import ModelParams
from optimizer.models import describe
from tests._cli import run_cli, write_config
from tests._tiny_models import build_tiny_models

NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
MODELS = ("math", "code")
# attn and mlp of one layer differ, so a norm filed under the wrong block changes the merge.
PLAN = {
    "math": ModelParams(0.7, 0.5),
    "code": ModelParams(0.5, 0.6),
    "math.L00.attn": ModelParams(0.2, 0.7),
    "math.L01.mlp": ModelParams(1.3, 0.3),
    "code.mlp": ModelParams(0.9, 0.4),
    "code.L01.attn": ModelParams(-0.3, 0.8),
    "math.embed": ModelParams(0.4, 0.5),
    "code.head": ModelParams(0.33, 0.35),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """family → its tiny models (built once per family, on first use)."""
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_models(
                tmp_path_factory.mktemp(family),
                names=MODELS,
                family=family,
                tie_word_embeddings=family.startswith("gemma"),  # as Gemma checkpoints are (vLLM needs it)
                num_layers=2,
                vocab=320,
                delta_scale=0.05,
                tokenizer=True,
            )
        return built[family]

    return get


def _data(root: Path) -> Path:
    """A small prompt/target task (the tiny models are random: only the pipeline is under test)."""
    data = root / "data"
    data.mkdir()
    for split in ("search", "held_out"):
        rows = [json.dumps({"prompt": f"q{i} =", "target": f" a{i}"}) for i in range(4)]
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return data


def _study_config(models, tmp_path: Path, **extra: object) -> dict:
    """A small CLI study on tiny ``models`` (transformers engine, one NLL objective, 2 trials)."""
    return {
        "name": "moe",
        "base": str(models.base),
        "models": {m: str(p) for m, p in models.specialists.items()},
        "method": "task_arithmetic",
        "objectives": [{"name": "x", "data": str(_data(tmp_path)), "metric": "nll", "limit": 4}],
        "storage": f"sqlite:///{tmp_path / 'study' / 's.db'}",
        "engine": "hf",
        "search": {"trials": 2, "seed": 0, "baselines": False},
        **extra,
    }


def _placed(tiny_models) -> dict[str, object]:
    family = family_of(model_config(tiny_models.base))
    return {name: describe(name, family) for name in read_shapes(tiny_models.base)}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_tensor_of_each_family_has_its_block(tiny, family: str) -> None:
    placed = _placed(tiny(family))
    layer0 = {info.role: info for info in placed.values() if info.layer == 0}
    assert layer0["o_proj"].kind == "attn"
    if family.startswith("gemma"):
        # Gemma 2/3 normalise the attention's output with post_attention_layernorm; the MLP has
        # its own pre/post feed-forward norms.
        assert layer0["post_attention_layernorm"].kind == "attn"
        assert layer0["pre_feedforward_layernorm"].kind == "mlp"
        assert layer0["post_feedforward_layernorm"].kind == "mlp"
    else:
        assert layer0["post_attention_layernorm"].kind == "mlp"  # Llama's: the MLP's input norm
    if family == "phi3":
        assert layer0["qkv_proj"].kind == "attn" and layer0["gate_up_proj"].kind == "mlp"
    experts = [info for info in placed.values() if info.expert is not None]
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        assert layer0["router"].kind == "mlp"
        assert {info.expert for info in experts} == {0, 1, 2, 3}
        assert {info.kind for info in experts} == {"mlp"}
    else:
        assert not experts


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_transformers_engine_merges_each_family_in_place_as_its_export_loads(
    tiny, family: str, tmp_path: Path
) -> None:
    """Mixture-of-experts experts live as slices of fused parameters in transformers 5: a merge
    that skipped them would still run, so the logits of a fresh load of the export are the check."""
    from transformers import AutoModelForCausalLM

    from optimizer.engines.hf_engine import HFEngine
    from optimizer.export import merged_stream, write_model_dir

    models = ModelSet(tiny(family).base, tiny(family).specialists)
    plan = MergePlan("ties", MODELS, PLAN)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with HFEngine(models, device="cpu") as engine, torch.no_grad():
        before = engine.model(ids).logits
        engine.apply_plan(plan)
        live = engine.model(ids).logits
    out = write_model_dir(tmp_path / "export", models.base, merged_stream(plan, models), {})
    fresh = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        loaded = fresh(ids).logits
    assert (live - before).abs().max() > 0.1  # the merge changed the model
    torch.testing.assert_close(live, loaded, atol=1e-5, rtol=0)


needs_mergekit = pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit not installed")


def _mergekit(models, plan: MergePlan, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's merge of ``plan`` from the YAML mergeopt writes for it."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from optimizer.mergekit_yaml import to_yaml

    family = family_of(model_config(models.base))
    text = to_yaml(plan, base_path=models.base, model_paths=models.specialists, num_layers=2, family=family)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options=options)
    return load_state_dict(out)


def _ours(models, plan: MergePlan) -> dict[str, torch.Tensor]:
    base = load_state_dict(models.base)
    deltas = task_vectors(base, [load_state_dict(models.specialists[m]) for m in MODELS])
    return merge_state_dict(plan, base, deltas, family=family_of(model_config(models.base)))


@needs_mergekit
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_mergekit_rebuilds_each_family_from_the_exported_yaml(tiny, family: str, tmp_path: Path) -> None:
    """The YAML's filters name the family's own modules (Gemma 2's post-attention norm with attn)."""
    plan = MergePlan("ties", MODELS, PLAN)
    ours, theirs = _ours(tiny(family), plan), _mergekit(tiny(family), plan, tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0, msg=name)


def test_an_unknown_tensor_is_one_line_naming_it_and_the_families(tiny, tmp_path: Path) -> None:
    """A checkpoint with a module mergeopt cannot place: ``search`` refuses before writing anything."""
    from safetensors.torch import save_file

    models = tiny("qwen3")
    odd = tmp_path / "odd_base"
    odd.mkdir()
    for item in models.base.iterdir():
        (odd / item.name).write_bytes(item.read_bytes())
    state = load_state_dict(models.base)
    state["model.layers.1.adapter_gate.weight"] = torch.zeros(4)
    save_file(state, str(odd / "model.safetensors"))
    db = tmp_path / "study" / "s.db"
    config = {**_study_config(models, tmp_path), "base": str(odd)}
    proc = run_cli("search", str(write_config(tmp_path / "s.yaml", config)), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "model.layers.1.adapter_gate.weight" in lines[0]
    assert "gemma2" in lines[0] and "mixtral" in lines[0] and "phi3" in lines[0]
    assert not db.parent.exists()


_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _as_mergekit_lays_out_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors stacked as mergekit writes them (transformers 5's in-memory form)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        m = re.match(r"^(.*layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[_MIXTRAL_NAMES.get(m[3], m[3])] = tensor
        else:
            out[name.replace("block_sparse_moe.", "mlp.")] = tensor
    for layer, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        out[f"{layer}mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate_proj"], e["up_proj"]]) for e in ordered]
        )
        out[f"{layer}mlp.experts.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    return out


@needs_mergekit
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_mergekit_rebuilds_a_mixture_of_experts_merged_without_a_density(tiny, family: str, tmp_path: Path) -> None:
    """mergekit writes experts stacked per layer (and Mixtral's router under ``mlp.``); with the same
    per-layer, per-kind coefficients its tensors are ours, stacked."""
    plan = MergePlan("task_arithmetic", MODELS, PLAN)
    ours = _as_mergekit_lays_out_experts(_ours(tiny(family), plan))
    theirs = _mergekit(tiny(family), plan, tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0, msg=name)


@needs_mergekit
def test_a_mixture_of_experts_ties_study_exports_and_says_why_mergekit_cannot_rebuild_it(tiny, tmp_path: Path) -> None:
    """Mixtral through the CLI (transformers engine): search, export. mergekit's TIES trims the
    stacked experts of a layer at once (checked: its tensors differ from ours), so the export ships
    no mergekit.yaml and its card says why; the exported folder loads and holds the merged experts."""
    from transformers import AutoModelForCausalLM

    models = tiny("mixtral")
    plan = MergePlan("ties", MODELS, PLAN)
    ours = _as_mergekit_lays_out_experts(_ours(models, plan))
    theirs = _mergekit(models, plan, tmp_path / "mk")
    stacked = "model.layers.1.mlp.experts.gate_up_proj"
    assert not torch.allclose(ours[stacked], theirs[stacked], atol=1e-3)

    db = tmp_path / "study" / "s.db"
    config = _study_config(models, tmp_path, method="ties", granularity="layer")  # trial 1: a searched TIES plan
    run_cli("search", str(write_config(tmp_path / "s.yaml", config)), cwd=tmp_path, check=True)
    out = tmp_path / "export"
    run_cli("export", str(db), "--trial", "1", "--out", str(out), cwd=tmp_path, check=True)
    assert not (out / "mergekit.yaml").exists()
    assert "over all experts of a layer at once" in (out / "README.md").read_text()
    exported = load_state_dict(out)
    assert any(".experts.3." in name for name in exported)
    base = load_state_dict(models.base)
    moved = [n for n in exported if ".experts." in n and not torch.equal(exported[n], base[n])]
    assert moved  # the experts were merged, not copied from the base
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # loads as a Mixtral


def _split_phi3(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A Phi-3 state dict with q/k/v and gate/up stored apart, under Llama's names."""
    d, n, k = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for name, tensor in state.items():
        if name.endswith("qkv_proj.weight"):
            q, kk, v = tensor.split([n * d, k * d, k * d])
            for part, t in (("q_proj", q), ("k_proj", kk), ("v_proj", v)):
                out[name.replace("qkv_proj", part)] = t
        elif name.endswith("gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[name] = tensor
    return out


def test_hila_units_own_the_same_rows_of_phi3s_fused_tensors_as_of_separate_ones(tiny) -> None:
    """Removing a head, a KV head or the MLP from a Phi-3 task vector, then splitting its fused
    tensors, is removing the same unit from the split task vector: the units are the same rows."""
    from optimizer.merge.hila._units import remove_unit, unit_slices

    models = tiny("phi3")
    config = model_config(models.base)
    base = load_state_dict(models.base)
    delta = {n: t - base[n] for n, t in load_state_dict(models.specialists["math"]).items()}
    split = _split_phi3(delta, config)
    fused_units = {u.name: u for u in unit_slices(config, delta)}
    split_units = {u.name: u for u in unit_slices({**config, "model_type": "llama"}, split)}
    assert set(fused_units) == set(split_units) and len(fused_units) == 2 * (2 + 1 + 1)  # 2 heads, 1 KV, MLP
    for name, unit in fused_units.items():
        got = _split_phi3(remove_unit(delta, unit), config)
        want = remove_unit(split, split_units[name])
        for tensor in want:
            assert torch.equal(got[tensor], want[tensor]), (name, tensor)
    owned = torch.zeros(delta["model.layers.0.self_attn.qkv_proj.weight"].shape[0], dtype=torch.int)
    for unit in fused_units.values():
        for s in unit.slices:
            if s.tensor == "model.layers.0.self_attn.qkv_proj.weight":
                owned[s.start : s.stop] += 1
    assert owned.eq(1).all()  # every q/k/v row belongs to exactly one unit


def test_hila_mlp_unit_of_a_mixture_of_experts_is_every_expert_and_the_router(tiny) -> None:
    from optimizer.merge.hila._units import unit_slices

    models = tiny("qwen2_moe")
    shapes = read_shapes(models.base)
    (mlp,) = [u for u in unit_slices(model_config(models.base), shapes) if u.name == "L01.mlp"]
    owned = {s.tensor for s in mlp.slices}
    expected = {n for n in shapes if n.startswith("model.layers.1.mlp.") and not n.endswith("layernorm.weight")}
    assert owned == expected and any(".experts.3." in n for n in owned) and any("shared_expert." in n for n in owned)
    assert "model.layers.1.mlp.gate.weight" in owned and "model.layers.1.mlp.shared_expert_gate.weight" in owned


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_hila_importance_skips_the_layers_below_each_unit_and_measures_the_same(tiny, family: str) -> None:
    """Each family's decoder stack is found under the units' own tensor names, and importance measured
    from the recorded outputs of the layers below each unit (over ragged batches) is bit for bit the
    importance measured by computing every layer."""
    from transformers import AutoModelForCausalLM

    from optimizer.merge.hila import importance_exact, unit_slices
    from optimizer.merge.hila._prefix import PrefixCache

    built = tiny(family)
    models = ModelSet(built.base, built.specialists)
    cache = PrefixCache(AutoModelForCausalLM.from_pretrained(str(models.base)))
    units = unit_slices(model_config(models.base), read_shapes(models.base))
    assert len(cache.layers) == 2 and {u.layer for u in units} == {0, 1}
    assert all(s.tensor.startswith(f"{cache.prefix}.{u.layer}.") for u in units for s in u.slices)
    golden = {m: [{"prompt": f"q{i} =", "target": f" a{i} b{i}"} for i in range(5)] for m in MODELS}
    skipped = importance_exact(models, golden, device="cpu", batch_size=2)
    assert skipped == importance_exact(models, golden, device="cpu", batch_size=2, prefix_bytes=0)
    assert any(v != 0 for row in skipped.values() for v in row.values())


@pytest.mark.parametrize("family", ["gemma2", "mixtral"])
def test_vllm_merges_gemma2_and_a_mixture_of_experts_in_place_as_transformers_does(tiny, family: str) -> None:
    """Gemma 2 (its own norms, a tied head) and Mixtral (experts vLLM's CPU build packs for its
    kernel, packed again after each in-place merge) in a live vLLM engine: its own load of the base
    and mergeopt's in-place write of it score the same, and a merge scores what the transformers
    engine (equal to the export, above) scores. Qwen3, Phi-3 and Qwen3-MoE passed the same check by
    hand (issue 21's note); two families keep the suite's engine starts down."""
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine

    models = ModelSet(tiny(family).base, tiny(family).specialists)
    zero = MergePlan("task_arithmetic", MODELS, {m: ModelParams(0.0) for m in MODELS})
    plan = MergePlan("ties", MODELS, PLAN)
    requests = [("rev: abcd =", " dcba"), ("sort: dcab =", " abcd"), ("add: 12+30 =", " 42")]
    with HFEngine(models, device="cpu") as hf:
        hf.apply_plan(plan)
        expected = [ll.logprob for ll in hf.loglikelihood(requests)]
    with VLLMEngine(models) as engine:
        fresh = [ll.logprob for ll in engine.loglikelihood(requests)]
        engine.apply_plan(zero)
        rewritten = [ll.logprob for ll in engine.loglikelihood(requests)]
        engine.apply_plan(plan)
        merged = [ll.logprob for ll in engine.loglikelihood(requests)]
    assert rewritten == pytest.approx(fresh, abs=1e-4)
    assert merged == pytest.approx(expected, abs=1e-3)
    assert merged != pytest.approx(fresh, abs=0.1)  # the merge changed the live weights


# --------------------------------------------------------------------------- vocabularies


def _resized_copy(src: Path, dst: Path, rows: int) -> Path:
    """``src`` saved as after ``resize_token_embeddings(rows)``: embedding and head cut to ``rows``."""
    from safetensors.torch import save_file

    dst.mkdir()
    for item in src.iterdir():
        if item.suffix != ".safetensors":
            (dst / item.name).write_bytes(item.read_bytes())
    state = {
        k: (v[:rows].clone() if k.endswith("embed_tokens.weight") or k == "lm_head.weight" else v)
        for k, v in load_state_dict(src).items()
    }
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_specialist_without_the_bases_padding_rows_merges_on_the_tokenizers_rows(tiny, tmp_path: Path) -> None:
    """The base pads its 259-token vocabulary to 320 rows; a specialist resized to its tokenizer
    (264 rows) still merges: token rows as the method says, padding rows the base's, in the engine
    and in the export alike."""
    from optimizer.config import StudyConfig
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.export import merged_stream
    from optimizer.search.prepare import check_models

    models = tiny("qwen3")
    code = _resized_copy(models.specialists["code"], tmp_path / "code", 264)
    config = StudyConfig.model_validate(
        {
            "name": "v",
            "base": str(models.base),
            "models": {"math": str(models.specialists["math"]), "code": str(code)},
            "objectives": [{"name": "x", "data": str(tmp_path), "metric": "nll"}],
        }
    )
    check_models(config)  # validated as a user's study is: no shape refusal
    model_set = ModelSet(models.base, {"math": models.specialists["math"], "code": code})
    plan = MergePlan("task_arithmetic", MODELS, {"math": ModelParams(0.6), "code": ModelParams(0.8)})
    base = load_state_dict(models.base)
    math, full_code = load_state_dict(models.specialists["math"]), load_state_dict(models.specialists["code"])
    name = "model.embed_tokens.weight"
    want = base[name].clone()
    want += 0.6 * (math[name] - base[name])
    want[:259] += 0.8 * (full_code[name][:259] - base[name][:259])  # the code model's token rows only
    exported = dict(merged_stream(plan, model_set).tensors)
    with HFEngine(model_set, device="cpu") as engine:
        engine.apply_plan(plan)
        live = engine.model.get_input_embeddings().weight.detach()
    for got in (live, exported[name]):
        assert got.shape == (320, 128)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


ADDED = ["<|tool|>", "<|think|>"]


def _with_added_tokens(src: Path, dst: Path, tokens: list[str], seed: int = 7) -> Path:
    """``src`` fine-tuned with ``tokens`` added: tokenizer.add_tokens, resize_token_embeddings (to
    the tokenizer's length only where the rows run out, as a padded checkpoint keeps its padding),
    the new tokens' embedding and head rows trained (random here), saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    tokenizer.add_tokens(tokens)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for token in tokens:
            i = tokenizer.convert_tokens_to_ids(token)
            for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.lm_head.weight)}.values():
                weight[i] = torch.randn(weight.shape[1], generator=gen)
    model.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def unpadded(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Llama models whose embedding has exactly the tokenizer's 259 rows, so added tokens grow it."""
    return build_tiny_models(
        tmp_path_factory.mktemp("unpadded"), names=MODELS, num_layers=2, vocab=259, delta_scale=0.05, tokenizer=True
    )


def _vocab_of(model_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)


@pytest.mark.parametrize("layout", ["padded", "unpadded", "tied"])
def test_a_specialist_that_added_tokens_merges_over_the_union_vocabulary(
    tiny, unpadded, layout: str, tmp_path: Path
) -> None:
    """The "chat" specialist is "code" with two tokens added (their rows trained). Over the union
    vocabulary, in the transformers engine: the new tokens' rows are chat's own (the only holder) under
    task arithmetic and TIES, the shared tokens' rows are what the same merge of math and code gives;
    the export loads with the union tokenizer (each new token one id) and scores as the engine.
    Padded: Qwen3 with 320 rows for 259 tokens (the new rows replace padding); unpadded: Llama with
    259 rows (the union grows them and vocab_size); tied: Gemma 2 (no head of its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.engines.hf_engine import HFEngine
    from optimizer.export import merged_stream, write_model_dir
    from optimizer.union_vocab import union_models

    models = {"padded": tiny("qwen3"), "unpadded": unpadded, "tied": tiny("gemma2")}[layout]
    chat = _with_added_tokens(models.specialists["code"], tmp_path / "chat", ADDED)
    plain = ModelSet(models.base, {"math": models.specialists["math"], "code": models.specialists["code"]})
    union = union_models(ModelSet(models.base, {"math": models.specialists["math"], "chat": chat}), tmp_path / "study")
    assert union.base == tmp_path / "study" / "union_base"
    ids, chat_ids = _vocab_of(union.base), _vocab_of(chat)
    new = [ids[t] for t in ADDED]
    assert new == [259, 260]
    rows = 261 if layout == "unpadded" else 320
    assert model_config(union.base)["vocab_size"] == rows

    held = load_state_dict(chat)
    heads = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in held]
    assert len(heads) == (1 if layout == "tied" else 2)
    flat = {m: ModelParams(p.weight, 1.0) for m, p in PLAN.items()}  # TIES keeps every entry: rows compare
    renamed = {k.replace("code", "chat"): v for k, v in flat.items()}
    prompt = torch.tensor([[1, 40, 259, 50, 260, 60, 259]])
    for method in ("task_arithmetic", "ties"):
        for params in (PLAN, flat):
            plan = MergePlan(method, ("math", "chat"), {k.replace("code", "chat"): v for k, v in params.items()})
            with HFEngine(union, device="cpu") as engine, torch.no_grad():
                engine.apply_plan(plan)
                live = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n in heads}
                logits = engine.model(prompt).logits
            for name in heads:  # the new tokens' rows: the holder's own
                assert live[name].shape[0] == rows
                for token, i in zip(ADDED, new, strict=True):
                    torch.testing.assert_close(live[name][i], held[name][chat_ids[token]], atol=1e-6, rtol=0)
        with HFEngine(plain, device="cpu") as engine:  # the shared rows: as without the added tokens
            engine.apply_plan(MergePlan(method, ("math", "code"), flat))
            usual = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n in heads}
        with HFEngine(union, device="cpu") as engine:
            engine.apply_plan(MergePlan(method, ("math", "chat"), renamed))
            shared = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n in heads}
        for name in heads:
            torch.testing.assert_close(shared[name][:259], usual[name][:259], atol=1e-6, rtol=0)
            assert not torch.allclose(shared[name][:259], load_state_dict(models.base)[name][:259], atol=1e-3)

    out = write_model_dir(tmp_path / "export", union.base, merged_stream(plan, union), {})
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert [tokenizer.encode(t, add_special_tokens=False) for t in ADDED] == [[259], [260]]
    assert tokenizer.encode("a<|tool|>b", add_special_tokens=False) == [3 + ord("a"), 259, 3 + ord("b")]
    fresh = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(prompt).logits, logits, atol=1e-5, rtol=0)


def test_a_sharded_bases_union_rewrites_only_the_shards_of_the_embedding_and_head(unpadded, tmp_path: Path) -> None:
    """The union base links the base's other shards and keeps its index; transformers loads it whole."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.union_vocab import union_models

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(str(unpadded.base), dtype=torch.float32).save_pretrained(
        str(base), max_shard_size="300KB"
    )
    AutoTokenizer.from_pretrained(str(unpadded.base)).save_pretrained(str(base))
    chat = _with_added_tokens(unpadded.specialists["code"], tmp_path / "chat", ADDED)
    union = union_models(ModelSet(base, {"math": unpadded.specialists["math"], "chat": chat}), tmp_path / "study")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    vocab_files = {index[n] for n in ("model.embed_tokens.weight", "lm_head.weight")}
    shards = sorted(union.base.glob("*.safetensors"))
    assert len(shards) > len(vocab_files) >= 1
    assert {p.name for p in shards if not p.is_symlink()} == vocab_files
    assert json.loads((union.base / "model.safetensors.index.json").read_text())["weight_map"] == index
    loaded = AutoModelForCausalLM.from_pretrained(str(union.base), dtype=torch.float32)
    state = load_state_dict(base)
    for name, tensor in loaded.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert tensor.shape[0] == 261
            torch.testing.assert_close(tensor[:259], state[name], atol=0, rtol=0)
            torch.testing.assert_close(tensor[259:], load_state_dict(chat)[name][259:], atol=0, rtol=0)
        else:
            torch.testing.assert_close(tensor, state[name], atol=0, rtol=0)


def test_an_added_special_token_stays_special_in_the_union_tokenizer(unpadded, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizer.union_vocab import union_models

    chat = tmp_path / "chat"
    tokenizer = AutoTokenizer.from_pretrained(str(unpadded.specialists["code"]))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    model = AutoModelForCausalLM.from_pretrained(str(unpadded.specialists["code"]), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(str(chat))
    tokenizer.save_pretrained(str(chat))
    union = union_models(ModelSet(unpadded.base, {"math": unpadded.specialists["math"], "chat": chat}), tmp_path / "s")
    merged = AutoTokenizer.from_pretrained(str(union.base))
    ids = merged.encode("a<|im_end|>b", add_special_tokens=False)
    assert ids == [3 + ord("a"), 259, 3 + ord("b")]
    assert merged.decode(ids, skip_special_tokens=True) == "ab"
    assert "<|im_end|>" in merged.all_special_tokens


def test_two_specialists_that_added_tokens_merge_each_token_among_its_holders(unpadded, tmp_path: Path) -> None:
    """math adds <|think|> and <|sql|>, chat <|tool|> and <|think|>: <|think|> is id 259 in math and 260
    in chat. The union (models in order, each one's tokens by id) is <|think|> 259, <|sql|> 260,
    <|tool|> 261; a token one model has keeps its row, <|think|> is the holders' mean plus each one's
    weighted deviation from it (task arithmetic), in the engine and the export alike."""
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.export import merged_stream
    from optimizer.union_vocab import union_models

    math = _with_added_tokens(unpadded.specialists["math"], tmp_path / "math", ["<|think|>", "<|sql|>"], seed=8)
    chat = _with_added_tokens(unpadded.specialists["code"], tmp_path / "chat", ADDED)
    union = union_models(ModelSet(unpadded.base, {"math": math, "chat": chat}), tmp_path / "study")
    ids = _vocab_of(union.base)
    assert [ids[t] for t in ("<|think|>", "<|sql|>", "<|tool|>")] == [259, 260, 261]
    plan = MergePlan("task_arithmetic", ("math", "chat"), {"math": ModelParams(0.3), "chat": ModelParams(0.9)})
    name = "lm_head.weight"
    m, c = load_state_dict(math)[name], load_state_dict(chat)[name]
    mean = (m[259] + c[260]) / 2
    want = {
        259: mean + 0.3 * (m[259] - mean) + 0.9 * (c[260] - mean),
        260: m[260],
        261: c[259],
    }
    exported = dict(merged_stream(plan, union).tensors)[name]
    with HFEngine(union, device="cpu") as engine:
        engine.apply_plan(plan)
        live = engine.model.lm_head.weight.detach()
    for got in (live, exported):
        assert got.shape[0] == 262
        for row, expected in want.items():
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=0)


def test_vllm_merges_over_the_union_vocabulary_as_transformers_does(unpadded, tmp_path: Path) -> None:
    """The union base (259 rows grown to 261, vocab_size with them) in a live vLLM engine: its
    tokenizer reads each new token as one id and a TIES merge scores what the transformers engine
    scores, on requests that use the new tokens."""
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine
    from optimizer.union_vocab import union_models

    chat = _with_added_tokens(unpadded.specialists["code"], tmp_path / "chat", ADDED)
    union = union_models(ModelSet(unpadded.base, {"math": unpadded.specialists["math"], "chat": chat}), tmp_path / "s")
    plan = MergePlan("ties", ("math", "chat"), {k.replace("code", "chat"): v for k, v in PLAN.items()})
    requests = [("<|tool|> rev: abcd =", " dcba<|think|>"), ("sort: dcab <|think|>", " abcd"), ("add: 12+30 =", " 42")]
    with HFEngine(union, device="cpu") as hf:
        hf.apply_plan(plan)
        expected = [ll.logprob for ll in hf.loglikelihood(requests)]
    with VLLMEngine(union) as engine:
        assert engine.tokenizer.encode("<|tool|>", add_special_tokens=False) == [259]
        fresh = [ll.logprob for ll in engine.loglikelihood(requests)]
        engine.apply_plan(plan)
        merged = [ll.logprob for ll in engine.loglikelihood(requests)]
    assert merged == pytest.approx(expected, abs=1e-3)
    assert merged != pytest.approx(fresh, abs=0.1)  # the merge changed the live weights


def test_a_study_with_a_specialist_that_added_tokens_searches_and_exports_the_union(tiny, tmp_path: Path) -> None:
    """Through the CLI (transformers engine): search builds the union base once in the study folder
    (a resumed search and the export reuse it), export ships the union tokenizer and says why there
    is no mergekit.yaml."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = tiny("qwen3")
    chat = _with_added_tokens(models.specialists["code"], tmp_path / "chat", ADDED)
    db = tmp_path / "study" / "s.db"
    config = {**_study_config(models, tmp_path), "models": {"math": str(models.specialists["math"]), "chat": str(chat)}}
    path = write_config(tmp_path / "s.yaml", config)
    proc = run_cli("search", str(path), cwd=tmp_path, check=True)
    assert "union vocabulary" in proc.stdout
    union = db.parent / "union_base"
    built = (union / "model.safetensors").stat().st_mtime_ns
    run_cli("search", str(path), cwd=tmp_path, check=True)  # resumed: the same union base, the same fingerprint
    out = tmp_path / "export"
    run_cli("export", str(db), "--trial", "1", "--out", str(out), cwd=tmp_path, check=True)
    assert (union / "model.safetensors").stat().st_mtime_ns == built  # reused, not rebuilt
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert [tokenizer.encode(t, add_special_tokens=False) for t in ADDED] == [[259], [260]]
    assert not (out / "mergekit.yaml").exists() and not (out / "mergeopt_union.json").exists()
    assert "union vocabulary" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    held = load_state_dict(chat)["model.embed_tokens.weight"]
    torch.testing.assert_close(merged.get_input_embeddings().weight[259:261].detach(), held[259:261], atol=1e-6, rtol=0)


def test_what_cannot_merge_a_union_vocabulary_is_one_line_naming_the_tokens(tiny, tmp_path: Path) -> None:
    """A method that measures on the base's vocabulary (RegMean) through the CLI, nothing written; an
    adapter whose tokenizer added tokens; an adapter that changes the embedding beside a holder."""
    from safetensors.torch import save_file

    from optimizer.config import StudyConfig
    from optimizer.errors import ModelError
    from optimizer.search.prepare import check_models

    models = tiny("qwen3")
    chat = _with_added_tokens(models.specialists["code"], tmp_path / "chat", ADDED)
    db = tmp_path / "study" / "s.db"
    holder = {"math": str(models.specialists["math"]), "chat": str(chat)}
    study = _study_config(models, tmp_path)
    config = {**study, "models": holder, "method": "regmean"}
    proc = run_cli("search", str(write_config(tmp_path / "s.yaml", config)), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "'<|tool|>'" in lines[0] and "'<|think|>'" in lines[0] and "'regmean'" in lines[0], lines[0]
    assert "resize_token_embeddings" in lines[0]
    assert not db.parent.exists()

    def adapter(folder: Path, tensors: dict[str, torch.Tensor], target: str) -> Path:
        folder.mkdir()
        body = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [target], "bias": "none"}
        (folder / "adapter_config.json").write_text(json.dumps(body))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    lora = adapter(
        tmp_path / "lora",
        {f"{q}.lora_A.weight": torch.randn(2, 128), f"{q}.lora_B.weight": torch.randn(128, 2)},
        "q_proj",
    )
    (lora / "tokenizer.json").write_bytes((chat / "tokenizer.json").read_bytes())
    e = "base_model.model.model.embed_tokens"
    embed = adapter(
        tmp_path / "embed",
        {f"{e}.lora_embedding_A": torch.randn(2, 320), f"{e}.lora_embedding_B": torch.randn(128, 2)},
        "embed_tokens",
    )
    for models_, needles in (
        ({"math": holder["math"], "lora": str(lora)}, ["adapter 'lora' adds tokens", "'<|tool|>'", "merge_and_unload"]),
        ({**holder, "embed": str(embed)}, ["adapter 'embed' changes 'model.embed_tokens.weight'", "'<|think|>'"]),
    ):
        raw = {**study, "models": models_}
        with pytest.raises(ModelError) as caught:
            check_models(StudyConfig.model_validate(raw))
        assert "\n" not in str(caught.value) and all(n in str(caught.value) for n in needles), caught.value


# --------------------------------------------------------------------------- experts apart


def test_an_experts_scope_steers_that_expert_alone(tiny) -> None:
    models = tiny("mixtral")
    joint = _ours(models, MergePlan("task_arithmetic", MODELS, PLAN))
    apart = _ours(models, MergePlan("task_arithmetic", MODELS, {**PLAN, "math.L01.mlp.e02": ModelParams(0.0)}))
    changed = sorted(n for n in joint if not torch.equal(joint[n], apart[n]))
    assert changed == [f"model.layers.1.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w2", "w3")]
    base = load_state_dict(models.base)
    code = load_state_dict(models.specialists["code"])
    name = changed[0]
    want = base[name] + 0.9 * (code[name] - base[name])  # code.mlp = 0.9; math's share switched off
    torch.testing.assert_close(apart[name], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("family", "router"),
    [("mixtral", ["block_sparse_moe.gate"]), ("qwen2_moe", ["mlp.gate", "mlp.shared_expert_gate"])],
)
def test_a_router_scope_steers_the_router_alone(tiny, family: str, router: list[str]) -> None:
    models = tiny(family)
    joint = _ours(models, MergePlan("task_arithmetic", MODELS, PLAN))
    apart = _ours(models, MergePlan("task_arithmetic", MODELS, {**PLAN, "math.L01.mlp.router": ModelParams(0.0)}))
    changed = sorted(n for n in joint if not torch.equal(joint[n], apart[n]))
    assert changed == sorted(f"model.layers.1.{r}.weight" for r in router)


def test_a_study_can_search_each_expert_apart_and_export_it(tiny, tmp_path: Path) -> None:
    """``experts: each``: every expert of every layer is a parameter; the export merges what the
    trial's plan says, expert by expert, and ships no mergekit.yaml (mergekit cannot say it)."""
    import optuna

    from optimizer.merge.plan import MergePlan as Plan

    models = tiny("mixtral")
    config = _study_config(models, tmp_path, granularity="layer", split_modules=True, experts="each")
    run_cli("search", str(write_config(tmp_path / "s.yaml", config)), cwd=tmp_path, check=True)
    db = tmp_path / "study" / "s.db"
    trial = optuna.load_study(study_name="moe", storage=f"sqlite:///{db}").trials[1]
    assert {f"math.L01.mlp.e0{e}.weight" for e in range(4)} <= set(trial.params)
    assert "math.L01.mlp.weight" in trial.params  # the router, norm (and shared experts) keep the MLP's
    out = tmp_path / "export"
    run_cli("export", str(db), "--trial", "1", "--out", str(out), cwd=tmp_path, check=True)
    assert not (out / "mergekit.yaml").exists()
    card = " ".join((out / "README.md").read_text().split())
    assert "cannot give an expert (or the router) coefficients of its own" in card
    plan = Plan.from_dict(json.loads((out / "mergeopt.json").read_text())["plan"])
    want = _ours(models, plan)
    got = load_state_dict(out)
    for name in ("model.layers.1.block_sparse_moe.experts.3.w2.weight", "model.layers.1.block_sparse_moe.gate.weight"):
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_experts_each_on_a_dense_model_is_one_line(tiny, tmp_path: Path) -> None:
    config = _study_config(tiny("qwen3"), tmp_path, granularity="layer", experts="each")
    proc = run_cli("search", str(write_config(tmp_path / "s.yaml", config)), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "experts: each needs a mixture-of-experts model" in lines[0], proc.stderr
    assert not (tmp_path / "study").exists()

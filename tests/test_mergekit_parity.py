"""Exported plans rebuild the same model in real mergekit, tensor for tensor.

Tiny random Llama models (``tests/_tiny_models.py``) are merged twice: by our merge core and by
mergekit 0.1.5 running the YAML that ``optimizer.mergekit_yaml`` writes. Deterministic methods
must agree to 1e-6 in fp32 for a model-wise plan and for a per-layer plan that touches every
mechanism (layer, layer × kind, kind, embed and head scopes, a zero and a negative weight). DARE
draws its masks from another RNG, so there we compare what the masks must preserve: the kept
fraction, the rescale, and the expected merged delta.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from optimizer.checkpoints import load_state_dict
from optimizer.errors import ConfigError
from optimizer.merge import MergePlan, ModelParams, merge_state_dict, method_names, task_vectors
from optimizer.merge import _registry as registry
from optimizer.mergekit_yaml import plan_to_mergekit, to_yaml
from optimizer.models import describe
from tests._tiny_models import build_tiny_models

needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit not installed (pip install -e .[dev])"
)

MODELS = ("math", "code", "chat")
MODEL_WISE = {
    "math": ModelParams(0.7, 0.3),
    "code": ModelParams(0.5, 0.45),
    "chat": ModelParams(-0.2, 0.6),
}
PER_LAYER = {
    **MODEL_WISE,
    "math.L01": ModelParams(0.2, 0.7),  # whole layer
    "math.L02.attn": ModelParams(1.3, 0.15),  # one module kind of one layer
    "math.embed": ModelParams(0.4, 0.5),
    "code.mlp": ModelParams(0.9, 0.25),  # a kind across all layers...
    "code.L03": ModelParams(0.1, 0.9),  # ...overridden by a layer
    "code.head": ModelParams(0.33, 0.35),  # final norm + lm_head
    "chat.L00.mlp": ModelParams(0.0, 0.5),  # switched off in one block
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tiny = build_tiny_models(tmp_path_factory.mktemp("llama"), names=MODELS)
    base = load_state_dict(tiny.base)
    deltas = task_vectors(base, [load_state_dict(tiny.specialists[m]) for m in MODELS])
    return SimpleNamespace(tiny=tiny, base=base, deltas=deltas)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These tensors are tiny: on a shared 2-core box, waking torch's intra-op pool for each op
    # costs milliseconds and made the module ~40x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _yaml(plan: MergePlan, tiny) -> str:
    return to_yaml(plan, base_path=tiny.base, model_paths=tiny.specialists, num_layers=tiny.num_layers)


def _mergekit(plan: MergePlan, tiny, out: Path) -> dict[str, torch.Tensor]:
    """Run mergekit in-process on the YAML text, exactly as ``mergekit-yaml`` parses it."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(_yaml(plan, tiny)))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # local paths only: any hub access is a bug
        run_merge(config, str(out), options=options)
    return load_state_dict(out)


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        diff = (tensor - theirs[name]).abs().max().item()
        assert torch.allclose(tensor, theirs[name], atol=1e-6, rtol=0), f"{name}: max |Δ| {diff:.3g}"


# --------------------------------------------------------------------------- exact parity

CASES = [
    ("linear", {}),
    ("linear", {"normalize": False}),
    ("task_arithmetic", {"lambda": 0.9}),
    ("ties", {}),
    ("ties", {"rescale": True, "lambda": 0.8}),
    ("breadcrumbs", {"gamma": 0.05}),
    ("breadcrumbs_ties", {"normalize": True}),
    ("multislerp", {}),
    ("multislerp", {"normalize_weights": False}),
]


@needs_mergekit
@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{'-'.join(o) or 'defaults'}" for m, o in CASES])
def test_deterministic_methods_match_mergekit(llama, tmp_path, method, options, granularity):
    params = MODEL_WISE if granularity == "model" else PER_LAYER
    plan = MergePlan(method, MODELS, params, options)
    ours = merge_state_dict(plan, llama.base, llama.deltas)
    _assert_same(ours, _mergekit(plan, llama.tiny, tmp_path / "out"))
    if granularity == "layer":
        # Not vacuous: the per-layer values really differ from the model-wise merge.
        flat = merge_state_dict(MergePlan(method, MODELS, MODEL_WISE, options), llama.base, llama.deltas)
        for name in ("model.layers.2.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
            assert not torch.allclose(ours[name], flat[name], atol=1e-6), name


@needs_mergekit
def test_qwen2_with_biases_and_tied_head_matches_mergekit(tmp_path_factory):
    tiny = build_tiny_models(
        tmp_path_factory.mktemp("qwen2"), names=("math", "code"), family="qwen2", tie_word_embeddings=True
    )
    base = load_state_dict(tiny.base)
    deltas = task_vectors(base, [load_state_dict(tiny.specialists[m]) for m in ("math", "code")])
    params = {
        "math": ModelParams(0.7, 0.3),
        "code": ModelParams(0.5, 0.45),
        "math.L02.attn": ModelParams(1.2, 0.5),
        "code.embed": ModelParams(0.8, 0.6),
        "code.head": ModelParams(0.3, 0.6),  # tied: only the final norm is a head tensor
    }
    plan = MergePlan("ties", ("math", "code"), params)
    ours = merge_state_dict(plan, base, deltas)
    assert "model.layers.0.self_attn.q_proj.bias" in ours
    assert "lm_head.weight" not in ours  # the tied head is the merged embedding
    _assert_same(ours, _mergekit(plan, tiny, tmp_path_factory.mktemp("qwen2_out")))


@needs_mergekit
@pytest.mark.slow
def test_mergekit_cli_runs_the_exported_file(llama, tmp_path):
    """The file itself, through the ``mergekit-yaml`` command users run (one run: it is slow)."""
    cli = Path(sys.executable).with_name("mergekit-yaml")
    if not cli.exists():
        pytest.skip("mergekit-yaml not on this interpreter's bin path")
    plan = MergePlan("ties", MODELS, PER_LAYER)
    config = tmp_path / "merge.yml"
    config.write_text(_yaml(plan, llama.tiny))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(cli), str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same(merge_state_dict(plan, llama.base, llama.deltas), load_state_dict(tmp_path / "out"))


@needs_mergekit
def test_method_defaults_are_mergekits():
    from mergekit.merge_methods import registry as mk_registry

    checked = 0
    for name in method_names():
        method = registry.get_method(name)
        if method.mergekit is None or method.mergekit != name:
            continue  # variants of a mergekit method (hi_merging = ties unnormalized) differ on purpose
        spec = {p.name: p for p in mk_registry.get(method.mergekit).spec.parameters}
        for option, value in method.options.items():
            if option in spec:
                assert value == spec[option].default, f"{name}.{option}: ours {value}, mergekit {spec[option].default}"
                checked += 1
    assert checked >= 15


def test_a_variant_writes_the_options_where_it_differs_from_mergekit(llama):
    """hi_merging is mergekit's ties without normalisation: its YAML must say so explicitly."""
    import yaml

    plan = MergePlan("hi_merging", MODELS, {m: ModelParams(0.7, 0.5) for m in MODELS})
    config = yaml.safe_load(_yaml(plan, llama.tiny))
    assert config["merge_method"] == "ties" and config["parameters"]["normalize"] is False


# --------------------------------------------------------------------------- DARE: statistics


def _merged_deltas(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
    return [state[n] - base[n] for n in base if describe(n).kind == kind]


@needs_mergekit
def test_dare_per_layer_keep_rate_and_rescale_match_mergekit(llama, tmp_path):
    densities = {"attn": 0.3, "mlp": 0.7, "embed": 0.5}
    params = {
        "math": ModelParams(1.0, 0.5),
        "math.attn": ModelParams(1.0, densities["attn"]),
        "math.mlp": ModelParams(1.0, densities["mlp"]),
    }
    plan = MergePlan("dare_linear", ("math",), params, {"seed": 0})
    ours = merge_state_dict(plan, llama.base, {n: d[:1] for n, d in llama.deltas.items()})
    theirs = _mergekit(plan, llama.tiny, tmp_path / "out")
    tau = {n: d[0] for n, d in llama.deltas.items()}
    for kind, d in densities.items():
        taus = [tau[n] for n in llama.base if describe(n).kind == kind]
        for label, state in (("ours", ours), ("mergekit", theirs)):
            merged = torch.cat([x.flatten() for x in _merged_deltas(state, llama.base, kind)])
            original = torch.cat([x.flatten() for x in taus])
            kept = merged != 0
            assert kept.float().mean().item() == pytest.approx(d, abs=0.01), (label, kind)
            # Survivors are scaled by ≈1/d: exactly for us, by an L1-norm match for mergekit.
            ratio = (merged[kept] / original[kept]).mean().item()
            assert ratio == pytest.approx(1 / d, rel=0.03 if label == "mergekit" else 1e-5), (label, kind)


def _random_merges(llama, tmp_path, method):
    """Flattened projection deltas of ours, mergekit's and the same merge without dropping (what a
    random drop should preserve in expectation), for a model-wise plan of ``method``."""
    plan = MergePlan(method, MODELS, MODEL_WISE, {"seed": 0})
    ours = merge_state_dict(plan, llama.base, llama.deltas)
    theirs = _mergekit(plan, llama.tiny, tmp_path / "out")
    undropped = {m: ModelParams(p.weight, 1.0) for m, p in MODEL_WISE.items()}
    reference = merge_state_dict(MergePlan(method, MODELS, undropped), llama.base, llama.deltas)

    def flat(state):
        return torch.cat([(state[n] - llama.base[n]).flatten() for n in llama.base if n.endswith("proj.weight")])

    ref, a, b = flat(reference), flat(ours), flat(theirs)
    assert not torch.equal(a, b)  # different RNGs: equal tensors would mean no dropping happened
    assert (a == 0).float().mean().item() == pytest.approx((b == 0).float().mean().item(), abs=0.01)
    return ref, a, b


@needs_mergekit
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_merge_matches_mergekit_in_distribution(llama, tmp_path, method):
    ref, a, b = _random_merges(llama, tmp_path, method)
    assert a.abs().mean().item() == pytest.approx(b.abs().mean().item(), rel=0.03)
    proj_a = (a @ ref / (ref @ ref)).item()
    proj_b = (b @ ref / (ref @ ref)).item()
    assert proj_a == pytest.approx(proj_b, abs=0.03)
    if method == "dare_linear":  # unbiased: E[merged delta] is task arithmetic
        assert proj_a == pytest.approx(1.0, abs=0.03) and proj_b == pytest.approx(1.0, abs=0.03)


# --------------------------------------------------------------------------- the YAML itself


def _paths(tmp: Path) -> dict[str, Path]:
    return {m: tmp / m for m in MODELS}


def test_model_wise_plan_is_plain_per_model_parameters(tmp_path):
    plan = MergePlan("ties", MODELS, MODEL_WISE, {"seed": 3})
    config = plan_to_mergekit(plan, base_path=tmp_path / "base", model_paths=_paths(tmp_path), num_layers=4)
    assert config["merge_method"] == "ties" and config["base_model"] == str(tmp_path / "base")
    assert config["models"][2] == {"model": str(tmp_path / "chat"), "parameters": {"weight": -0.2, "density": 0.6}}
    # Every option spelled out (mergekit's defaults can never leak in); the seed is not a parameter.
    assert config["parameters"] == {"normalize": True, "lambda": 1.0, "rescale": False}
    assert config["dtype"] == config["out_dtype"] == "float32"


def test_linear_has_no_base_and_no_density(tmp_path):
    plan = MergePlan("linear", MODELS, MODEL_WISE)
    config = plan_to_mergekit(plan, base_path=tmp_path / "base", model_paths=_paths(tmp_path), num_layers=4)
    assert "base_model" not in config
    assert config["models"][0]["parameters"] == {"weight": 0.7}
    assert config["parameters"] == {"normalize": True}


def test_method_specific_options_are_explicit(tmp_path):
    def params(method: str) -> dict:
        plan = MergePlan(method, MODELS, MODEL_WISE)
        return plan_to_mergekit(plan, base_path=tmp_path, model_paths=_paths(tmp_path), num_layers=4)["parameters"]

    assert params("task_arithmetic") == {"lambda": 1.0, "normalize": False}
    assert params("dare_ties") == {"normalize": False, "lambda": 1.0, "rescale": True}
    assert params("breadcrumbs")["gamma"] == 0.01


def test_per_layer_plan_becomes_filter_conditions(tmp_path):
    plan = MergePlan("ties", MODELS, PER_LAYER)
    config = plan_to_mergekit(plan, base_path=tmp_path / "b", model_paths=_paths(tmp_path), num_layers=4)
    math, code, chat = (m["parameters"] for m in config["models"])
    assert math["weight"] == [
        {"filter": "layers.1.", "value": 0.2},
        {"filter": "layers.2.self_attn.", "value": 1.3},
        {"filter": "layers.2.input_layernorm.", "value": 1.3},
        {"filter": "embed_tokens.", "value": 0.4},
        {"value": 0.7},
    ]
    # A kind scope is one condition for all layers, after the layer that overrides it.
    assert code["density"] == [
        {"filter": "layers.3.", "value": 0.9},
        {"filter": "mlp.", "value": 0.25},
        {"filter": "post_attention_layernorm.", "value": 0.25},
        {"filter": "model.norm.", "value": 0.35},
        {"filter": "lm_head.", "value": 0.35},
        {"value": 0.45},
    ]
    assert chat["weight"][:2] == [
        {"filter": "layers.0.mlp.", "value": 0.0},
        {"filter": "layers.0.post_attention_layernorm.", "value": 0.0},
    ]
    assert yaml.safe_load(to_yaml(plan, base_path=tmp_path / "b", model_paths=_paths(tmp_path), num_layers=4)) == config


def test_layer_filters_do_not_match_other_layers():
    # mergekit's filter is a substring test; "layers.1." must not catch layers 10-19.
    assert "layers.1." in "model.layers.1.mlp.up_proj.weight"
    assert "layers.1." not in "model.layers.11.mlp.up_proj.weight"
    assert "layers.1." not in "model.layers.21.self_attn.q_proj.weight"
    assert "mlp." not in "model.layers.3.post_attention_layernorm.weight"
    assert "model.norm." not in "model.layers.3.input_layernorm.weight"


def test_export_refusals(tmp_path, monkeypatch):
    kw = {"base_path": tmp_path / "b", "num_layers": 4}
    with pytest.raises(ConfigError, match="no model path for 'chat'"):
        plan_to_mergekit(MergePlan("ties", MODELS), model_paths={"math": tmp_path, "code": tmp_path}, **kw)
    deep = MergePlan("ties", MODELS, {"math.L04.mlp": ModelParams(0.5, 0.5)})
    with pytest.raises(ConfigError, match=r"'math.L04.mlp' names layer 4 but num_layers is 4"):
        plan_to_mergekit(deep, model_paths=_paths(tmp_path), **kw)
    odd = {**_paths(tmp_path), "code": tmp_path / "lora+adapter"}
    with pytest.raises(ConfigError, match="LoRA or revision separator"):
        plan_to_mergekit(MergePlan("ties", MODELS), model_paths=odd, **kw)

    # 0.7 + 0.5 − 1.2 = 0 in layer 1's MLP only.
    off = MergePlan("linear", MODELS, {**MODEL_WISE, "chat.L01.mlp": ModelParams(-1.2)})
    with pytest.raises(ConfigError, match="weights summing to 0 for layer 1 mlp"):
        plan_to_mergekit(off, model_paths=_paths(tmp_path), **kw)

    local = registry.MergeMethod(name="local_only", merge=lambda *a: a[0], summary="test")
    monkeypatch.setitem(registry._REGISTRY, "local_only", local)
    with pytest.raises(ConfigError, match=r"'local_only' has no mergekit equivalent.*methods that can: .*ties"):
        plan_to_mergekit(MergePlan("local_only", MODELS), model_paths=_paths(tmp_path), **kw)


def test_relative_paths_are_written_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = {m: Path(m) for m in MODELS}
    config = plan_to_mergekit(MergePlan("ties", MODELS), base_path=Path("base"), model_paths=rel, num_layers=2)
    assert config["base_model"] == str(tmp_path.resolve() / "base")
    assert all(Path(m["model"]).is_absolute() for m in config["models"])


@pytest.fixture(scope="module")
def aligned(llama, tmp_path_factory) -> SimpleNamespace:
    """Specialists whose task vectors share a direction (independent random ones are orthogonal,
    where Model Stock just keeps the base): θₘ = θ₀ + ½τ₁ + ½τₘ."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("aligned")
    shared = llama.deltas
    paths = {}
    for i, m in enumerate(MODELS):
        state = {k: (b + 0.5 * shared[k][0] + 0.5 * shared[k][i]).contiguous() for k, b in llama.base.items()}
        paths[m] = root / m
        paths[m].mkdir()
        save_file(state, str(paths[m] / "model.safetensors"), metadata={"format": "pt"})
        (paths[m] / "config.json").write_text((llama.tiny.base / "config.json").read_text())
    tiny = SimpleNamespace(base=llama.tiny.base, specialists=paths, num_layers=llama.tiny.num_layers)
    deltas = task_vectors(llama.base, [load_state_dict(paths[m]) for m in MODELS])
    return SimpleNamespace(tiny=tiny, base=llama.base, deltas=deltas)


@needs_mergekit
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(aligned, tmp_path, filter_wise):
    """Parameter-free: the plan's weights do not apply, only the angle between task vectors."""
    plan = MergePlan("model_stock", MODELS, PER_LAYER, {"filter_wise": filter_wise})
    ours = merge_state_dict(plan, aligned.base, aligned.deltas)
    _assert_same(ours, _mergekit(plan, aligned.tiny, tmp_path / "out"))
    _assert_same(
        ours, merge_state_dict(MergePlan("model_stock", MODELS, {}, plan.options), aligned.base, aligned.deltas)
    )
    name = "model.layers.1.mlp.up_proj.weight"
    moved = (ours[name] - aligned.base[name]).norm() / torch.stack(aligned.deltas[name]).mean(0).norm()
    assert 0.3 < moved < 0.95  # t: well inside (0, 1), not the base and not the plain average


@needs_mergekit
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_mergekit(aligned, tmp_path, select_topk):
    """Select (variance), calculate (energy weights), erase (sign): the plan's weights do not apply."""
    plan = MergePlan("sce", MODELS, PER_LAYER, {"select_topk": select_topk})
    ours = merge_state_dict(plan, aligned.base, aligned.deltas)
    _assert_same(ours, _mergekit(plan, aligned.tiny, tmp_path / "out"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.allclose(ours[name], aligned.base[name])
    if select_topk < 1:  # entries outside the selected share keep the base
        untouched = (ours[name] == aligned.base[name]).float().mean().item()
        assert 0.6 < untouched < 0.8, untouched


@needs_mergekit
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merge_matches_mergekit_in_distribution(llama, tmp_path, method):
    """Random masks from different RNGs, and survivors rescaled by 1/p (ours, the paper's) or to the
    L1 norm (mergekit's, which keeps large entries' excess: its linear merge overshoots by ~7 %): the
    same share kept, the same mass, the same direction."""
    ref, a, b = _random_merges(llama, tmp_path, method)
    assert a.abs().mean().item() == pytest.approx(b.abs().mean().item(), rel=0.05)
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, ref, dim=0).item() == pytest.approx(cos(b, ref, dim=0).item(), abs=0.03)  # same direction
    if method == "della_linear":  # ours is unbiased: E[merged delta] is task arithmetic
        assert (a @ ref / (ref @ ref)).item() == pytest.approx(1.0, abs=0.03)


def test_della_densities_mergekit_refuses_ship_no_yaml():
    """mergekit raises on a density within epsilon of 0 or 1; such an export says so instead."""
    from optimizer.export import mergekit_gap
    from optimizer.families import LLAMA
    from optimizer.merge import get_method

    della = get_method("della")
    fine = MergePlan("della", MODELS, MODEL_WISE)
    near_zero = MergePlan("della", MODELS, {**MODEL_WISE, "math.L01": ModelParams(1.0, 0.1)})
    assert mergekit_gap(della, LLAMA, fine) is None
    assert "within epsilon (0.15) of 0 or 1" in (mergekit_gap(della, LLAMA, near_zero) or "")
    narrow = MergePlan("della", MODELS, near_zero.params, {"epsilon": 0.05})
    assert mergekit_gap(della, LLAMA, narrow) is None

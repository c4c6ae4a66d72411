"""WIDEN and RegMean on hand-built tensors, plus RegMean's Gram collection on a tiny Llama.

Expected values come from the formulas in docs/methods.md (worked out in the comments) or from an
independent computation (``torch.linalg.lstsq`` for RegMean's least squares, a hook on the layer
norm for the Grams), never from the code under test.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from optimizer.errors import ConfigError
from optimizer.merge import MergePlan, ModelParams, get_method, merge_tensor
from optimizer.merge.regmean import (
    REGMEAN,
    GramCollector,
    RegMeanMerge,
    collect_grams,
    gram_key,
    regmean_fallback,
    regmean_method,
    regmean_solve,
)
from optimizer.merge.widen import WIDEN, column_differences, fractional_rank, merge_widen, widen_weights

GEN = torch.Generator()
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny tensors: torch's intra-op pool only costs time here (see test_merge_methods.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def widen(base, deltas, weights=None, **options) -> torch.Tensor:
    params = [ModelParams(w) for w in (weights or [1.0] * len(deltas))]
    return merge_widen("model.layers.0.mlp.up_proj.weight", base, deltas, params, {**WIDEN.options, **options}, GEN)


def ones(n: int) -> list[ModelParams]:
    return [ModelParams(1.0)] * n


# =========================================================================== WIDEN


def test_widen_is_registered_with_paper_defaults():
    m = get_method("widen")
    assert m is WIDEN and m.mergekit is None and m.uses_weight and not m.uses_density
    assert m.options == {"t": 1.0, "s": 1.0, "temperature": 1.0, "calibrate": True, "per_token_embeddings": True}


def test_fractional_rank_averages_ties():
    # Row [3, 1, 2, 1]: sorted 1, 1, 2, 3 → the two 1s share ranks 0 and 1 (0.5); 2 → 2; 3 → 3; ÷ 4.
    ranks = fractional_rank(torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(ranks, torch.tensor([[0.75, 0.125, 0.5, 0.125], [0.375] * 4]))


def test_column_differences_match_norms_and_cosines():
    torch.manual_seed(0)
    a, tau = torch.randn(7, 5, dtype=F64), torch.randn(7, 5, dtype=F64)
    b = a + tau
    dm, dd = column_differences(a, tau)
    assert torch.allclose(dm, (b.norm(dim=0) - a.norm(dim=0)).abs())
    assert torch.allclose(dd, 1 - torch.cosine_similarity(b, a, dim=0))


def test_column_differences_stay_accurate_for_fine_tune_sized_deltas_in_fp32():
    # τ ~ 1e-4 of the weights turns each column by ~1e-4 rad: 1 − cos ~ 1e-8, below fp32's epsilon.
    torch.manual_seed(1)
    a = torch.randn(64, 16, dtype=F64)
    tau = 1e-4 * torch.randn(64, 16, dtype=F64)
    dm64, dd64 = column_differences(a, tau)
    dm32, dd32 = column_differences(a.float(), tau.float())
    assert torch.allclose(dm32.double(), dm64, rtol=1e-3)
    assert torch.allclose(dd32.double(), dd64, rtol=1e-3)


def test_column_differences_of_zero_columns():
    a = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    tau = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    dm, dd = column_differences(a, tau)
    # Column 0 stays zero (no change); column 1 appears (norm +2, direction "orthogonal");
    # column 2 vanishes (norm −1, direction lost).
    assert torch.allclose(dm, torch.tensor([0.0, 2.0, 1.0]))
    assert torch.allclose(dd, torch.tensor([0.0, 1.0, 1.0]))


# Base columns c0 = e0, c1 = e1. Model A turns column 0 onto e1 (norm kept); B doubles column 1.
BASE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TAU_A = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
TAU_B = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
# ΔM_A = [0, 0], ΔD_A = [1, 0], ΔM_B = [0, 1], ΔD_B = [0, 0]. Ranks (÷2, ties averaged):
# M_A [.25, .25], D_A [.5, 0], M_B [0, .5], D_B [.25, .25]. Softmax across models per column:
# S^M: col0 A σ(.25), col1 A σ(−.25); S^D: col0 A σ(.25), col1 A σ(−.25); B gets the rest.


def test_widen_hand_case_without_calibration():
    w = sigmoid(0.25)
    weights = widen_weights(BASE, [TAU_A, TAU_B], {"calibrate": False})
    assert torch.allclose(weights, torch.tensor([[w, 1 - w], [1 - w, w]]))
    out = widen(BASE, [TAU_A, TAU_B], calibrate=False)
    # col0 = e0 + w·(−1, 1); col1 = e1 + w·(0, 1): each column takes mostly its own model's delta.
    assert torch.allclose(out, torch.tensor([[1 - w, 0.0], [w, 1 + w]]))


def test_widen_hand_case_with_paper_calibration():
    # Each model's mean rank is .25 (k = 2); ranks above t·mean = .25: D_A col0 (.5) and M_B col1 (.5).
    # Those scores become s; so w_A,col0 = ½(σ(.25) + s) and w_B,col1 = ½(s + σ(.25)).
    s = 0.8
    w = 0.5 * (sigmoid(0.25) + s)
    weights = widen_weights(BASE, [TAU_A, TAU_B], {"t": 1.0, "s": s})
    assert torch.allclose(weights, torch.tensor([[w, 1 - sigmoid(0.25)], [1 - sigmoid(0.25), w]]))
    out = widen(BASE, [TAU_A, TAU_B], s=s)
    assert torch.allclose(out, torch.tensor([[1 - w, 0.0], [w, 1 + w]]))


def test_widen_threshold_above_max_rank_turns_calibration_off():
    # Ranks never exceed (k−1)/k = 2·mean, so t = 3 leaves the plain softmax.
    on = widen_weights(BASE, [TAU_A, TAU_B], {"t": 3.0, "s": 5.0})
    off = widen_weights(BASE, [TAU_A, TAU_B], {"calibrate": False})
    assert torch.allclose(on, off)


def _owned_columns() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A remakes column 0 (×3 plus an orthogonal part: big magnitude and direction change), B column 1;
    # everything else moves by ~1e-3.
    torch.manual_seed(2)
    base = torch.randn(6, 3)
    tau_a, tau_b = 1e-3 * torch.randn(6, 3), 1e-3 * torch.randn(6, 3)
    for tau, j in ((tau_a, 0), (tau_b, 1)):
        col = base[:, j]
        ortho = torch.randn(6)
        ortho -= (ortho @ col) / (col @ col) * col
        tau[:, j] = 2 * col + ortho * (col.norm() / ortho.norm())
    return base, tau_a, tau_b


def test_widen_low_temperature_gives_each_column_to_the_model_that_changed_it():
    base, tau_a, tau_b = _owned_columns()
    out = widen(base, [tau_a, tau_b], temperature=1e-3, calibrate=False)
    assert torch.allclose(out[:, 0], base[:, 0] + tau_a[:, 0], atol=1e-5)
    assert torch.allclose(out[:, 1], base[:, 1] + tau_b[:, 1], atol=1e-5)


def test_widen_weighs_the_token_embedding_per_token_as_its_authors_do():
    """An embedding (tokens × hidden) where A remade token 0 and B token 1: each keeps its token's
    row. Per hidden dimension (the option off) every row is a mix of both models."""
    base, tau_a, tau_b = (t.T.contiguous() for t in _owned_columns())  # 3 tokens × 6 dims
    params = [ModelParams(1.0)] * 2

    def embed(per_token: bool) -> torch.Tensor:
        options = {**WIDEN.options, "temperature": 1e-3, "calibrate": False, "per_token_embeddings": per_token}
        return merge_widen("model.embed_tokens.weight", base, [tau_a, tau_b], params, options, GEN)

    out = embed(True)
    assert torch.allclose(out[0], base[0] + tau_a[0], atol=1e-5)
    assert torch.allclose(out[1], base[1] + tau_b[1], atol=1e-5)
    assert not torch.allclose(embed(False)[0], base[0] + tau_a[0], atol=1e-2)


def test_widen_high_temperature_is_plain_average():
    base, tau_a, tau_b = _owned_columns()
    out = widen(base, [tau_a, tau_b], temperature=1e6, calibrate=False)
    assert torch.allclose(out, base + (tau_a + tau_b) / 2, atol=1e-5)
    vec = widen(torch.zeros(3), [torch.tensor([1.0, 0.0, 2.0]), torch.zeros(3)], temperature=1e6, calibrate=False)
    assert torch.allclose(vec, torch.tensor([0.5, 0.0, 1.0]), atol=1e-5)


def test_widen_weights_sum_to_one_per_column_without_calibration():
    torch.manual_seed(3)
    base = torch.randn(5, 8)
    deltas = [torch.randn(5, 8) for _ in range(3)]
    weights = widen_weights(base, deltas, {"calibrate": False})
    assert weights.shape == (3, 8)
    assert torch.allclose(weights.sum(dim=0), torch.ones(8))


def test_widen_identical_deltas_give_base_plus_delta():
    torch.manual_seed(4)
    base, tau = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(widen(base, [tau, tau, tau], calibrate=False), base + tau, atol=1e-6)
    vec, tv = torch.randn(6), torch.randn(6)
    assert torch.allclose(widen(vec, [tv, tv], calibrate=False), vec + tv, atol=1e-6)


def test_widen_single_model_at_weight_one_returns_that_model():
    # One model: softmax over one is 1, calibrated entries get s = 1, so every weight is 1.
    torch.manual_seed(5)
    base, tau = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(widen(base, [tau]), base + tau)
    vec, tv = torch.randn(6), torch.randn(6)
    assert torch.allclose(widen(vec, [tv]), vec + tv)


def test_widen_one_dimensional_uses_abs_delta_directly():
    base = torch.tensor([0.5, 0.5])
    tau_a, tau_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # No ranking: softmax of |τ| across models. Entry 0: A σ(1), B σ(−1) (B's τ is 0 there);
    # entry 1 mirrored. Merged = base + [σ(1)·1, σ(1)·1].
    out = widen(base, [tau_a, tau_b], calibrate=False)
    assert torch.allclose(out, base + sigmoid(1.0))
    # Calibration: each model's mean |τ| is .5; the entry at 1 > t·.5 gets s.
    out = widen(base, [tau_a, tau_b], s=0.8)
    assert torch.allclose(out, base + 0.8)


def test_widen_lambda_scales_each_model_after_scoring():
    base, tau_a, tau_b = _owned_columns()
    full, a_off = widen(base, [tau_a, tau_b], [1.0, 1.0]), widen(base, [tau_a, tau_b], [0.0, 1.0])
    half = widen(base, [tau_a, tau_b], [0.5, 1.0])
    # Scores do not depend on λ, so the merge is affine in λ_A.
    assert torch.allclose(half, (full + a_off) / 2, atol=1e-6)
    assert torch.allclose(widen(base, [tau_a, tau_b], [0.0, 0.0]), base)


def test_widen_dtypes():
    base, tau = torch.randn(4, 6).bfloat16(), torch.randn(4, 6).bfloat16()
    out = widen(base, [tau])
    assert out.dtype == torch.bfloat16
    ids = torch.arange(4)
    assert torch.equal(widen(ids, [torch.ones(4, dtype=torch.long)]), ids)


def test_widen_rejects_nonpositive_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        widen(BASE, [TAU_A], temperature=0.0)


# =========================================================================== RegMean: maths


def _problem(models: int = 3, rows: int = 20, inp: int = 5, out: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(rows, inp, dtype=F64, generator=g) for _ in range(models)]
    ws = [torch.randn(out, inp, dtype=F64, generator=g) for _ in range(models)]
    return xs, ws, [x.T @ x for x in xs]


def test_regmean_alpha_one_is_least_squares_on_all_inputs():
    xs, ws, grams = _problem()
    # argmin_W Σ ‖X_m Wᵀ − X_m W_mᵀ‖²: one least-squares problem on the stacked inputs.
    stacked_x = torch.cat(xs)
    targets = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    expected = torch.linalg.lstsq(stacked_x, targets).solution.T
    assert torch.allclose(regmean_solve(ws, grams, 1.0), expected, atol=1e-5)


def test_regmean_lambdas_weight_the_regression():
    xs, ws, grams = _problem()
    lam = [2.0, 0.5, 1.0]
    # Σ λ_m ‖X_m(W − W_m)ᵀ‖² is least squares on rows scaled by √λ_m.
    stacked_x = torch.cat([math.sqrt(lm) * x for lm, x in zip(lam, xs, strict=True)])
    targets = torch.cat([math.sqrt(lm) * x @ w.T for lm, x, w in zip(lam, xs, ws, strict=True)])
    expected = torch.linalg.lstsq(stacked_x, targets).solution.T
    assert torch.allclose(regmean_solve(ws, grams, 1.0, lam), expected, atol=1e-5)
    # λ = 2 counts a model twice; a common factor changes nothing; λ = 0 drops a model.
    twice = regmean_solve([ws[0], ws[0], ws[1]], [grams[0], grams[0], grams[1]], 0.7)
    assert torch.allclose(regmean_solve(ws[:2], grams[:2], 0.7, [2.0, 1.0]), twice, atol=1e-10)
    assert torch.allclose(regmean_solve(ws, grams, 0.7, [3 * x for x in lam]), regmean_solve(ws, grams, 0.7, lam))
    dropped = regmean_solve(ws, grams, 0.7, [1.0, 0.0, 1.0])
    assert torch.allclose(dropped, regmean_solve([ws[0], ws[2]], [grams[0], grams[2]], 0.7), atol=1e-10)


def test_regmean_single_model_returns_it():
    _, ws, grams = _problem(models=1)
    for alpha in (0.0, 0.5, 1.0):
        assert torch.allclose(regmean_solve(ws, grams, alpha), ws[0], atol=1e-10)


def test_regmean_alpha_zero_is_per_input_feature_weighted_average():
    _, ws, grams = _problem()
    lam = [1.0, 2.0, 0.5]
    # Diagonal Grams decouple the input features: W[:, j] = Σ λ g_m,jj W_m[:, j] / Σ λ g_m,jj.
    diag = torch.stack([torch.diagonal(g) for g in grams])  # (M, in)
    coef = torch.tensor(lam, dtype=F64)[:, None] * diag
    expected = sum(c * w for c, w in zip(coef, ws, strict=True)) / coef.sum(dim=0)
    assert torch.allclose(regmean_solve(ws, grams, 0.0, lam), expected, atol=1e-10)


def test_regmean_unseen_feature_falls_back_to_the_mean_weight():
    xs, ws, _ = _problem()
    for x in xs:
        x[:, 4] = 0  # no model ever sees input feature 4: Σ G is singular there
    grams = [x.T @ x for x in xs]
    out = regmean_solve(ws, grams, 1.0)
    assert torch.allclose(out[:, 4], sum(w[:, 4] for w in ws) / 3, atol=1e-6)
    # The other features are the least-squares solution on the features that were seen.
    stacked_x = torch.cat([x[:, :4] for x in xs])
    targets = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    assert torch.allclose(out[:, :4], torch.linalg.lstsq(stacked_x, targets).solution.T, atol=1e-6)


def test_regmean_keeps_input_dtype_and_validates():
    _, ws, grams = _problem()
    out = regmean_solve([w.float() for w in ws], [g.float() for g in grams], 0.9)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), regmean_solve(ws, grams, 0.9), atol=1e-4)
    with pytest.raises(ConfigError, match="alpha"):
        regmean_solve(ws, grams, 1.5)
    with pytest.raises(ValueError, match="one Gram per weight"):
        regmean_solve(ws, grams[:2], 0.9)
    with pytest.raises(ValueError, match="lambdas"):
        regmean_solve(ws, grams, 0.9, [0.0, 0.0, 0.0])


def test_regmean_fallback_is_lambda_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -1.0])
    assert torch.allclose(regmean_fallback([a, b]), torch.tensor([2.5, 0.5]))
    assert torch.allclose(regmean_fallback([a, b], [1.0, 2.0]), torch.tensor([3.0, 0.0]))


# =========================================================================== RegMean: plumbing


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.qkv_input"),
        ("model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.qkv_input"),
        ("model.layers.3.self_attn.v_proj.weight", "model.layers.3.self_attn.qkv_input"),
        ("model.layers.3.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj"),
        ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate_up_input"),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_input"),
        ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj"),
        ("lm_head.weight", "lm_head"),
        ("model.layers.3.self_attn.q_proj.bias", None),
        ("model.layers.3.input_layernorm.weight", None),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
    ],
)
def test_gram_key(name, key):
    assert gram_key(name) == key


def test_regmean_merge_is_the_solve_on_full_weights_in_delta_form():
    _, ws, grams = _problem(models=2, inp=5, out=4)
    base = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    deltas = [w - base for w in ws]
    merge = regmean_method([{"model.layers.0.self_attn.qkv_input": g} for g in grams]).merge
    assert isinstance(merge, RegMeanMerge)
    fn = partial(merge, "model.layers.0.self_attn.k_proj.weight")
    out = fn(base, deltas, ones(2), {"alpha": 0.6}, GEN)
    assert torch.allclose(out, regmean_solve(ws, grams, 0.6), atol=1e-10)
    # λ scales task vectors: model m stands in as W₀ + λ_m τ_m; all λ = 0 is the base.
    params = [ModelParams(0.5), ModelParams(2.0)]
    scaled = [base + 0.5 * deltas[0], base + 2.0 * deltas[1]]
    assert torch.allclose(fn(base, deltas, params, {"alpha": 0.6}, GEN), regmean_solve(scaled, grams, 0.6))
    zero = [ModelParams(0.0)] * 2
    assert torch.allclose(fn(base, deltas, zero, {"alpha": 0.6}, GEN), base)


def test_regmean_merge_averages_tensors_without_grams():
    merge = RegMeanMerge({})
    fn = partial(merge, "model.layers.0.self_attn.q_proj.bias")
    base, d1, d2 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, -4.0])
    # Mean of (W₀ + λ_m τ_m): 1 + (2·1 + 0)/2 = 2 and 1 + (0 + 0.5·(−4))/2 = 0.
    out = fn(base, [d1, d2], [ModelParams(1.0), ModelParams(0.5)], REGMEAN.options, GEN)
    assert torch.allclose(out, torch.tensor([2.0, 0.0]))


def test_regmean_refuses_to_merge_without_grams():
    assert get_method("regmean") is REGMEAN and REGMEAN.options == {"alpha": 0.1} and REGMEAN.mergekit is None
    base = torch.zeros(2, 2)
    assert REGMEAN.merge is None  # unbound: the Grams are measured per study
    with pytest.raises(ConfigError, match="needs its grams measured first"):
        merge_tensor(MergePlan("regmean", ("a",)), "model.layers.1.mlp.down_proj.weight", base, [base])
    with pytest.raises(ConfigError, match=r"no Gram 'model\.layers\.1\.mlp\.down_proj'"):
        RegMeanMerge({})("model.layers.1.mlp.down_proj.weight", base, [base], ones(1), REGMEAN.options, GEN)
    fn = partial(RegMeanMerge({"lm_head": [torch.eye(2)]}), "lm_head.weight")
    with pytest.raises(ConfigError, match="2 models but Gram 'lm_head' has 1"):
        fn(base, [base, base], ones(2), REGMEAN.options, GEN)
    with pytest.raises(ConfigError, match="differ"):
        RegMeanMerge.from_models([{"lm_head": torch.eye(2)}, {}])


# =========================================================================== RegMean: Gram collection


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).float()


BATCHES = [
    {
        "input_ids": torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
    },
    {"input_ids": torch.tensor([[11, 12, 13]]), "attention_mask": torch.tensor([[1, 1, 1]])},
]


def _captured_inputs(model, module) -> list[torch.Tensor]:
    """The output of ``module`` for every real (unpadded) token of BATCHES, by a separate hook."""
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        seen.append(output.detach().reshape(-1, output.shape[-1]))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in BATCHES:
                model(**batch)
    finally:
        handle.remove()
    masks = [b["attention_mask"].reshape(-1).bool() for b in BATCHES]
    return torch.cat([x[m] for x, m in zip(seen, masks, strict=True)]).double()


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_collect_grams_keys_and_values(tiny_llama):
    model = tiny_llama
    grams = collect_grams(model, BATCHES, mean=False, dtype=F64)
    expected_keys = {"lm_head"}
    for i in range(2):
        prefix = f"model.layers.{i}"
        expected_keys |= {f"{prefix}.self_attn.qkv_input", f"{prefix}.self_attn.o_proj"}
        expected_keys |= {f"{prefix}.mlp.gate_up_input", f"{prefix}.mlp.down_proj"}
    assert set(grams) == expected_keys
    assert grams["model.layers.1.mlp.down_proj"].shape == (64, 64)
    assert _hook_count(model) == 0

    # q/k/v read the input layernorm's output; lm_head reads the final norm's. Padding is left out.
    x = _captured_inputs(model, model.model.layers[0].input_layernorm)
    assert x.shape == (5 + 3 + 3, 32)
    assert torch.allclose(grams["model.layers.0.self_attn.qkv_input"], x.T @ x, rtol=1e-9, atol=1e-9)
    h = _captured_inputs(model, model.model.norm)
    assert torch.allclose(grams["lm_head"], h.T @ h, rtol=1e-9, atol=1e-9)

    means = collect_grams(model, BATCHES, dtype=F64)
    assert torch.allclose(means["lm_head"], h.T @ h / h.shape[0], rtol=1e-9, atol=1e-9)


def test_gram_hooks_are_removed_when_a_forward_fails(tiny_llama):
    model = tiny_llama
    model.train()

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            collect_grams(model, BATCHES)
    finally:
        handle.remove()
    assert _hook_count(model) == 0 and not model.model.layers[0]._forward_pre_hooks
    assert model.training  # the mode is restored
    model.eval()
    # A collector limited to some keys hooks only those modules.
    with GramCollector(model, keys={"lm_head"}) as collector:
        assert _hook_count(model) == 1
        with torch.no_grad():
            model(**BATCHES[1])
    assert set(collector.sums) == {"lm_head"} and collector.counts == {"lm_head": 3}

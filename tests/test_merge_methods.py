"""Every merge method against hand-computed values on tiny tensors, plus plan scope resolution.

Expected values are worked out in the comments from the formulas in docs/methods.md, not from the
code, so a wrong rule (vote before weighting, sum instead of mean, a lost rescale) fails here.
"""

from __future__ import annotations

import pytest
import torch

from optimizer.errors import ConfigError
from optimizer.merge import MergePlan, ModelParams, _sparsify, get_method, merge_tensor, method_names
from optimizer.merge._generalized import Consensus, GeneralizedMerge, Sparsification
from optimizer.merge.plan import scopes_for
from optimizer.models import describe

GEN = torch.Generator()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These tensors are tiny: on a shared 2-core box, waking torch's intra-op pool for each op
    # costs milliseconds and made the module ~40x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(method: str, base, deltas, params, **options) -> torch.Tensor:
    m = get_method(method)
    assert m.merge is not None
    return m.merge("w", base, deltas, params, {**m.options, **options}, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- linear, task arithmetic


def test_linear_normalized_is_weighted_mean_of_models():
    base = t(0.0, 10.0)
    # θ1 = [1, 11], θ2 = [5, 7]; weights 1 and 3: [(1 + 15)/4, (11 + 21)/4] = [4, 8].
    out = run("linear", base, [t(1.0, 1.0), t(5.0, -3.0)], [ModelParams(1.0), ModelParams(3.0)])
    assert torch.allclose(out, t(4.0, 8.0))


def test_linear_unnormalized_is_weighted_sum_of_models():
    base = t(0.0, 10.0)
    out = run("linear", base, [t(1.0, 1.0), t(5.0, -3.0)], [ModelParams(1.0), ModelParams(3.0)], normalize=False)
    assert torch.allclose(out, t(16.0, 32.0))  # 1·θ1 + 3·θ2


def test_linear_all_weights_zero_keeps_base():
    out = run("linear", t(2.0), [t(1.0), t(-1.0)], [ModelParams(0.0), ModelParams(0.0)])
    assert torch.equal(out, t(2.0))


def test_task_arithmetic_adds_scaled_task_vectors():
    # 1 + 0.5·(2·1 + (−1)·4) = 1 + 0.5·(−2) = 0
    out = run("task_arithmetic", t(1.0), [t(1.0), t(4.0)], [ModelParams(2.0), ModelParams(-1.0)], **{"lambda": 0.5})
    assert torch.allclose(out, t(0.0))


def test_generalized_without_choices_is_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    base, d1, d2 = (torch.randn(8, 4, generator=g) for _ in range(3))
    params = [ModelParams(0.3), ModelParams(-0.7)]
    plain = GeneralizedMerge(Sparsification.NONE, Consensus.NONE)
    opts = {"lambda": 1.5, "normalize": False}
    expected = get_method("task_arithmetic").merge("w", base, [d1, d2], params, {"lambda": 1.5}, GEN)
    assert torch.allclose(plain("w", base, [d1, d2], params, opts, GEN), expected, atol=1e-6)


# --------------------------------------------------------------------------- sparsification


def test_magnitude_keeps_floor_density_times_n_largest():
    tau = t(0.5, -0.1, 0.3, -0.4, 0.05)
    # ⌊0.6·5⌋ = 3 → |0.5|, |-0.4|, |0.3| survive.
    assert torch.equal(_sparsify.magnitude(tau, 0.6), t(0.5, 0.0, 0.3, -0.4, 0.0))


def test_magnitude_edges():
    tau = t(0.2, -0.9, 0.1)
    assert torch.equal(_sparsify.magnitude(tau, 0.01), t(0.0, -0.9, 0.0))  # k = max(1, 0)
    assert torch.equal(_sparsify.magnitude(tau, 0.0), torch.zeros(3))
    assert _sparsify.magnitude(tau, 1.0) is tau
    assert _sparsify.magnitude(torch.zeros(0), 0.5).numel() == 0
    assert torch.equal(_sparsify.magnitude(torch.zeros(4), 0.5), torch.zeros(4))


def test_magnitude_rescale_matches_l1_norm():
    tau = t(0.5, -0.1, 0.3, -0.4, 0.05)
    kept = _sparsify.magnitude(tau, 0.6, rescale=True)
    assert kept.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-6)
    assert kept[1] == 0 and kept[4] == 0


def test_breadcrumbs_drops_both_tails():
    # |τ| ranks 1..10; density 0.5 keeps 5, gamma 0.2 drops the top 2 → ranks 4..8 survive.
    tau = 0.1 * t(3, -10, 1, 7, -4, 9, -2, 5, -8, -6)
    expected = 0.1 * t(0, 0, 0, 7, -4, 0, 0, 5, -8, -6)
    assert torch.allclose(_sparsify.breadcrumbs(tau, 0.5, 0.2), expected)


def test_breadcrumbs_shrinks_outlier_cut_to_meet_density():
    tau = 0.1 * t(3, -10, 1, 7, -4, 9, -2, 5, -8, -6)
    # density 0.9 keeps 9 entries, so only the single largest (−1.0) can go despite gamma 0.2.
    expected = tau.clone()
    expected[1] = 0
    assert torch.allclose(_sparsify.breadcrumbs(tau, 0.9, 0.2), expected)
    assert _sparsify.breadcrumbs(tau, 1.0, 0.2) is tau  # density 1: nothing pruned at all
    assert torch.equal(_sparsify.breadcrumbs(tau, 0.0, 0.2), torch.zeros(10))


def test_dare_keep_rate_and_rescale():
    ones = torch.ones(200_000)
    kept = _sparsify.random_drop(ones, 0.3, torch.Generator().manual_seed(0))
    nonzero = kept != 0
    assert nonzero.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(kept[nonzero], torch.full_like(kept[nonzero], 1 / 0.3))
    assert kept.mean().item() == pytest.approx(1.0, abs=0.02)  # unbiased: E[mask/d] = 1
    raw = _sparsify.random_drop(ones, 0.3, torch.Generator().manual_seed(0), rescale=False)
    assert torch.equal(raw != 0, nonzero) and torch.equal(raw[nonzero], ones[nonzero])


def test_dare_masks_nest_as_density_grows():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    low = _sparsify.random_drop(x, 0.3, torch.Generator().manual_seed(5)) != 0
    high = _sparsify.random_drop(x, 0.6, torch.Generator().manual_seed(5)) != 0
    assert torch.all(high[low])  # same draws: every entry kept at 0.3 is kept at 0.6
    assert high.sum() > low.sum()


# --------------------------------------------------------------------------- TIES


def test_ties_trim_elect_disjoint_mean():
    tau1 = t(0.5, -0.1, 0.3, -0.4, 0.05)
    tau2 = t(-0.2, 0.6, 0.1, 0.3, -0.05)
    # Trim (⌊0.6·5⌋ = 3): τ̂1 = [.5, 0, .3, −.4, 0], τ̂2 = [−.2, .6, 0, .3, 0].
    # Elect: sums [.3, .6, .3, −.1, 0] → signs [+, +, +, −, + (zero sum)].
    # Disjoint mean over agreeing models: [.5/1, .6/1, .3/1, −.4/1, 0 (no one agrees)].
    params = [ModelParams(1.0, 0.6), ModelParams(1.0, 0.6)]
    out = run("ties", t(1, 1, 1, 1, 1), [tau1, tau2], params)
    assert torch.allclose(out, 1 + t(0.5, 0.6, 0.3, -0.4, 0.0))


def test_ties_zero_sum_elects_plus():
    # Exact tie (0.25 − 0.25 = 0) elects +, so only the positive model survives.
    out = run("ties", t(0.0), [t(0.25), t(-0.25)], [ModelParams(1.0, 1.0), ModelParams(1.0, 1.0)])
    assert torch.equal(out, t(0.25))


def test_ties_votes_with_weighted_values_and_divides_by_agreeing_weights():
    deltas = [t(0.1), t(-0.15)]
    # Unweighted the minus side would win (−0.05); weights 2:1 give 0.2 − 0.15 = +0.05.
    weighted = [ModelParams(2.0, 1.0), ModelParams(1.0, 1.0)]
    assert torch.allclose(run("ties", t(0.0), deltas, weighted), t(0.1))  # 0.2 / 2
    assert torch.allclose(run("ties", t(0.0), deltas, weighted, normalize=False), t(0.2))
    assert torch.allclose(run("ties", t(0.0), deltas, weighted, **{"lambda": 0.5}), t(0.05))
    even = [ModelParams(1.0, 1.0), ModelParams(1.0, 1.0)]
    assert torch.allclose(run("ties", t(0.0), deltas, even), t(-0.15))


def test_ties_zero_weight_model_neither_votes_nor_counts():
    deltas = [t(0.3, 0.3), t(-5.0, 0.1)]
    out = run("ties", t(0.0, 0.0), deltas, [ModelParams(1.0, 1.0), ModelParams(0.0, 1.0)])
    assert torch.allclose(out, t(0.3, 0.3))


def test_ties_defaults_and_all_zero_deltas():
    ties = get_method("ties")
    assert ties.default_density == 0.2 and ties.uses_density and ties.options["normalize"] is True
    base = torch.randn(3, 5)
    out = run("ties", base, [torch.zeros(3, 5), torch.zeros(3, 5)], [ModelParams(1.0, 0.2)] * 2)
    assert torch.equal(out, base)


def test_integer_tensors_are_not_merged():
    base = torch.arange(6)
    for name in ("ties", "dare_linear", "breadcrumbs"):
        out = run(name, base, [torch.ones(6, dtype=torch.long)], [ModelParams(1.0, 0.5)])
        assert torch.equal(out, base) and out.dtype == torch.long


def test_bf16_is_merged_in_fp32_and_returned_in_bf16():
    base = torch.zeros(4, dtype=torch.bfloat16)
    out = run("ties", base, [t(1e-3, 2e-3, -1e-3, 0).bfloat16()], [ModelParams(1.0, 1.0)])
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), t(1e-3, 2e-3, -1e-3, 0), rtol=1e-2)


# --------------------------------------------------------------------------- DARE


def _plan(method: str, densities: dict[str, float], seed: int = 0) -> MergePlan:
    return MergePlan(method, tuple(densities), {m: ModelParams(1.0, d) for m, d in densities.items()}, {"seed": seed})


NAME = "model.layers.0.mlp.up_proj.weight"


def test_dare_linear_is_seeded_per_plan_and_tensor():
    g = torch.Generator().manual_seed(0)
    base, tau = torch.zeros(64, 64), torch.randn(64, 64, generator=g)
    plan = _plan("dare_linear", {"a": 0.4})
    first = merge_tensor(plan, NAME, base, [tau])
    assert torch.equal(first, merge_tensor(plan, NAME, base, [tau]))
    assert not torch.equal(first, merge_tensor(_plan("dare_linear", {"a": 0.4}, seed=1), NAME, base, [tau]))
    other = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(first != 0, merge_tensor(plan, other, base, [tau]) != 0)
    kept = first != 0
    assert kept.float().mean().item() == pytest.approx(0.4, abs=0.04)
    assert torch.allclose(first[kept], tau[kept] / 0.4)


def test_dare_mask_of_one_model_ignores_the_others_density():
    g = torch.Generator().manual_seed(0)
    base, tau = torch.zeros(32, 32), torch.randn(32, 32, generator=g)
    silent = torch.zeros(32, 32)  # model b contributes nothing; only a's mask shows
    a = merge_tensor(_plan("dare_linear", {"a": 0.5, "b": 0.2}), NAME, base, [tau, silent])
    b = merge_tensor(_plan("dare_linear", {"a": 0.5, "b": 1.0}), NAME, base, [tau, silent])
    assert torch.equal(a, b)


def test_dare_density_one_is_task_arithmetic_and_dare_ties_is_ties():
    g = torch.Generator().manual_seed(2)
    base, d1, d2 = (torch.randn(16, 8, generator=g) for _ in range(3))
    params = [ModelParams(0.6, 1.0), ModelParams(0.9, 1.0)]
    ta = run("task_arithmetic", base, [d1, d2], params)
    assert torch.allclose(run("dare_linear", base, [d1, d2], params), ta)
    ties = run("ties", base, [d1, d2], params)
    assert torch.allclose(run("dare_ties", base, [d1, d2], params, normalize=True), ties)


def test_dare_ties_only_merges_surviving_agreeing_entries():
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(50_000)
    d1, d2 = torch.randn(50_000, generator=g), torch.randn(50_000, generator=g)
    plan = _plan("dare_ties", {"a": 0.5, "b": 0.5})
    out = merge_tensor(plan, NAME, base, [d1, d2])
    # An entry survives in neither model with probability 1/4.
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # Every nonzero entry is one model's rescaled value or the sum of two agreeing ones.
    candidates = torch.stack([d1 / 0.5, d2 / 0.5, (d1 + d2) / 0.5])
    nz = out != 0
    assert torch.isclose(candidates[:, nz], out[nz]).any(dim=0).all()


def test_dare_defaults_follow_mergekit():
    for name in ("dare_linear", "dare_ties"):
        m = get_method(name)
        assert m.uses_density and m.options["rescale"] is True and m.options["normalize"] is False


# --------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_method_adds_pruned_task_vectors():
    tau = 0.1 * t(3, -10, 1, 7, -4, 9, -2, 5, -8, -6)
    out = run("breadcrumbs", torch.ones(10), [tau, tau], [ModelParams(1.0, 0.5), ModelParams(2.0, 0.5)], gamma=0.2)
    assert torch.allclose(out, 1 + 3 * 0.1 * t(0, 0, 0, 7, -4, 0, 0, 5, -8, -6))
    assert get_method("breadcrumbs").options["gamma"] == 0.01


def test_breadcrumbs_ties_votes_after_pruning():
    # density 0.34 keeps ⌊1.02⌋ = 1 of 3 entries, gamma 0.34 drops the largest one:
    # n_bot = 3 − 1 − 1 = 1, so only the middle magnitude survives: τ̂1 = [0, .5, 0], τ̂2 = [0, −.4, 0].
    tau1, tau2 = t(0.1, 0.5, 0.9), t(-0.05, -0.4, 0.8)
    out = run(
        "breadcrumbs_ties",
        t(0, 0, 0),
        [tau1, tau2],
        [ModelParams(1.0, 0.34), ModelParams(1.0, 0.34)],
        gamma=0.34,
    )
    assert torch.allclose(out, t(0.0, 0.5, 0.0))  # sum +0.1 elects +, τ̂2 disagrees


# --------------------------------------------------------------------------- registry and plans


def test_every_generalized_variant_is_registered_once_with_mergekit_name():
    expected = {
        "ties": "ties",
        "dare_linear": "dare_linear",
        "dare_ties": "dare_ties",
        "breadcrumbs": "breadcrumbs",
        "breadcrumbs_ties": "breadcrumbs_ties",
    }
    for name, mk in expected.items():
        m = get_method(name)
        assert m.mergekit == mk and m.uses_density and 0 < m.default_density < 1
    assert set(expected) <= set(method_names())
    with pytest.raises(ConfigError, match=r"choose one of: .*dare_ties"):
        get_method("dare")


def test_plan_most_specific_scope_wins():
    plan = MergePlan(
        "ties",
        ("math", "code"),
        {
            "math": ModelParams(1.0, 0.1),
            "math.attn": ModelParams(2.0, 0.2),
            "math.L03": ModelParams(3.0, 0.3),
            "math.L03.attn": ModelParams(4.0, 0.4),
            "math.embed": ModelParams(5.0, 0.5),
            "code.L03": ModelParams(6.0, 0.6),
        },
    )
    at = lambda name: plan.for_tensor(describe(name))  # noqa: E731
    assert at("model.layers.3.self_attn.q_proj.weight") == (ModelParams(4.0, 0.4), ModelParams(6.0, 0.6))
    assert at("model.layers.3.mlp.up_proj.weight") == (ModelParams(3.0, 0.3), ModelParams(6.0, 0.6))
    assert at("model.layers.1.input_layernorm.weight") == (ModelParams(2.0, 0.2), ModelParams())
    assert at("model.layers.1.post_attention_layernorm.weight") == (ModelParams(1.0, 0.1), ModelParams())
    assert at("model.embed_tokens.weight") == (ModelParams(5.0, 0.5), ModelParams())
    assert at("lm_head.weight") == (ModelParams(1.0, 0.1), ModelParams())
    assert scopes_for("math", describe("model.norm.weight")) == ("math.head", "math")


def test_plan_json_round_trip():
    plan = MergePlan(
        "dare_ties",
        ("math", "code"),
        {"math": ModelParams(0.7, 0.3), "code.L02.mlp": ModelParams(-0.25, 0.9)},
        {"seed": 7, "normalize": True, "lambda": 0.85},
    )
    back = MergePlan.from_json(plan.to_json())
    assert back == plan
    assert back.models == ("math", "code") and isinstance(back.params["math"], ModelParams)
    assert back.for_tensor(describe("model.layers.2.mlp.up_proj.weight"))[1] == ModelParams(-0.25, 0.9)


@pytest.mark.parametrize("fraction", [0.001, 0.2, 0.5, 0.97])
def test_band_top_k_selects_the_same_values_as_topk(fraction: float) -> None:
    """The fast selection TIES uses on large tensors keeps exactly the top-k values."""
    from optimizer.merge._sparsify import top_k_indices

    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1 << 21, generator=gen).abs()
    values[: 1 << 18] = 0.0  # many exact ties (untouched weights), as real task vectors have
    k = int(fraction * values.numel())
    ours = top_k_indices(values, k)
    assert ours.numel() == k and torch.unique(ours).numel() == k
    expected = torch.topk(values, k, sorted=False).values
    assert torch.equal(torch.sort(values[ours]).values, torch.sort(expected).values)


def test_breadcrumbs_on_large_tensors_keeps_the_band_below_the_outliers() -> None:
    from optimizer.merge._sparsify import breadcrumbs

    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(1 << 21, generator=gen)
    kept = breadcrumbs(delta, density=0.3, gamma=0.05)
    n = delta.numel()
    order = torch.argsort(delta.abs(), descending=True)
    n_top, keep = int(0.05 * n), int(0.3 * n)
    assert int((kept != 0).sum()) == keep
    assert torch.all(kept[order[:n_top]] == 0)  # the outliers are gone
    assert torch.equal(kept[order[n_top : n_top + keep]], delta[order[n_top : n_top + keep]])


def test_magnitude_on_large_tensors_equals_top_k_selection() -> None:
    from optimizer.merge._sparsify import magnitude

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(1 << 21, generator=gen) * 0.01
    for density in (0.05, 0.5, 0.9):
        kept = magnitude(delta, density)
        k = int(density * delta.numel())
        idx = torch.topk(delta.abs(), k).indices
        expected = torch.zeros_like(delta)
        expected[idx] = delta[idx]
        assert int((kept != 0).sum()) == k
        assert torch.equal(kept, expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_streamed_merge_equals_the_resident_merge(method: str) -> None:
    """Task vectors kept in host memory merge to the same tensors, random masks included."""
    from optimizer.merge.apply import iter_merged
    from optimizer.merge.streaming import iter_merged_streamed, pin

    gen = torch.Generator().manual_seed(3)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    base = {n: torch.randn(16, 8, generator=gen) for n in names}
    deltas = {n: [torch.randn(16, 8, generator=gen) * 0.1 for _ in range(2)] for n in names}
    plan = MergePlan(method, ("a", "b"), {"a": ModelParams(0.7, 0.5), "b.L01": ModelParams(0.4, 0.3)}, {"seed": 5})
    resident = dict(iter_merged(plan, base, deltas))
    streamed = dict(iter_merged_streamed(plan, base, pin(deltas)))
    assert list(streamed) == names
    for n in names:
        assert torch.equal(streamed[n], resident[n]), n


def test_model_stock_moves_by_the_angle_between_task_vectors() -> None:
    """Orthogonal task vectors keep the base (t = 0); identical ones reach their average (t = 1);
    at 60° two of them go t = 2·½ / (1 + ½) = ⅔ of the way."""
    from optimizer.merge.model_stock import merge_model_stock

    base = torch.tensor([1.0, 2.0, 3.0])
    options = {"filter_wise": False}
    gen = torch.Generator()
    params = [ModelParams(), ModelParams()]
    merge = lambda *taus: merge_model_stock("w", base, list(taus), params, options, gen)  # noqa: E731
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(merge(a, b), base)
    assert torch.allclose(merge(a, a), base + a)
    c = torch.tensor([0.5, 3**0.5 / 2, 0.0])  # 60° from a
    assert torch.allclose(merge(a, c), base + (2 / 3) * (a + c) / 2, atol=1e-6)


def test_sce_weights_models_by_energy_and_erases_the_minority_sign() -> None:
    """τ₁ = (1, −1, 2), τ₂ = (3, 1, −2): energies 2 and 14/3 → weights 0.3 and 0.7; the sum
    (4, 0, 0) elects + everywhere, so entry 2 keeps only τ₂ and entry 3 only τ₁."""
    from optimizer.merge.sce import merge_sce

    base = torch.zeros(3)
    taus = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, -2.0])]
    got = merge_sce("w", base, taus, [ModelParams(), ModelParams()], {"select_topk": 1.0}, torch.Generator())
    assert torch.allclose(got, torch.tensor([2.4, 1.0, 2.0]), atol=1e-6)


def test_della_keeps_large_entries_more_often_and_is_unbiased() -> None:
    """Density 0.5, ε 0.3: the smallest entry of a row is kept with p = 0.2, the largest with 0.8,
    and dividing survivors by p keeps the task vector in expectation."""
    from optimizer.merge._sparsify import magnitude_sampled

    tau = torch.arange(1.0, 101.0).repeat(2000, 1)  # 2000 rows of 1..100
    gen = torch.Generator().manual_seed(0)
    kept = magnitude_sampled(tau, 0.5, 0.3, gen, rescale=True)
    share = (kept != 0).float().mean(dim=0)
    assert share[0].item() == pytest.approx(0.2, abs=0.03) and share[-1].item() == pytest.approx(0.8, abs=0.03)
    assert share.mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.allclose(kept.mean(dim=0), tau[0], rtol=0.1)
    wide = magnitude_sampled(tau, 0.1, 0.3, torch.Generator().manual_seed(0), rescale=True)  # ε capped at 0.1
    assert torch.isfinite(wide).all() and (wide != 0).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_multislerp_keeps_the_length_a_linear_mean_loses() -> None:
    base = torch.zeros(2, 2)
    a, b = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    method = get_method("multislerp")
    assert method.merge is not None

    def merge(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        params = [ModelParams(w) for w in weights]
        return method.merge("t", base, deltas, params, dict(method.options), torch.Generator())

    # Orthogonal task vectors of length 2 at equal weights: the point halfway along their great
    # circle, still of length 2 (their plain mean has length √2).
    torch.testing.assert_close(merge([a, b], [1.0, 1.0]), torch.tensor([[2**0.5, 2**0.5], [0.0, 0.0]]))
    assert (a + b).div(2).norm() == pytest.approx(2**0.5)
    # Weights are shares: (3, 1) is (0.75, 0.25) and leans toward a; one model alone is its τ.
    leaning = merge([a, b], [3.0, 1.0])
    assert leaning[0, 0] > leaning[0, 1] > 0 and leaning.norm().item() == pytest.approx(2.0)
    torch.testing.assert_close(merge([a], [0.4]), a)
    # Opposite task vectors at equal weights have no mean direction: the weighted sum (0), not NaN.
    torch.testing.assert_close(merge([a, -a], [1.0, 1.0]), base)
    # No weight at all keeps the base.
    torch.testing.assert_close(merge([a, b], [0.0, 0.0]), base)

"""Hi-Merging's contribution analysis on the zoo, through the transformers engine.

What a user relies on: a probe merges exactly one layer (checked tensor by tensor on the plans the
analysis really sent to the engine), every model × layer gets a finite α and β, the conflict rule
and its outputs (warm starts, scopes to search) do what their docstrings say, the record survives
JSON, the plots render, and the unattended procedure never returns worse than its model-wise stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from optimizer.checkpoints import load_state_dict
from optimizer.config import config_from_dict
from optimizer.engines.base import Engine, LogLikelihood
from optimizer.errors import ConfigError, MergeoptError
from optimizer.merge import MergePlan, ModelParams, merge_state_dict, task_vectors
from optimizer.merge.hi_merging import (
    ContributionAnalysis,
    analyze_contributions,
    hi_merging,
    layer_labels,
    model_tasks,
    probe_plan,
)
from optimizer.models import describe, layer_key
from optimizer.report.contributions import contribution_heatmap, contribution_table
from optimizer.search.prepare import Prepared, prepare
from optimizer.search.warm_starts import StudyProbe, params_for_space
from tests._cli import zoo_config

LIMIT = 8  # search examples per task: enough to separate layers, cheap enough for CPU
LAYERS = ("embed", "L00", "L01", "L02", "L03", "head")


class _Recording(Engine):
    """An engine that remembers every plan it was asked to merge (and delegates the rest)."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.models = inner.models
        self.plans: list[MergePlan] = []

    def apply_plan(self, plan: MergePlan) -> None:
        self.plans.append(plan)
        self.inner.apply_plan(plan)

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str]) -> list[str]:
        return self.inner.generate(prompts, max_tokens=max_tokens, stop=stop)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LogLikelihood]:
        return self.inner.loglikelihood(requests)


@pytest.fixture(scope="module")
def prepared(zoo) -> Prepared:
    return prepare(config_from_dict(zoo_config("contrib", limit=LIMIT)))


@pytest.fixture(scope="module")
def engine(prepared):
    from optimizer.engines.hf_engine import HFEngine

    with HFEngine(prepared.models, device="cpu", dtype="float32") as eng:
        yield eng


@pytest.fixture(scope="module")
def weights(prepared) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Base state dict and task vectors, as the merge core sees them."""
    base = load_state_dict(prepared.models.base)
    specialists = [load_state_dict(p) for p in prepared.models.specialists.values()]
    return base, task_vectors(base, specialists)


@pytest.fixture(scope="module")
def recorded(prepared, engine) -> tuple[ContributionAnalysis, list[MergePlan]]:
    """One real analysis (with cross probes) and the plans it sent to the engine, in order."""
    spy = _Recording(engine)
    analysis = analyze_contributions(StudyProbe(prepared, spy), cross=True, pseudo_layers=True)
    return analysis, spy.plans


def _label(name: str) -> str:
    info = describe(name)
    return layer_key(info.layer) if info.layer is not None else info.kind


def _hand_built(alpha: dict, beta: dict, cross: dict | None = None) -> ContributionAnalysis:
    models = tuple(alpha)
    layers = tuple(next(iter(alpha.values())))
    return ContributionAnalysis(
        models=models,
        layers=layers,
        task_of={m: m for m in models},
        alpha=alpha,
        beta=beta,
        base=dict.fromkeys(models, 0.25),
        specialist=dict.fromkeys(models, 0.75),
        cross=cross,
    )


# -- probes are "only layer l" --------------------------------------------------------------------


def test_probe_plans_sent_to_the_engine_merge_exactly_one_layer(recorded, weights):
    analysis, plans = recorded
    base, deltas = weights
    models, n = analysis.models, len(analysis.models)
    # 1 base + N specialists + L·N single-layer + L merged-layer probes, in that order.
    assert len(plans) == analysis.probes == 1 + n + len(LAYERS) * n + len(LAYERS)
    single = plans[1 + n : 1 + n + len(LAYERS) * n]
    merged = plans[1 + n + len(LAYERS) * n :]
    # (probed layer, model index → coefficient on its τ): model m alone at 1, then all at 1/N.
    expected = [(layer, {i: 1.0}) for i in range(n) for layer in LAYERS]
    expected += [(layer, dict.fromkeys(range(n), 1.0 / n)) for layer in LAYERS]
    for plan, (layer, coef) in zip(single + merged, expected, strict=True):
        out = merge_state_dict(plan, base, deltas)
        for name, tensor in out.items():
            if _label(name) != layer:
                assert torch.equal(tensor, base[name]), f"{plan.to_json()} changed {name} outside {layer}"
            else:
                want = base[name] + sum(w * deltas[name][k] for k, w in coef.items())
                torch.testing.assert_close(tensor, want)
                assert not torch.equal(tensor, base[name]), f"{name} in {layer} was not merged"
    assert models == ("rev", "sort", "rot")


def test_a_probe_of_every_layer_at_once_is_the_specialist(prepared, engine, weights, recorded):
    analysis, _ = recorded
    base, deltas = weights
    models = prepared.space.models
    m = "sort"
    plan = MergePlan(
        "task_arithmetic",
        models,
        {**{k: ModelParams(weight=0.0) for k in models}, **{f"{m}.{layer}": ModelParams() for layer in LAYERS}},
    )
    specialist = load_state_dict(prepared.models.specialists[m])
    for name, tensor in merge_state_dict(plan, base, deltas).items():
        torch.testing.assert_close(tensor, specialist[name])
    engine.apply_plan(plan)
    task = next(t for t in prepared.tasks if t.name == m)
    assert task.score(engine).value == analysis.specialist[m]
    # The single-layer probe of one layer is exactly what probe_plan builds.
    one = probe_plan("task_arithmetic", models, "L02", {m: ModelParams()})
    assert one.params[m] == ModelParams(weight=0.0) and one.params[f"{m}.L02"] == ModelParams()


# -- what the analysis returns ------------------------------------------------------------------------


def test_analysis_gives_finite_alpha_and_beta_for_every_model_and_layer(recorded):
    analysis, _ = recorded
    assert analysis.layers == LAYERS == layer_labels(4)
    assert analysis.task_of == {"rev": "rev", "sort": "sort", "rot": "rot"}
    for m in analysis.models:
        for table in (analysis.alpha, analysis.beta):
            assert set(table[m]) == set(LAYERS)
            assert all(math.isfinite(v) for v in table[m].values())
        assert math.isfinite(sum(analysis.alpha[m].values()))
        # The zoo's specialists beat the base on their own task: the own-task mapping is right.
        assert analysis.specialist[m] > analysis.base[m]
        # Cross probes: a model's own entry is its α.
        assert analysis.cross is not None and analysis.cross[m][m] == analysis.alpha[m]


def test_conflicts_follow_the_documented_rule():
    layers = ("L00", "L01", "L02", "L03", "L04", "L05")
    alpha = {"a": dict(zip(layers, (0.3, 0.3, -0.1, 0.1, 0.2, math.nan), strict=True)), "b": dict.fromkeys(layers, 0.0)}
    beta = {
        "a": dict(zip(layers, (-0.1, 0.1, -0.2, 0.05, math.nan, -0.3), strict=True)),
        "b": dict.fromkeys(layers, 0.0),
    }
    an = _hand_built(alpha, beta)
    # L00: β < α and β < 0 → conflict. L01: β ≥ 0 → none. L02: both negative, β below α → conflict.
    # L03: β < α but β ≥ 0 → none. L04: NaN β with a finite α → conflict. L05: NaN α → no verdict.
    assert an.conflicts() == [("a", "L00"), ("a", "L02"), ("a", "L04")]
    assert an.conflicts(margin=0.15) == [("a", "L00"), ("a", "L04")]  # L02 is only 0.1 below α
    assert an.conflicts(threshold=0.06) == [("a", "L00"), ("a", "L02"), ("a", "L03"), ("a", "L04")]
    assert not an.is_conflict("b", "L00")  # β = α = 0: nothing lost by merging


def test_culprit_is_the_model_that_hurts_or_loses_least():
    alpha = {"a": {"L00": 0.5}, "b": {"L00": 0.4}, "c": {"L00": 0.1}}
    beta = {"a": {"L00": -0.2}, "b": {"L00": 0.0}, "c": {"L00": 0.0}}
    assert _hand_built(alpha, beta).culprit("a", "L00") == "c"  # no cross probes: c gives up least
    cross = {k: {m: {"L00": 0.0} for m in alpha} for k in alpha}
    cross["b"]["a"]["L00"] = -0.3  # b's layer alone hurts a's task
    assert _hand_built(alpha, beta, cross).culprit("a", "L00") == "b"
    two = _hand_built({"a": alpha["a"], "b": alpha["b"]}, {"a": beta["a"], "b": beta["b"]})
    assert two.culprit("a", "L00") == "b"
    assert _hand_built({"a": alpha["a"]}, {"a": beta["a"]}).culprit("a", "L00") == "a"  # nobody else


def test_json_round_trip(recorded):
    analysis, _ = recorded
    again = ContributionAnalysis.from_json(analysis.to_json())
    assert again == analysis
    assert again.conflicts() == analysis.conflicts()
    odd = _hand_built({"a": {"L00": math.nan}, "b": {"L00": 0.1}}, {"a": {"L00": -0.1}, "b": {"L00": 0.0}})
    assert ContributionAnalysis.from_json(odd.to_json()).to_json() == odd.to_json()
    with pytest.raises(ConfigError, match="format"):
        ContributionAnalysis.from_dict({**analysis.to_dict(), "format": 99})


def _conflicted() -> ContributionAnalysis:
    layers = ("embed", "L00", "L01", "head")
    alpha = {
        "rev": {"embed": 0.0, "L00": 0.5, "L01": 0.2, "head": 0.0},
        "sort": {"embed": 0.1, "L00": 0.1, "L01": 0.3, "head": 0.0},
        "rot": {"embed": 0.0, "L00": 0.4, "L01": 0.0, "head": 0.0},
    }
    beta = {m: dict.fromkeys(layers, 0.0) for m in alpha}
    beta["rev"]["L00"] = -0.2  # rev suffers at L00: culprit sort (smallest α there)
    beta["sort"]["L01"] = -0.1  # sort suffers at L01: culprit rot
    return _hand_built(alpha, beta)


def test_warm_start_plans_change_exactly_the_conflicting_scopes(weights):
    an = _conflicted()
    assert an.conflicts() == [("rev", "L00"), ("sort", "L01")]
    plans = an.warm_start_plans("ties", options={"seed": 0})
    assert list(plans) == ["contrib:drop", "contrib:halve", "contrib:uniform"]
    model_wise = MergePlan("ties", an.models, an.model_wise_params("ties"), {"seed": 0})
    assert model_wise.params["rev"] == ModelParams(weight=1.0, density=0.2)  # TIES' default density
    base, deltas = weights
    infos = [describe(name) for name in base]
    for label, factor in (("contrib:drop", 0.0), ("contrib:halve", 0.5)):
        plan = plans[label]
        assert MergePlan.from_dict(plan.to_dict()) == plan
        changed = {
            (m, _label(info.name))
            for info in infos
            for m, mine, theirs in zip(an.models, plan.for_tensor(info), model_wise.for_tensor(info), strict=True)
            if mine != theirs
        }
        assert changed == {("sort", "L00"), ("rot", "L01")}
        assert plan.params["sort.L00"].weight == factor * 1.0
        merge_state_dict(plan, base, deltas)  # a valid plan for the merge core
    uniform = plans["contrib:uniform"]
    assert [p.weight for p in uniform.params.values()] == pytest.approx([1 / 3] * 3)
    no_conflicts = _hand_built({"a": {"L00": 0.1}}, {"a": {"L00": 0.1}}).warm_start_plans("task_arithmetic")
    assert list(no_conflicts) == ["contrib:model_wise", "contrib:uniform"]


def test_scopes_to_search_free_every_model_at_each_conflicting_layer():
    an = _conflicted()
    scopes = an.scopes_to_search(an.conflicts())
    assert scopes == ["rev.L00", "sort.L00", "rot.L00", "rev.L01", "sort.L01", "rot.L01"]
    assert an.scopes_to_search([]) == []


def test_warm_starts_become_study_parameters_when_the_space_can_express_them(zoo):
    model_wise = prepare(config_from_dict(zoo_config("mw", limit=LIMIT, method="ties")))
    per_layer = prepare(config_from_dict(zoo_config("pl", limit=LIMIT, method="ties", granularity="layer")))
    an = _conflicted()
    options = {**model_wise.config.options, "seed": model_wise.config.search.seed}
    plans = an.warm_start_plans("ties", options=options)
    assert params_for_space(plans["contrib:drop"], model_wise.space) is None  # a per-layer drop
    params = params_for_space(plans["contrib:uniform"], model_wise.space)
    assert params == {
        f"{m}.{c}": pytest.approx(1 / 3 if c == "weight" else 0.2) for m in an.models for c in ("weight", "density")
    }
    dropped = params_for_space(plans["contrib:drop"], per_layer.space)
    assert dropped is not None and dropped["sort.L00.weight"] == 0.0 and dropped["sort.L01.weight"] == 1.0
    assert per_layer.space.plan_from_params(dropped).for_tensor(describe("model.layers.0.mlp.up_proj.weight")) == (
        plans["contrib:drop"].for_tensor(describe("model.layers.0.mlp.up_proj.weight"))
    )


# -- plots ---------------------------------------------------------------------------------------------


def test_heatmap_and_table(recorded, tmp_path):
    from rich.console import Console

    analysis, _ = recorded
    path = contribution_heatmap(analysis, tmp_path / "plots" / "contributions.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    conflicted = _conflicted()
    contribution_heatmap(conflicted, tmp_path / "c.png")
    table = contribution_table(conflicted)
    assert table.row_count == len(conflicted.models) * len(conflicted.layers)
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "yes → sort.L00" in text and "yes → rot.L01" in text


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_fix(prepared, engine):
    with pytest.raises(ConfigError, match=r"rev\.attn"):
        analyze_contributions(StudyProbe(prepared, engine), model_params={"rev.attn": ModelParams()})
    with pytest.raises(ConfigError, match="unknown merge method"):
        analyze_contributions(StudyProbe(prepared, engine), base_method="nope")
    with pytest.raises(ConfigError, match="grid"):
        hi_merging(StudyProbe(prepared, engine), grid=(0.0, 1.5))


def test_model_tasks_prefers_the_stated_specialist(zoo):
    config = zoo_config("mt", limit=LIMIT)
    for obj in config["objectives"]:
        obj["name"] = f"task_{obj['name']}"
    config["objectives"][2]["specialist"] = "rot"
    prep = prepare(config_from_dict(config))
    gains = {
        "rev": {"task_rev": 0.5, "task_sort": 0.1, "task_rot": 0.0},
        "sort": {"task_rev": 0.0, "task_sort": 0.4, "task_rot": 0.6},
        "rot": {},
    }
    probe = StudyProbe(prep, engine=None)
    assert model_tasks(probe, gains) == {"rev": "task_rev", "sort": "task_rot", "rot": "task_rot"}
    with pytest.raises(MergeoptError, match="specialist: rev"):
        model_tasks(probe)


# -- the unattended procedure ------------------------------------------------------------------------------


def test_hi_merging_keeps_the_best_plan_it_saw(prepared, engine):
    result = hi_merging(StudyProbe(prepared, engine), rounds=1, grid=(0.5, 1.0), model_wise="per_model")
    stage1 = result.stage("model_wise")
    assert len(stage1) == 1 + 3 * 3  # the start, then 3 new (p, s) pairs per model (one is the start)
    assert result.score >= max(e.score for e in stage1)
    assert result.score == max(e.score for e in result.evaluations)
    assert len(result.analyses) == 1 and result.plan.method == "ties"
    assert result.plan.options["normalize"] is False
    # The log is truthful: re-scoring the chosen plan gives the values it was chosen on.
    chosen = next(e for e in result.evaluations if e.plan == result.plan)
    engine.apply_plan(result.plan)
    assert {t.name: t.score(engine).value for t in prepared.tasks} == chosen.values
    assert all(set(e.values) == {"rev", "sort", "rot"} for e in result.evaluations)
    assert result.to_dict()["plan"] == result.plan.to_dict()


# -- the authors' probes and model-wise grid, against mergeopt's variants ---------------------------


class _Scripted:
    """A :class:`Probe` without an engine: records every plan and scores it by a fixed rule."""

    models = ("a", "b")
    tasks = ("a", "b")
    num_layers = 2
    split = "search"

    def __init__(self) -> None:
        self.plans: list[MergePlan] = []

    def maximize(self, task: str) -> bool:
        return True

    def stated_task(self, model: str) -> str | None:
        return model

    def stated_specialist(self, task: str) -> str | None:
        return task

    def score(self, plan: MergePlan, tasks: Sequence[str]) -> dict[str, float]:
        self.plans.append(plan)
        # Higher weight on a task's own model helps it; the sum of all weights is a tie-breaker.
        own = {t: plan.params.get(t, ModelParams()).weight for t in tasks}
        return {t: own[t] - 0.1 * abs(own[t] - 0.6) for t in tasks}


def _probe_tensors(plan: MergePlan) -> torch.Tensor:
    """What ``plan`` merges of one L01 tensor whose two task vectors keep disjoint entries."""
    name = "model.layers.1.mlp.down_proj.weight"
    base = {name: torch.zeros(1, 4)}
    deltas = {name: [torch.tensor([[1.0, 0.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 2.0]])]}
    return merge_state_dict(plan, base, deltas)[name]


def test_the_authors_probes_weigh_a_layer_at_one_alone_and_at_half_merged_with_normalize_on():
    probe = _Scripted()
    analysed = {"a": ModelParams(weight=0.3, density=1.0), "b": ModelParams(weight=0.7, density=1.0)}
    analysis = analyze_contributions(
        probe, base_method="hi_merging", model_params=analysed, options={"normalize": False}
    )
    assert analysis.layers == ("L00", "L01") and analysis.weighting == "authors"  # no embed / head by default
    single = [p for p in probe.plans if "a.L01" in p.params and "b.L01" not in p.params]
    merged = [p for p in probe.plans if "a.L01" in p.params and "b.L01" in p.params]
    assert len(single) == 1 and len(merged) == 1
    # Alone, the layer enters at weight 1.0, not at the model's scale 0.3: its whole trimmed τ.
    assert single[0].params["a.L01"] == ModelParams(weight=1.0, density=1.0)
    torch.testing.assert_close(_probe_tensors(single[0]), torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    # Merged, both at 0.5 with normalize on: an entry one model alone keeps enters at full size.
    assert merged[0].options["normalize"] is True and merged[0].params["b.L01"].weight == 0.5
    torch.testing.assert_close(_probe_tensors(merged[0]), torch.tensor([[1.0, 1.0, 2.0, 2.0]]))


def test_the_scaled_probes_keep_the_analysed_scales_and_halve_what_one_model_keeps():
    probe = _Scripted()
    analysed = {"a": ModelParams(weight=0.3, density=1.0), "b": ModelParams(weight=0.7, density=1.0)}
    analysis = analyze_contributions(
        probe,
        base_method="hi_merging",
        model_params=analysed,
        options={"normalize": False},
        probes="scaled",
        pseudo_layers=True,
    )
    assert analysis.layers == ("embed", "L00", "L01", "head") and analysis.weighting == "scaled"
    single = next(p for p in probe.plans if "a.L01" in p.params and "b.L01" not in p.params)
    merged = next(p for p in probe.plans if "a.L01" in p.params and "b.L01" in p.params)
    assert single.params["a.L01"].weight == 0.3
    assert merged.options["normalize"] is False
    torch.testing.assert_close(_probe_tensors(merged), torch.tensor([[0.15, 0.35, 0.3, 0.7]]))
    assert ContributionAnalysis.from_json(analysis.to_json()).weighting == "scaled"
    with pytest.raises(ConfigError, match="probes"):
        analyze_contributions(probe, probes="halved")


def test_the_authors_model_wise_stage_shares_one_pair_on_the_whole_grid():
    probe = _Scripted()
    result = hi_merging(probe, rounds=0, grid=(0.2, 0.6, 1.0), method="ties")
    stage1 = result.stage("model_wise")
    assert len(stage1) == 9  # |grid|², not N·|grid|²
    assert all(len({p for p in e.plan.params.values()}) == 1 for e in stage1)  # every model the same pair
    assert {(e.plan.params["a"].density, e.plan.params["a"].weight) for e in stage1} == {
        (p, s) for p in (0.2, 0.6, 1.0) for s in (0.2, 0.6, 1.0)
    }
    per_model = hi_merging(_Scripted(), rounds=0, grid=(0.2, 0.6, 1.0), method="ties", model_wise="per_model")
    assert len(per_model.stage("model_wise")) == 1 + 2 * 8
    # Both stay the best plan they saw; the per-model search can give each model its own pair.
    assert per_model.score >= result.score
    with pytest.raises(ConfigError, match="model_wise"):
        hi_merging(probe, model_wise="each")

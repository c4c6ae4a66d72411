"""Config validation and the search space's names and plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.config import config_from_dict, load_config
from optimizer.errors import ConfigError
from optimizer.models import describe
from optimizer.search.space import SearchSpace

BASE = {
    "name": "s",
    "base": "/m/base",
    "models": {"rev": "/m/rev", "add": "/m/add"},
    "objectives": [{"name": "rev", "data": "/d/rev", "metric": "exact_match"}],
}


def _config(**kw):
    return config_from_dict({**BASE, **kw})


def test_demo_config_is_valid() -> None:
    config = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert config.name == "demo" and list(config.models) == ["rev", "sort", "rot"]
    assert config.path(config.base).name == "base"  # zoo: paths resolve into the zoo


def test_model_granularity_names_and_plan() -> None:
    space = SearchSpace(_config(method="ties"), num_layers=4)
    assert list(space.distributions()) == ["rev.weight", "rev.density", "add.weight", "add.density"]
    plan = space.plan_from_params({"rev.weight": 0.3, "rev.density": 0.5, "add.weight": 1.2, "add.density": 0.9})
    q = describe("model.layers.2.self_attn.q_proj.weight")
    assert [(p.weight, p.density) for p in plan.for_tensor(q)] == [(0.3, 0.5), (1.2, 0.9)]


def test_layer_granularity_with_module_split() -> None:
    space = SearchSpace(_config(method="task_arithmetic", granularity="layer", split_modules=True), num_layers=4)
    names = list(space.distributions())
    # 4 layers × {attn, mlp} + embed + head, per model, weight only (task arithmetic has no density)
    assert len(names) == 2 * (4 * 2 + 2)
    assert "rev.L03.mlp.weight" in names and "add.embed.weight" in names and "rev.head.weight" in names
    params = {n: 0.0 for n in names} | {"rev.L03.mlp.weight": 0.7}
    plan = space.plan_from_params(params)
    mlp3 = plan.for_tensor(describe("model.layers.3.mlp.down_proj.weight"))
    attn3 = plan.for_tensor(describe("model.layers.3.self_attn.o_proj.weight"))
    assert mlp3[0].weight == 0.7 and attn3[0].weight == 0.0
    # the post-attention norm feeds the MLP, so it follows the MLP's coefficients
    assert plan.for_tensor(describe("model.layers.3.post_attention_layernorm.weight"))[0].weight == 0.7


def test_group_granularity_shares_layers() -> None:
    space = SearchSpace(_config(method="task_arithmetic", granularity="group", group_size=3), num_layers=4)
    assert [g.label for g in space.groups] == ["L00-02", "L03", "embed", "head"]
    plan = space.plan_from_params({"rev.L00-02.weight": 0.25})
    for layer in (0, 1, 2):
        assert plan.for_tensor(describe(f"model.layers.{layer}.mlp.up_proj.weight"))[0].weight == 0.25


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"weight": {"low": 2, "high": 1}}, "weight: low 2.0 is above high 1.0"),
        ({"density": {"low": 0.5, "high": 1.5}}, "(0, 1]"),
        ({"models": {}}, "no specialist models"),
        ({"objectives": []}, "no objectives"),
        ({"granularity": "head"}, "granularity"),
        ({"search": {"trials": 0}}, "search.trials"),
        ({"name": "bad name!"}, "not a valid study name"),
    ],
)
def test_invalid_configs_name_the_field(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(**override)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)

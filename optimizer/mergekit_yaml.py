"""Export a MergePlan as a mergekit config that rebuilds the same model, tensor for tensor.

A study's winner should be reproducible with the tool people already use, so every method whose
``MergeMethod.mergekit`` is set can be written as a ``mergekit-yaml`` config. Model-wise plans are
plain per-model ``parameters: {weight, density}``. Per-layer plans need care, because of how
mergekit 0.1.5 resolves a parameter for a tensor (``mergekit/plan.py``, ``config.py``,
``parameter_resolver.py``):

- a per-model value may be a list of ``{filter, value}`` conditions; the *first* whose ``filter``
  is a substring of the tensor's name wins (no filter matches everything), and if none matches,
  mergekit falls back to the global ``parameters:`` and then the method's default;
- a plain list of numbers is a *gradient* over depth, t = i/(L−1) for layer i — but embed_tokens,
  the final norm and lm_head are all planned with t = 0, so a gradient gives the head layer 0's
  value, and float interpolation at t·(L−1) is not always exact (⌊density·n⌋ can move by one).

So we write only exact scalars behind substring filters that mirror ``optimizer.models.describe``:
the family's block prefixes (Llama: ``layers.{i}.self_attn.`` and ``layers.{i}.input_layernorm.``
for our ``attn``, ``layers.{i}.mlp.`` and ``layers.{i}.post_attention_layernorm.`` for ``mlp``; see
:mod:`optimizer.families` for Gemma 2's and the mixtures of experts'), ``layers.{i}.`` when
both agree, ``embed_tokens.`` (``embed``), ``model.norm.`` and ``lm_head.`` (``head``), then a
filter-less default. The filters are disjoint ("layers.1." is not inside "layers.11."), so the
order of the specific ones does not matter. Values are resolved with the plan's own
most-specific-scope rule, so the YAML reproduces what ``merge_tensor`` computes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from optimizer.errors import ConfigError
from optimizer.families import LLAMA, Family
from optimizer.merge import get_method, method_names
from optimizer.merge.apply import resolved_options
from optimizer.merge.plan import MergePlan, ModelParams, is_expert_scope, scopes_for
from optimizer.models import TensorInfo

__all__ = ["plan_to_mergekit", "to_yaml"]

# Our options mergekit also has (same names), with the type its schema validates them as.
_OPTION_TYPES: dict[str, type] = {
    "normalize": bool,
    "rescale": bool,
    "lambda": float,
    "gamma": float,
    "filter_wise": bool,
    "select_topk": float,
    "epsilon": float,
    "normalize_weights": bool,
    "eps": float,
}
# mergekit's generalized task arithmetic methods: they read normalize and rescale.
_GENERALIZED = frozenset(
    {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
)
# Options that steer our run but are not merge parameters in mergekit (``seed`` is its
# ``--random-seed`` flag, and draws from another RNG anyway).
_NOT_EXPORTED = frozenset({"seed"})


def _kind_filters(family: Family) -> dict[str, tuple[str, ...]]:
    """mergekit substring filters per module kind: the family's own block prefixes."""
    mlp = family.mlp + family.mergekit_mlp
    return {"attn": family.attn, "mlp": mlp, "embed": ("embed_tokens.",), "head": ("model.norm.", "lm_head.")}


_LAYER_SCOPE = re.compile(r"^L(\d+)(?:\.|$)")


def plan_to_mergekit(
    plan: MergePlan,
    *,
    base_path: Path,
    model_paths: Mapping[str, Path],
    num_layers: int,
    dtype: str = "float32",
    family: Family = LLAMA,
) -> dict:
    """A mergekit config dict (``MergeConfiguration`` schema) equivalent to ``plan``.

    ``model_paths`` maps each of ``plan.models`` to its directory; paths are written absolute so
    the YAML runs from any working directory. ``num_layers`` is the decoder depth, needed to
    spell out per-layer values; ``family`` decides which module names each block's filters name.
    Raises :class:`ConfigError` for a method mergekit lacks.
    """
    method = get_method(plan.method)
    if method.mergekit is None:
        exportable = [n for n in method_names() if get_method(n).mergekit is not None]
        raise ConfigError(
            f"merge method {plan.method!r} has no mergekit equivalent, so it cannot be exported as a"
            f" mergekit YAML; methods that can: {', '.join(exportable)}"
        )
    if num_layers < 1:
        raise ConfigError(f"num_layers must be at least 1 to export a mergekit config, got {num_layers}")
    missing = [m for m in plan.models if m not in model_paths]
    if missing:
        raise ConfigError(
            f"no model path for {missing[0]!r}; pass model_paths for every model of the plan ({', '.join(plan.models)})"
        )
    _check_scopes(plan, num_layers)

    if method.mergekit == "linear" and resolved_options(method, plan).get("normalize"):
        _check_linear_total(plan, num_layers)

    fields = [f for f, used in (("weight", method.uses_weight), ("density", method.uses_density)) if used]
    models = []
    for model in plan.models:
        table = _resolve_groups(plan, model, num_layers)
        params = {f: _setting({g: getattr(p, f) for g, p in table.items()}, family) for f in fields}
        models.append({"model": _reference(model_paths[model], base_path), "parameters": params})

    config: dict = {"merge_method": method.mergekit}
    # Linear averages the listed models only; giving it the base would add the base as an input.
    if method.mergekit != "linear":
        config["base_model"] = _abs(base_path)
    config["models"] = models
    config["parameters"] = _global_parameters(
        method.name, method.mergekit, method.options, plan, sparsifies=method.uses_density
    )
    config["dtype"] = dtype
    config["out_dtype"] = dtype
    return config


def to_yaml(
    plan: MergePlan,
    *,
    base_path: Path,
    model_paths: Mapping[str, Path],
    num_layers: int,
    dtype: str = "float32",
    family: Family = LLAMA,
) -> str:
    """:func:`plan_to_mergekit` as YAML text for ``mergekit-yaml config.yml OUT``."""
    import yaml

    config = plan_to_mergekit(
        plan, base_path=base_path, model_paths=model_paths, num_layers=num_layers, dtype=dtype, family=family
    )
    header = f"# mergekit config written by mergeopt from a {plan.method!r} plan.\n"
    if config["merge_method"].startswith("dare"):
        header += "# DARE masks come from mergekit's RNG (--random-seed), not mergeopt's seed.\n"
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _reference(path: Path, base_path: Path) -> str:
    """How mergekit names a specialist: its folder, or ``BASE+ADAPTER`` for a LoRA adapter."""
    from optimizer.adapters import is_adapter

    return f"{_abs(base_path)}+{_abs(path)}" if is_adapter(path) else _abs(path)


def _abs(path: Path) -> str:
    text = str(Path(path).expanduser().resolve())
    if "+" in text or "@" in text:
        raise ConfigError(
            f"model path {text!r} contains '+' or '@', which mergekit reads as a LoRA or revision"
            " separator; move or link the model to a path without them"
        )
    return text


def _check_scopes(plan: MergePlan, num_layers: int) -> None:
    # A scope past the last layer would silently fall back to a coarser value in the YAML, and so
    # would an expert's own (mergekit holds a layer's experts as one tensor).
    for scope in plan.params:
        if is_expert_scope(scope):
            raise ConfigError(
                f"plan scope {scope!r} gives one expert (or the router) its own coefficients; mergekit holds a"
                " layer's experts as one tensor and cannot express it (export the model with mergeopt instead)"
            )
        for model in plan.models:
            if not scope.startswith(model + "."):
                continue
            m = _LAYER_SCOPE.match(scope[len(model) + 1 :])
            if m and int(m.group(1)) >= num_layers:
                raise ConfigError(
                    f"plan scope {scope!r} names layer {int(m.group(1))} but num_layers is"
                    f" {num_layers}; pass the model's real depth"
                )


def _check_linear_total(plan: MergePlan, num_layers: int) -> None:
    # Where every weight of a tensor is 0 we keep the base; mergekit divides by zero (NaN).
    tables = [_resolve_groups(plan, m, num_layers) for m in plan.models]
    for group in tables[0]:
        if abs(sum(t[group].weight for t in tables)) < 1e-12:
            layer, kind = group
            where = kind if layer is None else f"layer {layer} {kind}"
            raise ConfigError(
                f"normalized linear plan has weights summing to 0 for {where}; mergekit would write NaN"
                " there (mergeopt keeps the base). Give one model a nonzero weight or set normalize: false"
            )


def _resolve_groups(plan: MergePlan, model: str, num_layers: int) -> dict[tuple[int | None, str], ModelParams]:
    """``model``'s params for every (layer, kind) group, by the plan's own scope rule."""
    groups: list[tuple[int | None, str]] = [(i, k) for i in range(num_layers) for k in ("attn", "mlp")]
    groups += [(None, "embed"), (None, "head")]
    table = {}
    for layer, kind in groups:
        info = TensorInfo(name="", layer=layer, kind=kind, role="")
        found = next((plan.params[s] for s in scopes_for(model, info) if s in plan.params), ModelParams())
        table[(layer, kind)] = found
    return table


def _setting(values: dict[tuple[int | None, str], float], family: Family) -> float | list[dict]:
    """A scalar when every group agrees, else filter conditions ending in a default.

    Conditions go from specific to broad — one layer (``layers.3.`` when its attn and mlp agree,
    else ``layers.3.self_attn.``…), then a module kind across all layers (``self_attn.``…), then
    embed / head — and only where a value differs from the level below, so a plan that sets
    ``math.mlp`` reads as one ``mlp.`` condition rather than one per layer.
    """
    filters = _kind_filters(family)
    values = {g: float(v) for g, v in values.items()}
    default = _most_common(values.values())
    if all(v == default for v in values.values()):
        return default
    layers = sorted({layer for layer, _ in values if layer is not None})
    kind_default = {k: _most_common(values[(i, k)] for i in layers) for k in ("attn", "mlp")}
    conditions: list[dict] = []
    for i in layers:
        attn, mlp = values[(i, "attn")], values[(i, "mlp")]
        if attn == mlp and (attn != kind_default["attn"] or mlp != kind_default["mlp"]):
            conditions.append({"filter": f"layers.{i}.", "value": attn})
            continue
        for kind, value in (("attn", attn), ("mlp", mlp)):
            if value != kind_default[kind]:
                conditions += [{"filter": f"layers.{i}.{f}", "value": value} for f in filters[kind]]
    for kind in ("attn", "mlp"):
        if kind_default[kind] != default:
            conditions += [{"filter": f, "value": kind_default[kind]} for f in filters[kind]]
    for kind in ("embed", "head"):
        if values[(None, kind)] != default:
            conditions += [{"filter": f, "value": values[(None, kind)]} for f in filters[kind]]
    conditions.append({"value": default})
    return conditions


def _most_common(values: Iterable[float]) -> float:
    return Counter(values).most_common(1)[0][0]


def _global_parameters(
    name: str,
    mergekit: str,
    declared: Mapping[str, object],
    plan: MergePlan,
    *,
    sparsifies: bool,
) -> dict:
    """Method-wide values, written explicitly so mergekit's defaults can never differ from ours."""
    options = {**declared, **plan.options}
    out: dict = {}
    # Only the options our method declares are read by its merge; anything else in the plan is
    # ignored by us and must be ignored in the export too.
    for key in declared:
        if key in _NOT_EXPORTED:
            continue
        if key not in _OPTION_TYPES:
            raise ConfigError(
                f"option {key!r} of merge method {name!r} has no mergekit equivalent; only"
                f" {', '.join(_OPTION_TYPES)} can be exported"
            )
        out[key] = _OPTION_TYPES[key](options[key])
    if mergekit in _GENERALIZED:
        # Our generalized merge treats an undeclared normalize/rescale as off; mergekit's
        # defaults vary by method (dare_* rescale on), so spell them out.
        out.setdefault("normalize", False)
        if sparsifies:
            out.setdefault("rescale", False)
    return out

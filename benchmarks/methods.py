"""Every merge method on the zoo: at its defaults, and after the same fixed-budget search.

One engine serves every method (candidates are merged in place), so the comparison costs one
engine start. For each method:

- ``defaults``: the method's default coefficients (its ``default_weight`` / ``default_density``
  for every model, its default options), scored on the held-out split;
- ``search``: a fresh multi-objective study (TPE, ``--trials`` trials, model-wise coefficients and
  the method's searchable options, no baselines), then its balanced member — the one whose worst
  task's normalized gain on the *search* split is highest — scored on the held-out split (the
  choice never sees held-out data);
- ``hi_merging``: its own unattended procedure (model-wise grid, contribution analysis, conflict
  resolution) instead of a study, then the held-out score of the plan it chooses.

Normalized gain per task is (merged − base) / (specialist − base) on held-out data; RegMean's
Grams and HILA's golden data and importances are measured once, beside the work folder.

``--variant alt`` runs the seed methods' alternatives to their defaults (issue 22), in a work
folder of its own: RegMean's Grams on the search examples with α = 0.9 (mergeopt's earlier
default), Hi-Merging's per-model grid with probes at the models' own scales and the embedding
and head probed (mergeopt's earlier procedure), HILA pruned at one global quantile (its default
before the per-model quantiles won here).
``--variant alpha09``: RegMean on its calibration text (the default) with α = 0.9, which tells
the two changes to RegMean's defaults apart.

    .venv/bin/python benchmarks/methods.py [--trials 24] [--engine vllm|hf] [--quick] [--methods a,b]
        [--variant default|alt] [--zoo tiny|real] [--rounds N] [--out F]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from optimizer.checkpoints import ModelSet  # noqa: E402
from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines import make_engine  # noqa: E402
from optimizer.merge import MergePlan, ModelParams, get_method  # noqa: E402
from optimizer.search.baselines import baseline_plans  # noqa: E402
from optimizer.search.prepare import measured, prepare  # noqa: E402
from optimizer.search.study import make_sampler  # noqa: E402
from optimizer.search.trials import run_trials  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402
from optimizer.zoo.build import ZOO_VERSION  # noqa: E402
from optimizer.zoo.real import REAL_ZOO_VERSION  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "methods"
METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs_ties",
    "regmean",
    "widen",
    "hila",
    "multislerp",
)


#: Hi-Merging's procedure in each variant (the rounds are the same: 2).
HI_MERGING = {
    "default": {"rounds": 2},  # the authors': shared pair on the 10 × 10 grid, their probes, decoder layers
    "alt": {"rounds": 2, "grid": (0.3, 0.7, 1.0), "model_wise": "per_model", "probes": "scaled", "pseudo_layers": True},
    "alpha09": {"rounds": 2},
}


def _variant(config: dict, method: str, variant: str, limit: int) -> dict:
    """``config`` with ``variant``'s settings for ``method`` (the defaults: unchanged)."""
    if variant == "default":
        return config
    if variant == "alpha09":
        return {**config, "options": {"alpha": 0.9}} if method == "regmean" else config
    if method == "regmean":  # the Grams on the search examples the study scores, α 0.9
        for objective in config["objectives"]:
            objective["calibration_split"] = "search"
        return {**config, "calibration": {"examples": limit}, "options": {"alpha": 0.9}}
    if method == "hila":
        return {**config, "options": {"per_model": False}}
    return config


def _real_config(method: str, *, limit: int, held_out: int, trials: int, work: Path) -> dict:
    """``configs/real.yaml``'s objectives (chat prompts on SmolLM2's zoo) with model-wise coefficients."""
    from optimizer.config import load_config

    raw = json.loads(load_config(ROOT / "configs" / "real.yaml").model_dump_json())
    for objective in raw["objectives"]:
        objective.update({"limit": limit, "held_out_limit": held_out})
    return {
        **raw,
        "name": f"bench-{method}",
        "method": method,
        "granularity": "model",
        "search": {"trials": max(trials, 1), "seed": 0, "baselines": False},
        "storage": f"sqlite:///{work / 'study.db'}",
    }


def _config(zoo: Path, method: str, *, limit: int, held_out: int, trials: int, work: Path) -> dict:
    tasks = ("rev", "sort", "rot")
    return {
        "name": f"bench-{method}",
        "base": str(zoo / "base"),
        "models": {t: str(zoo / "specialists" / t) for t in tasks},
        "method": method,
        "granularity": "model",
        "weight": {"low": 0.0, "high": 1.5},
        "objectives": [
            {
                "name": t,
                "data": str(zoo / "tasks" / t),
                "metric": "exact_match",
                "max_tokens": 14,
                "limit": limit,
                "held_out_limit": held_out,
            }
            for t in tasks
        ],
        "search": {"trials": trials, "seed": 0, "baselines": False},
        # One data folder for every method: grams.safetensors, importance.safetensors, golden/.
        "storage": f"sqlite:///{work / 'study.db'}",
    }


def _held_out(engine, prepared, plan: MergePlan) -> dict[str, float]:
    engine.apply_plan(plan)
    return {t.name: t.score(engine, "held_out").value for t in prepared.tasks}


def _gain(scores: dict[str, float], base: dict[str, float], spec: dict[str, float]) -> dict[str, float]:
    out = {}
    for t, v in scores.items():
        span = spec[t] - base[t]
        out[t] = (v - base[t]) / span if span else math.nan
    return out


def _searchable(method: str) -> bool:
    """Whether a study of ``method`` has anything to search (per-model coefficients or options)."""
    record = get_method(method)
    return record.uses_weight or record.uses_density or bool(record.searchable)


def _default_plan(method: str, models: tuple[str, ...], prepared) -> MergePlan:
    record = get_method(method)
    params = {m: ModelParams(record.default_weight, record.default_density) for m in models}
    return MergePlan(method, models, params, {**prepared.config.options, "seed": 0})


def _balanced_search_member(study: optuna.Study, base: dict, spec: dict, names: list[str]):
    def worst(trial) -> float:
        gains = _gain(dict(zip(names, trial.values, strict=True)), base, spec)
        return min(g for g in gains.values() if not math.isnan(g))

    return max(study.best_trials, key=worst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--limit", type=int, default=32, help="search examples per task")
    parser.add_argument("--held-out", type=int, default=128, help="held-out examples per task")
    parser.add_argument("--methods", default=",".join((*METHODS, "hi_merging")))
    parser.add_argument("--quick", action="store_true", help="4 trials, 8 search examples: a smoke run")
    parser.add_argument("--out", default=None, help="results file name (default methods.json, methods-quick.json)")
    parser.add_argument("--variant", choices=tuple(HI_MERGING), default="default", help="the seed methods' settings")
    parser.add_argument("--zoo", choices=("tiny", "real"), default="tiny", help="real: the SmolLM2 zoo (--trials 0)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="Hi-Merging's analysis rounds (default: the variant's, 2); each round probes every layer",
    )
    args = parser.parse_args()
    if args.quick:
        args.trials, args.limit, args.held_out = 4, 8, 32
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = default_zoo_dir()
    make = _config
    if args.zoo == "real":  # SmolLM2: a trial costs ~20 s on 2 cores, so defaults only are the practical run
        from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

        build_real_zoo(default_real_zoo_dir(), log=print)
        make = lambda _zoo, method, **kw: _real_config(method, **kw)  # noqa: E731
    else:
        build_zoo(zoo)
    # Hi-Merging's procedure settings: the variant's, with --rounds over its rounds.
    hi_settings = {**HI_MERGING[args.variant], **({"rounds": args.rounds} if args.rounds else {})}
    work = WORK if args.variant == "default" else WORK.with_name(f"methods-{args.variant}")
    if args.zoo == "real":
        work = work.with_name(work.name + "-real")
    work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    # A method with nothing to search (Model Stock) is refused as a study's method: its tasks are
    # prepared under linear's config, and it is scored at its defaults only.
    cfgs = {
        m: config_from_dict(
            _variant(
                make(
                    zoo,
                    m if _searchable(m) else "linear",
                    limit=args.limit,
                    held_out=args.held_out,
                    trials=args.trials,
                    work=work,
                ),
                m,
                args.variant,
                args.limit,
            )
        )
        for m in methods
    }
    t0 = time.perf_counter()
    prepared = {m: measured(prepare(cfg), say=print) for m, cfg in cfgs.items()}  # Grams / importances, once
    measure_s = time.perf_counter() - t0
    first = prepared[methods[0]]
    models = first.models
    shared = ModelSet(models.base, models.specialists, data_dir=cfgs[methods[0]].study_dir())
    t0 = time.perf_counter()
    engine = make_engine(args.engine, shared)
    start_s = time.perf_counter() - t0
    names = [t.name for t in first.tasks]
    refs = baseline_plans(models.names)
    base = _held_out(engine, first, refs["base"])
    base_search = {}
    engine.apply_plan(refs["base"])
    base_search = {t.name: t.score(engine, "search").value for t in first.tasks}
    spec, spec_search = {}, {}
    for t in names:
        engine.apply_plan(refs[f"specialist:{t}"])
        task = next(x for x in first.tasks if x.name == t)
        spec[t] = task.score(engine, "held_out").value
        spec_search[t] = task.score(engine, "search").value
    results: dict[str, dict] = {}
    for method in methods:
        prep = prepared[method]
        row: dict = {}
        if method == "hi_merging":
            from optimizer.merge.hi_merging import hi_merging
            from optimizer.search.warm_starts import StudyProbe

            t0 = time.perf_counter()
            result = hi_merging(StudyProbe(prep, engine), method="hi_merging", **hi_settings)
            held = _held_out(engine, prep, result.plan)
            row["search"] = {
                "held_out": held,
                "gain": _gain(held, base, spec),
                "evaluated": len(result.evaluations),
                "probes": result.probes,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        else:
            held = _held_out(engine, prep, _default_plan(method, models.names, prep))
            row["defaults"] = {"held_out": held, "gain": _gain(held, base, spec), "options": dict(prep.config.options)}
            if not _searchable(method) or args.trials == 0:
                results[method] = row
                print(f"{method}: normalized gain {row['defaults']['gain']} (defaults only)", flush=True)
                continue
            study = optuna.create_study(directions=prep.directions, sampler=make_sampler(prep.config))
            t0 = time.perf_counter()
            run_trials(prep, study, engine, args.trials)
            seconds = time.perf_counter() - t0
            best = _balanced_search_member(study, base_search, spec_search, names)
            held = _held_out(engine, prep, MergePlan.from_dict(best.user_attrs["plan"]))
            row["search"] = {
                "held_out": held,
                "gain": _gain(held, base, spec),
                "trial": best.number,
                "params": best.params,
                "seconds": round(seconds, 1),
            }
        results[method] = row
        shown = {k: {t: round(v, 3) for t, v in row[k]["gain"].items()} for k in row}
        print(f"{method}: normalized gain {shown}", flush=True)
    engine.close()
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "zoo": args.zoo,
        "zoo_version": ZOO_VERSION if args.zoo == "tiny" else REAL_ZOO_VERSION,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "engine": args.engine,
        "variant": args.variant,
        "hi_merging": {k: list(v) if isinstance(v, tuple) else v for k, v in hi_settings.items()},
        "trials": args.trials,
        "search_examples": args.limit,
        "held_out_examples": args.held_out,
        "engine_start_s": round(start_s, 1),
        "study_data_s": round(measure_s, 1),
        "reference": {"base": base, "specialists": spec},
        "methods": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (args.out or ("methods-quick.json" if args.quick else "methods.json"))
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

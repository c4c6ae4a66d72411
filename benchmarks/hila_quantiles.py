"""HILA's pruning quantile: one over the whole importance table, or one per model (issue 22).

HILA prunes (model, unit) pairs below the ``q``-quantile of their importances. With one global
quantile, a model whose golden task is simply harder (larger losses, so larger importances
everywhere) keeps more units than the others; ``per_model: true`` measures each model in units of
its own mean importance and prunes each at its own quantile. This runs both on a zoo's measured
table, side by side at the same q, T and λ, and scores each merge on the held-out split:

- the importance table's scale per model (mean |I|, and the share of each model's pairs the
  global quantile keeps at each q);
- held-out score and normalized gain per task, and the worst task's gain, for q in ``--q``.

    .venv/bin/python benchmarks/hila_quantiles.py --zoo real [--q 0.2 0.4 0.6] [--engine vllm|hf]
        [--golden-limit 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer.config import config_from_dict, load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work"


def _config(zoo: str, work: Path):
    """The zoo's study config with ``method: hila`` and its data kept under ``work``."""
    storage = f"sqlite:///{work / 'study.db'}"
    if zoo == "real":
        from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

        build_real_zoo(default_real_zoo_dir(), log=print)
        config = load_config(ROOT / "configs" / "real.yaml")
        return config.model_copy(
            update={"name": "hila-q", "storage": storage, "method": "hila", "granularity": "model"}
        )
    from optimizer.zoo import build_zoo, default_zoo_dir

    root = default_zoo_dir()
    build_zoo(root)
    tasks = ("rev", "sort", "rot")
    return config_from_dict(
        {
            "name": "hila-q",
            "base": str(root / "base"),
            "models": {t: str(root / "specialists" / t) for t in tasks},
            "method": "hila",
            "objectives": [
                {"name": t, "data": str(root / "tasks" / t), "metric": "exact_match", "max_tokens": 14, "limit": 32}
                for t in tasks
            ],
            "storage": storage,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("real", "tiny"), default="real")
    parser.add_argument("--q", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--out", default=None, help="results file name (default hila_quantiles_<zoo>.json)")
    parser.add_argument(
        "--golden-limit",
        type=int,
        default=None,
        help="golden answers per specialist for the importances (default: the objectives' search"
        " limit; the exact measure costs one pass over them per unit and specialist: 391 units on the"
        " real zoo, over 100 minutes of a 2-core CPU at 48)",
    )
    args = parser.parse_args()

    import torch

    from objectives.tasks import score_tasks
    from optimizer.engines import make_engine
    from optimizer.merge import MergePlan
    from optimizer.merge.study_data import data_file, load_study_data
    from optimizer.search.prepare import measured, prepare
    from optimizer.search.references import references
    from optimizer.search.study import open_study

    work = WORK / f"hila_quantiles_{args.zoo}"
    work.mkdir(parents=True, exist_ok=True)
    config = _config(args.zoo, work)
    if args.golden_limit is not None:  # fewer search examples: fewer golden answers to measure on
        limited = [o.model_copy(update={"limit": args.golden_limit}) for o in config.objectives]
        config = config.model_copy(update={"objectives": limited})
    t0 = time.perf_counter()
    prepared = measured(prepare(config), say=print)  # golden data and importances, cached in `work`
    measure_s = time.perf_counter() - t0
    models = prepared.models.names
    table = load_study_data(data_file(config.study_dir(), "importance"), models)
    rows = torch.stack([torch.stack([v.double() for v in table[m].values()]) for m in models])  # (M, U)
    scale = {m: round(float(rows[i].abs().mean()), 6) for i, m in enumerate(models)}
    global_keep = {
        str(q): {
            m: round(float((rows[i] >= torch.quantile(rows.flatten(), q)).double().mean()), 3)
            for i, m in enumerate(models)
        }
        for q in args.q
    }
    print(f"mean |I| per model: {scale}; share kept by one global quantile: {global_keep}")

    study, prepared = open_study(prepared)
    t0 = time.perf_counter()
    engine = make_engine(args.engine, prepared.models)
    start_s = time.perf_counter() - t0
    runs = []
    try:
        refs = references(study, prepared, engine)
        for q in args.q:
            for per_model in (False, True):
                plan = MergePlan("hila", models, {}, {"q": q, "T": 1.0, "lambda": 1.0, "per_model": per_model})
                engine.apply_plan(plan)
                results = score_tasks(engine, prepared.tasks, "held_out")
                held = {t.name: r.value for t, r in zip(prepared.tasks, results, strict=True)}
                gain = {t: round(refs.gain(t, v), 4) for t, v in held.items()}
                runs.append(
                    {"q": q, "per_model": per_model, "held_out": held, "gain": gain, "min_gain": min(gain.values())}
                )
                print(f"q={q} per_model={per_model}: gain {gain}", flush=True)
    finally:
        engine.close()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "zoo": args.zoo,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "engine": args.engine,
        "golden_limit": args.golden_limit,
        "measure_s": round(measure_s, 1),
        "engine_start_s": round(start_s, 1),
        "importance_mean_abs": scale,
        "global_quantile_keeps": global_keep,
        "T": 1.0,
        "lambda": 1.0,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (args.out or f"hila_quantiles_{args.zoo}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

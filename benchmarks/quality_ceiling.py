"""How good can a merge method get on the zoo at all? An oracle search on the held-out split.

``benchmarks/quality.py`` measures what a study finds: it searches on the search split and is
judged on the held-out split. This script answers the question behind a missed quality target —
is the study short of what the method can do, or is the method short of the target? It runs
Optuna's TPE on the **held-out** scores themselves, maximizing the worst task's normalized gain
(merged − base) / (specialist − base), i.e. it selects on the data it is judged on. The best value
is therefore an optimistic estimate of the method family's ceiling in that search space, not a
result a user could reproduce, and it is stored apart from ``quality.json``.

Spaces are the product's own (``SearchSpace.suggest``, as a study's trials use it): ``layer``
(one weight and density per model and layer, embed and head; 36 parameters for TIES) and
``module`` (per layer and module kind: attention and MLP apart; 60 parameters).

    .venv/bin/python benchmarks/quality_ceiling.py [--method ties] [--space layer|module] [--trials 300]
    .venv/bin/python benchmarks/quality_ceiling.py --zoo-stats   # the zoo's task-vector sizes, cosines

Results go under ``<space>/<method>`` in ``results/quality_ceiling.json``.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import optuna  # noqa: E402
import torch  # noqa: E402
from quality import RESULTS, TARGET  # noqa: E402
from samplers import _clean, _config  # noqa: E402

from objectives.tasks import score_tasks  # noqa: E402
from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines import make_engine  # noqa: E402
from optimizer.gain import normalized_gain  # noqa: E402
from optimizer.search.baselines import baseline_plans  # noqa: E402
from optimizer.search.prepare import prepare  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402
from optimizer.zoo.build import ZOO_VERSION  # noqa: E402
from optimizer.zoo.stats import task_vector_stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ties")
    parser.add_argument("--space", choices=("layer", "module"), default="layer")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=256, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo-stats", action="store_true", help="only the zoo's task-vector sizes and alignment")
    args = parser.parse_args()
    zoo = default_zoo_dir()
    info = build_zoo(zoo)
    path = RESULTS / "quality_ceiling.json"
    if args.zoo_stats:
        stats = task_vector_stats(zoo, list(info["specialists"]))
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored["zoo_task_vectors"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "zoo_version": ZOO_VERSION, **stats}
        path.write_text(json.dumps(stored, indent=2) + "\n")
        print(json.dumps(stats, indent=2))
        return
    raw = _config(zoo, "layer", limit=8, held_out=args.held_out)
    raw.update(method=args.method, split_modules=args.space == "module", name="ceiling")
    prepared = prepare(config_from_dict(raw))
    tasks = [t.name for t in prepared.tasks]
    engine = make_engine("vllm", prepared.models)
    t0 = time.perf_counter()
    try:

        def held_out(plan) -> dict[str, float]:
            engine.apply_plan(plan)
            return {t: r.value for t, r in zip(tasks, score_tasks(engine, prepared.tasks, "held_out"), strict=True)}

        plans = baseline_plans(prepared.models.names)
        base = held_out(plans["base"])
        specialist = {t: held_out(plans[f"specialist:{t}"])[t] for t in tasks}

        def objective(trial: optuna.Trial) -> float:
            scores = held_out(prepared.space.suggest(trial))
            gain = {t: normalized_gain(scores[t], base[t], specialist[t]) for t in tasks}
            trial.set_user_attr("gain", gain)
            # A task whose specialist does not beat the base has no gain to keep (NaN): skip it.
            return min((g for g in gain.values() if not math.isnan(g)), default=math.nan)

        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed))
        curve = []
        while len(study.trials) < args.trials:
            # A candidate the engine cannot merge or score fails alone; the search goes on.
            study.optimize(objective, n_trials=min(50, args.trials - len(study.trials)), catch=(Exception,))
            curve.append({"trials": len(study.trials), "best_worst_gain": round(study.best_value, 4)})
            print(f"{args.method} {args.space}: {curve[-1]}", flush=True)
            best = study.best_trial
            result = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "zoo_version": ZOO_VERSION,
                "machine": f"{platform.node()} {platform.machine()}, {_device()}, vLLM engine",
                "config": {**vars(args), "parameters": len(prepared.space.distributions())},
                "wall_s": round(time.perf_counter() - t0, 1),
                "references": {"base": base, "specialist": specialist},
                "best": {"trial": best.number, "worst_gain": best.value, "gain": best.user_attrs["gain"]},
                "curve": curve,
                "ceiling_reaches_target": best.value >= TARGET,
            }
            _store(path, args.space, args.method, result)  # after every 50: a killed run keeps its part
    finally:
        engine.close()
    print(f"best worst-task gain {best.value:.3f} {best.user_attrs['gain']}; wrote {path}")


def _device() -> str:
    return f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"


def _store(path: Path, space: str, method: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.setdefault(space, {})[method] = _clean(result)
    path.write_text(json.dumps(stored, indent=2) + "\n")


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()

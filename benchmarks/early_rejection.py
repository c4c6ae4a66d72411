"""Early rejection: trials per hour and final held-out hypervolume, with and without it.

One engine, two studies of the same config and seed on the zoo (every search example of each
task — the "many examples" setting early rejection is for — baselines on): one scores every
candidate on the full search split, the other scores growing shares (``search.early_rejection``,
its default stages 25 % and 50 %) and stops dominated candidates. Both run through
``run_trials`` on a SQLite study, the path a user's search takes. Two search spaces:

- ``demo``: the demo's (TIES, one weight in [0, 1.5] and one density per model);
- ``wide``: TIES per layer with weights in [0, 3], where many candidates are plainly broken.

Measured per study: wall time, finished trials (COMPLETE + rejected) per hour, search examples
scored, rejected count, and the quality of what the search found: the hypervolume of the
held-out scores of its search front (reference point 0, as benchmarks/samplers.py) and the
front's most balanced member (highest worst-task normalized gain on held-out data).

    .venv/bin/python benchmarks/early_rejection.py [--setting demo|wide] [--trials 60] [--limit 128] [--held-out 128]
        [--search-examples 1024]

``--search-examples N`` draws N fresh search examples per task from the zoo's generators (the
zoo ships 128, too few for a subset's bound to be tight): the many-examples case of the issue.

Each setting's result is stored under its name (``wide-1024`` with ``--search-examples 1024``)
in ``results/early_rejection.json``; other settings already there are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from samplers import _balanced, _clean, _config, _hypervolume, _non_dominated  # noqa: E402

from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines import make_engine  # noqa: E402
from optimizer.merge import MergePlan  # noqa: E402
from optimizer.search.prepare import prepare  # noqa: E402
from optimizer.search.references import references  # noqa: E402
from optimizer.search.study import open_study  # noqa: E402
from optimizer.search.trials import run_trials  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402
from optimizer.zoo.build import ZOO_VERSION  # noqa: E402
from optimizer.zoo.tasks import get_task  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _run(engine, prepared, trials: int, refs) -> dict:
    study, prepared = open_study(prepared)
    t0 = time.perf_counter()
    run_trials(prepared, study, engine, trials)
    wall = time.perf_counter() - t0
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    rejected = [t for t in done if t.state == TrialState.PRUNED]
    per_task = sum(len(task.search) for task in prepared.tasks)
    examples = len(complete) * per_task + sum(t.user_attrs["rejected"]["examples"] for t in rejected)
    search = np.array([t.values for t in complete], dtype=float)
    front = [t for t, keep in zip(complete, _non_dominated(search), strict=True) if keep]
    held = {}
    for t in front:
        engine.apply_plan(MergePlan.from_dict(t.user_attrs["plan"]))
        held[t.number] = {task.name: task.score(engine, "held_out").value for task in prepared.tasks}
    names = [task.name for task in prepared.tasks]
    points = np.array([[held[t.number][n] for n in names] for t in front], dtype=float)
    on_front = [t.number for t, keep in zip(front, _non_dominated(points), strict=True) if keep]
    return {
        "wall_s": round(wall, 2),
        "finished": len(done),
        "complete": len(complete),
        "rejected": len(rejected),
        "trials_per_hour": round(len(done) / wall * 3600, 1),
        "examples_scored": examples,
        "examples_full": len(done) * per_task,
        "held_out_hypervolume": round(_hypervolume(points), 5),
        "search_front_size": len(front),
        "balanced": _clean(_balanced(held, on_front, refs)),
    }


def _larger_search_split(zoo: Path, task: str, n: int, into: Path) -> Path:
    """A task folder with the zoo's held-out split and ``n`` fresh search examples.

    Drawn by the zoo's own generator with a seed of their own, all prompts distinct and none in
    the held-out split, so held-out scores stay comparable with every other benchmark.
    """
    held_out = (zoo / "tasks" / task / "held_out.jsonl").read_text()
    seen = {json.loads(line)["prompt"] for line in held_out.splitlines()}
    rng = random.Random(f"mergeopt-bench:early-rejection:{task}")
    lines: list[str] = []
    while len(lines) < n:
        ex = get_task(task).sample(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            lines.append(json.dumps(ex.to_dict()) + "\n")
    folder = into / "tasks" / task
    folder.mkdir(parents=True)
    (folder / "held_out.jsonl").write_text(held_out)
    (folder / "search.jsonl").write_text("".join(lines))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", choices=("demo", "wide"), default="demo")
    parser.add_argument(
        "--search-examples",
        type=int,
        default=0,
        help="draw this many fresh search examples per task (the zoo ships 128): the many-examples case",
    )
    args = parser.parse_args()
    zoo = default_zoo_dir()
    build_zoo(zoo)
    base = _config(zoo, "model" if args.setting == "demo" else "layer", limit=args.limit, held_out=args.held_out)
    if args.setting == "wide":
        base["weight"] = {"low": 0.0, "high": 3.0}
    base["search"] = {"seed": args.seed, "baselines": True}
    (ROOT / "studies").mkdir(exist_ok=True)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "zoo_version": ZOO_VERSION,
        "machine": f"{platform.node()} {platform.machine()}, CPU only",
        "config": {
            "setting": args.setting,
            "granularity": base["granularity"],
            "weight": base["weight"],
            "trials": args.trials,
            "limit": args.limit,
            "held_out": args.held_out,
            "seed": args.seed,
        },
    }
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        if args.search_examples:
            for objective in base["objectives"]:
                objective["data"] = str(_larger_search_split(zoo, objective["name"], args.search_examples, Path(tmp)))
                objective["limit"] = args.search_examples
            result["config"]["limit"] = args.search_examples
        prepared = prepare(config_from_dict({**base, "name": "er-refs"}))
        engine = make_engine("vllm", prepared.models)
        try:
            refs = references(optuna.create_study(storage=None), prepared, engine)
            for label, early in (("off", None), ("on", {})):
                search = {**base["search"], "early_rejection": early} if early is not None else base["search"]
                config = config_from_dict(
                    {**base, "name": f"er-{label}", "storage": f"sqlite:///{tmp}/{label}.db", "search": search}
                )
                result[label] = _run(engine, prepare(config), args.trials, refs)
                print(label, json.dumps(result[label]), flush=True)
        finally:
            engine.close()
    off, on = result["off"], result["on"]
    result["trials_per_hour_ratio"] = round(on["trials_per_hour"] / off["trials_per_hour"], 3)
    result["hypervolume_ratio"] = round(on["held_out_hypervolume"] / off["held_out_hypervolume"], 4)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "early_rejection.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored = {k: v for k, v in stored.items() if isinstance(v, dict) and "off" in v}  # older flat files: dropped
    stored[args.setting + (f"-{args.search_examples}" if args.search_examples else "")] = result
    path.write_text(json.dumps(stored, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()

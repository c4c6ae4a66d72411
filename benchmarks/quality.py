"""Merge quality on held-out data: the study's most balanced merge against every default baseline.

Runs a real study on the zoo (``run_trials`` on SQLite, baselines included, vLLM engine), then
does what ``mergeopt report`` does: scores every front member and every baseline on the held-out
split and computes each task's normalized gain, (merged − base) / (specialist − base). The
balanced member is the front member whose worst task's gain is highest (maximin), chosen on
held-out scores as ``report`` and the demo's export choose it. The issue's target: ≥ 0.9 gain on
every task.

Settings (``--setting``):

- ``demo``: the demo's space (TIES, one weight and one density per model);
- ``layer``: TIES per layer (36 parameters) — more freedom to keep each specialist's layers.

    .venv/bin/python benchmarks/quality.py [--setting demo|layer] [--trials 120] [--method ties]
        [--calibration-split train|search]

A method that measures the models first (RegMean's Grams, HILA's importances) measures them once,
beside the temporary study; ``--calibration-split search`` measures RegMean on the search examples
the study scores, as mergeopt did before issue 22.

Each setting's result is stored under ``<setting>/<method>`` in ``results/quality.json``
(``<method>-<trials>trials-<limit>examples`` when those differ from the defaults, ``-seed<N>`` for
another seed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import optuna  # noqa: E402
from samplers import _clean, _config  # noqa: E402

from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines import make_engine  # noqa: E402
from optimizer.report import balanced_pick  # noqa: E402
from optimizer.report.rows import collect_rows  # noqa: E402
from optimizer.search.prepare import measured, prepare  # noqa: E402
from optimizer.search.study import open_study  # noqa: E402
from optimizer.search.trials import run_trials  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402
from optimizer.zoo.build import ZOO_VERSION  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("demo", "layer"), default="demo")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--limit", type=int, default=64, help="search examples per task (the demo's)")
    parser.add_argument("--held-out", type=int, default=256, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-split", default="train", help="the text RegMean measures its Grams on")
    args = parser.parse_args()
    zoo = default_zoo_dir()
    build_zoo(zoo)
    raw = _config(zoo, "model" if args.setting == "demo" else "layer", limit=args.limit, held_out=args.held_out)
    raw["method"] = args.method
    raw["search"] = {"seed": args.seed, "baselines": True}
    for objective in raw["objectives"]:
        objective["calibration_split"] = args.calibration_split
    if args.calibration_split == "search":  # the examples the old Grams were measured on, no more
        raw["calibration"] = {"examples": args.limit}
    (ROOT / "studies").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        config = config_from_dict({**raw, "name": "quality", "storage": f"sqlite:///{tmp}/quality.db"})
        prepared = measured(prepare(config), say=print)  # a method's study data, beside the study
        engine = make_engine("vllm", prepared.models)
        try:
            study, prepared = open_study(prepared)
            run_trials(prepared, study, engine, args.trials)
            rows, refs = collect_rows(study, prepared, engine)
        finally:
            engine.close()
    pick = balanced_pick(rows)
    tasks = [t.name for t in prepared.tasks]

    def row(r) -> dict:
        return {"trial": r.number, "label": r.label or "search", "held_out": r.held_out, "gain": r.gain}

    baselines = [row(r) for r in rows if r.label]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "zoo_version": ZOO_VERSION,
        "machine": f"{platform.node()} {platform.machine()}, CPU only, vLLM engine",
        "config": {**vars(args), "parameters": len(prepared.space.distributions())},
        "wall_s": round(time.perf_counter() - t0, 1),
        "references": {"base": refs.base, "specialist": refs.specialist},
        "balanced": row(pick) if pick else None,
        "baselines": baselines,
        "front_size": sum(r.on_front for r in rows),
        "target_met": bool(pick and all(not math.isnan(g) and g >= TARGET for g in pick.gain.values())),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "quality.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    key = args.method
    if (args.trials, args.limit) != (parser.get_default("trials"), parser.get_default("limit")):
        key += f"-{args.trials}trials-{args.limit}examples"  # a longer or finer study beside the default one
    if args.seed != parser.get_default("seed"):
        key += f"-seed{args.seed}"  # another seed of the same study, to see the spread
    if args.calibration_split != parser.get_default("calibration_split"):
        key += f"-calibration-{args.calibration_split}"
    stored.setdefault(args.setting, {})[key] = _clean(result)
    path.write_text(json.dumps(stored, indent=2) + "\n")
    print(f"{'member':28s} " + " ".join(f"{t:>14s}" for t in tasks))
    for r in ([row(pick)] if pick else []) + baselines:
        cells = " ".join(f"{r['held_out'][t]:.3f} ({r['gain'][t]:+.2f})" for t in tasks)
        print(f"{r['label'] + ' #' + str(r['trial']):28s} {cells}")
    print(f"target ≥ {TARGET} on every task: {'met' if result['target_met'] else 'not met'}; wrote {path}")


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()

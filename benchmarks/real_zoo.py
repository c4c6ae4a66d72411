"""mergeopt on a real LLM: SmolLM2-135M-Instruct and its three chat specialists (the real-model zoo).

Parts (each can run alone; results merge into ``benchmarks/results/real_zoo.json``):

- ``--timing``: where a trial's time goes in a study as users run it (``configs/real.yaml``'s
  objectives and search space, vLLM, SQLite): merge in place, scoring, and the rest (sampler,
  storage, loop), per trial; and a candidate merged in place against the reload-per-candidate
  practice (write the checkpoint, start a new vLLM on it, score once), from
  ``trial_overhead.measure``.
- ``--memory``: the worker's peak RSS against (N + 2) × model bytes + the engine's budget
  (``memory.run``, as for the tiny zoo).
- ``--quality``: studies of ``configs/real.yaml`` for a wall-clock budget per seed, the balanced
  front member's held-out worst-task normalized gain against every default baseline's.
- ``--golden``: the same study scored on golden data alone (each specialist's own answers to the
  prompts, NLL; no labels), its balanced member then scored on the labelled held-out tasks: can the
  specialists' answers stand in for labels?

    .venv/bin/python benchmarks/real_zoo.py --timing --memory
    .venv/bin/python benchmarks/real_zoo.py --quality --seeds 0 1 --minutes 60
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from optimizer.checkpoints import ModelSet  # noqa: E402
from optimizer.config import config_from_dict, load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("arith", "antonym", "extract")


def _zoo() -> tuple[dict, ModelSet]:
    from optimizer.zoo.real import REAL_ZOO_VERSION, build_real_zoo, default_real_zoo_dir

    info = build_real_zoo(default_real_zoo_dir(), log=print)
    root = Path(info["root"])
    info["zoo_version"] = REAL_ZOO_VERSION
    return info, ModelSet(root / "base", {t: root / "specialists" / t for t in TASKS})


def _config(name: str, storage: str, **update: object):
    config = load_config(ROOT / "configs" / "real.yaml")
    return config.model_copy(update={"name": name, "storage": storage, **update})


def _timed_study(config, trials: int, eager: bool) -> dict:
    """One study of ``trials`` trials on a fresh engine: its start, and each trial's split."""
    import optuna

    from optimizer.config import VllmConfig
    from optimizer.engines import make_engine
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials

    prepared = prepare(config)
    study, prepared = open_study(prepared)
    t0 = time.perf_counter()
    engine = make_engine("vllm", prepared.models, vllm=VllmConfig(enforce_eager=eager))
    start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        run_trials(prepared, study, engine, trials)
        loop = time.perf_counter() - t0
    finally:
        engine.close()
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    rows = []
    for t in done:
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append({"method": t.user_attrs.get("plan", {}).get("method"), "wall": wall, **t.user_attrs["seconds"]})
    sampled = [r for r in rows if r["method"] == config.method]
    return {
        "engine_start_s": round(start, 1),
        "trials": len(done),
        "examples_per_task": {t.name: len(t.search) for t in prepared.tasks},
        "parameters": len(prepared.space.distributions()),
        "per_trial_s_median": {
            k: round(statistics.median(r[k] for r in sampled), 3) for k in ("merge", "score", "wall")
        },
        "other_per_trial_s_median": round(statistics.median(r["wall"] - r["merge"] - r["score"] for r in sampled), 3),
        "between_trials_s": round((loop - sum(r["wall"] for r in rows)) / len(rows), 3),
        "ties_merge_s": [round(r["merge"], 2) for r in rows if r["method"] == "ties"],
        "study_loop_s": round(loop, 1),
    }


def timing(trials: int, plans: int) -> dict:
    """Per-trial split in a real study (vLLM eager and compiled), and merge in place vs reload."""
    from trial_overhead import measure

    from optimizer.search.prepare import prepare

    _, models = _zoo()
    out: dict = {}
    (ROOT / "studies").mkdir(exist_ok=True)
    for mode, eager in (("eager", True), ("compiled", False)):
        with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
            out[f"study_{mode}"] = _timed_study(_config(f"timing-{mode}", f"sqlite:///{tmp}/t.db"), trials, eager)
            print(mode, json.dumps(out[f"study_{mode}"]), flush=True)
            prepared = prepare(_config("prompts", f"sqlite:///{tmp}/p.db"))  # validates, writes nothing
    prompts = [prepared.tasks[0].metric.format.prompt(ex) for ex in prepared.tasks[0].search]
    out["merge_vs_reload"] = measure(models, prompts, plans)
    return out


def memory(plans: int) -> dict:
    """Worker peak RSS with the three specialists against the engine on the base alone + N × model."""
    from memory import run

    from optimizer.checkpoints import load_state_dict

    _, models = _zoo()
    model_gib = sum(t.numel() * 4 for t in load_state_dict(models.base).values()) / (1 << 30)  # float32 on CPU
    runtime = run(ModelSet(models.base, {}), 2)
    full = run(models, plans)
    n = len(models.names)
    budget = runtime["after_trials"]["peak_rss_gib"] + n * model_gib
    return {
        "model_gib_fp32": round(model_gib, 3),
        "specialists": n,
        "engine_on_base_alone": runtime,
        "with_specialists": full,
        "extra_over_engine_alone_gib": round(
            full["after_trials"]["peak_rss_gib"] - runtime["after_trials"]["peak_rss_gib"], 3
        ),
        "expected_extra_gib": round(n * model_gib, 3),
        "budget_engine_measured_gib": round(budget, 3),
        "within_1_gib_of_budget": bool(full["after_trials"]["peak_rss_gib"] <= budget + 1.0),
    }


def quality(seeds: list[int], minutes: float) -> dict:
    """Studies of configs/real.yaml for ``minutes`` each: the balanced member vs every baseline, held out."""
    from optimizer.engines import make_engine
    from optimizer.report import balanced_pick
    from optimizer.report.rows import collect_rows
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials

    info, _ = _zoo()
    out: dict = {"minutes_per_seed": minutes, "seeds": {}}
    for seed in seeds:
        with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
            config = _config(f"quality{seed}", f"sqlite:///{tmp}/q.db")
            config = config.model_copy(update={"search": config.search.model_copy(update={"seed": seed})})
            prepared = prepare(config)
            study, prepared = open_study(prepared)
            engine = make_engine("vllm", prepared.models)
            try:
                deadline = time.monotonic() + minutes * 60
                target = 0
                while time.monotonic() < deadline:
                    target += 1
                    run_trials(prepared, study, engine, target)
                rows, _ = collect_rows(study, prepared, engine)
            finally:
                engine.close()
            pick = balanced_pick(rows)
            baselines = {r.label: round(r.min_gain, 4) for r in rows if r.label}
            out["seeds"][str(seed)] = {
                "trials": target,
                "balanced_member": None
                if pick is None
                else {"trial": pick.number, "gain": pick.gain, "min_gain": round(pick.min_gain, 4)},
                "baselines_min_gain": baselines,
                "best_baseline": max(baselines.items(), key=lambda kv: kv[1]) if baselines else None,
            }
            print(json.dumps(out["seeds"][str(seed)]), flush=True)
    out["zoo"] = {"scores": info["scores"]}
    return out


def golden(seed: int, minutes: float) -> dict:
    """A study scored on golden NLL alone (each specialist's own answers, no labels), then its
    balanced member's held-out scores on the labelled tasks, beside the labelled study's."""
    from objectives.golden import generate_golden
    from objectives.tasks import load_tasks, score_tasks
    from optimizer.engines import lazy_engine, make_engine
    from optimizer.merge import MergePlan
    from optimizer.report import balanced_pick
    from optimizer.report.rows import collect_rows
    from optimizer.search import attrs
    from optimizer.search.prepare import prepare
    from optimizer.search.references import references
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials

    _zoo()
    with tempfile.TemporaryDirectory(dir=ROOT / "studies") as tmp:
        labelled = _config("labelled", f"sqlite:///{tmp}/l.db")
        labelled_tasks = prepare(labelled)
        folder = Path(tmp) / "golden"
        with lazy_engine("vllm", labelled_tasks.models) as engine:
            t0 = time.perf_counter()
            generate_golden(labelled, labelled_tasks.tasks, engine, out_dir=folder)
            golden_s = time.perf_counter() - t0
        objectives = [{"name": t, "data": str(folder / t), "metric": "nll"} for t in TASKS]
        config = config_from_dict(
            {
                **json.loads(labelled.model_dump_json()),
                "name": "golden",
                "storage": f"sqlite:///{tmp}/g.db",
                "objectives": objectives,
                "search": {"trials": 1, "seed": seed},
            }
        )
        prepared = prepare(config)
        study, prepared = open_study(prepared)
        engine = make_engine("vllm", prepared.models)
        try:
            deadline, target = time.monotonic() + minutes * 60, 0
            while time.monotonic() < deadline:
                target += 1
                run_trials(prepared, study, engine, target)
            rows, _ = collect_rows(study, prepared, engine)  # balanced on held-out golden NLL
            pick = balanced_pick(rows)
            assert pick is not None
            plan = MergePlan.from_dict(study.trials[pick.number].user_attrs[attrs.PLAN])
            engine.apply_plan(plan)
            tasks = load_tasks(labelled)
            held = {t.name: r.value for t, r in zip(tasks, score_tasks(engine, tasks, "held_out"), strict=True)}
            refs = references(optuna_study_in_memory(), labelled_tasks, engine)
        finally:
            engine.close()
    gain = {t: round(refs.gain(t, v), 4) for t, v in held.items()}
    return {
        "seed": seed,
        "minutes": minutes,
        "golden_generation_s": round(golden_s, 1),
        "trials": target,
        "balanced_member": {"trial": pick.number, "golden_nll_gain": pick.gain},
        "its_labelled_held_out": held,
        "its_labelled_gain": gain,
        "its_labelled_min_gain": min(gain.values()),
    }


def optuna_study_in_memory():
    import optuna

    return optuna.create_study(storage=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--golden", action="store_true", help="a study on golden NLL alone, scored on labels")
    parser.add_argument("--trials", type=int, default=16, help="--timing: trials of the timed study")
    parser.add_argument("--plans", type=int, default=5, help="merges timed in place (and in the memory run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--minutes", type=float, default=60.0, help="--quality: wall clock per seed")
    args = parser.parse_args()
    path = RESULTS / "real_zoo.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    stamp = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.machine()}, CPU only",
    }
    if args.timing:
        result["timing"] = {**stamp, **timing(args.trials, args.plans)}
    if args.memory:
        result["memory"] = {**stamp, **memory(args.plans)}
    if args.quality:
        result["quality"] = {**stamp, **quality(args.seeds, args.minutes)}
    if args.golden:
        result["golden"] = {**stamp, **golden(args.seeds[0], args.minutes)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from optimizer.zoo.real import REAL_ZOO_VERSION

    result["zoo_version"] = REAL_ZOO_VERSION
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Sampler study (issue 7): held-out hypervolume of the front against trial count, per sampler.

The question is which sampler ``search.sampler`` should default to. Every run searches the zoo's
three tasks (rev, sort, rot; TIES, weight in [0, 1.5], density in [0.1, 1]) in two settings:

- ``model``: one weight and one density per model (6 parameters, the demo's space);
- ``layer``: per layer, plus embeddings and head, per model (≥ 24 parameters: the count is
  printed and recorded), where a sampler's scaling with dimension shows.

Samplers: ``tpe``, ``gp``, ``nsga2`` and ``random`` on a 3-objective study (each task's search
score, maximized), each at Optuna 5's defaults; ``cmaes`` on one objective, the mean of the three
search scores — the scalarization mergekit-evolve uses — with the per-task scores kept as a user
attr so its fronts can be read the same way. Each sampler runs once per seed.

Studies live in memory and are driven by ask/tell, not by ``run_trials``: no baselines, no
storage, nothing that differs between samplers but the sampler. One engine serves every run
(candidates are merged in place), so the whole study costs one engine start.

Measure: at each checkpoint t, the Pareto front of trials 0..t−1 on their *search* scores is
scored on the held-out split (each trial once per run), and the hypervolume of those held-out
points' own non-dominated set is taken against the fixed reference point (0, 0, 0): exact match
lies in [0, 1], so runs, samplers and settings share one scale. The front is chosen on search
scores only, as a user would choose it; the held-out split only grades it. Also recorded per
checkpoint: the held-out front's most balanced member (highest worst-task normalized gain).

Paired starts: every sampler here draws its random start-up from a ``RandomSampler(seed)`` of
its own, so seed for seed the start-up trials coincide: ``tpe`` and ``random`` propose the same
first 10 trials (TPE's ``n_startup_trials``; seen in the smoke run), and ``gp`` (10 start-up
trials), ``nsga2`` (first generation, population 50) and ``cmaes`` (first trial) should too.
Early checkpoints therefore agree by construction; differences show where the samplers model.

Summary per setting: median over seeds of the hypervolume at each checkpoint; for each sampler,
the first checkpoint whose median reaches CMA-ES's median at 120 trials (or at the last
checkpoint if fewer trials are run); the default (``--default``) meets the issue's target when
that is ≤ 40 trials.

    .venv/bin/python benchmarks/samplers.py [--settings model,layer] [--samplers tpe,gp,nsga2,cmaes,random]
        [--seeds 0,1,2] [--trials 120] [--limit 32] [--held-out 64]
        [--checkpoints 10,20,30,40,60,80,100,120] [--default tpe] [--out results/samplers.json] [--quick]

``cmaes`` needs the ``cmaes`` package (``pip install cmaes``); the script refuses to start without
it rather than fail the first CMA-ES trial after minutes of other runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from optimizer.config import config_from_dict  # noqa: E402
from optimizer.engines import make_engine  # noqa: E402
from optimizer.engines.base import Engine  # noqa: E402
from optimizer.search._optuna import compute_hypervolume  # noqa: E402  (as optimizer/report/hypervolume.py)
from optimizer.search.front import nondominated  # noqa: E402
from optimizer.search.prepare import Prepared, prepare  # noqa: E402
from optimizer.search.references import References, references  # noqa: E402
from optimizer.zoo import build_zoo, default_zoo_dir  # noqa: E402
from optimizer.zoo.build import ZOO_VERSION  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("rev", "sort", "rot")
SETTINGS = ("model", "layer")
SAMPLERS = ("tpe", "gp", "nsga2", "cmaes", "random")
SCALARIZED = "cmaes"  # the one sampler run on the mean of the task scores; the reference of the target
REFERENCE_TRIALS = 120  # the target: reach CMA-ES's hypervolume at 120 trials ...
TARGET_TRIALS = 40  # ... in at most 40 trials
MAX_FAILURES_IN_A_ROW = 5  # more than this and the engine, not the candidates, is broken: stop


def _config(zoo: Path, granularity: str, *, limit: int, held_out: int) -> dict[str, Any]:
    """The demo's study (configs/demo.yaml) at the given granularity and split sizes."""
    return {
        "name": f"samplers-{granularity}",
        "base": str(zoo / "base"),
        "models": {t: str(zoo / "specialists" / t) for t in TASKS},
        "method": "ties",
        "granularity": granularity,
        "weight": {"low": 0.0, "high": 1.5},
        "density": {"low": 0.1, "high": 1.0},
        "objectives": [
            {
                "name": t,
                "data": str(zoo / "tasks" / t),
                "metric": "exact_match",
                "max_tokens": 14,
                "limit": limit,
                "held_out_limit": held_out,
            }
            for t in TASKS
        ],
        "search": {"seed": 0, "baselines": False},
    }


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Each sampler at Optuna's defaults, seeded; nothing tuned for this study."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")


def _non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the rows no other row dominates (all objectives maximized; equal rows are all kept)."""
    return nondominated(-points)


def _hypervolume(points: np.ndarray) -> float:
    """Hypervolume of maximized scores in [0, 1] against the fixed reference point 0 (Optuna minimizes)."""
    if not len(points):
        return 0.0
    front = points[_non_dominated(points)]
    return float(compute_hypervolume(-front, np.zeros(front.shape[1]), assume_pareto=True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _clean(value: Any) -> Any:
    """NaN → None, so the JSON stays valid (a task whose specialist does not beat the base has no gain)."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _search(engine: Engine, prepared: Prepared, sampler: str, seed: int, trials: int) -> tuple[optuna.Study, dict]:
    """Run ``trials`` asked trials of one sampler; returns the study and its timings and failures.

    Every trial's per-task search scores go to user attr ``scores`` (for CMA-ES the told value is
    their mean), so fronts are read from one place whatever the study's objectives are.
    """
    space = prepared.space
    distributions = space.distributions()
    names = [t.name for t in prepared.tasks]
    if sampler == SCALARIZED:
        study = optuna.create_study(storage=None, direction="maximize", sampler=_sampler(sampler, seed))
    else:
        study = optuna.create_study(storage=None, directions=prepared.directions, sampler=_sampler(sampler, seed))
    failures: list[dict[str, Any]] = []
    in_a_row = 0
    ask_s = merge_s = score_s = 0.0
    t_start = time.perf_counter()
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(distributions)
        t1 = time.perf_counter()
        ask_s += t1 - t0
        try:
            engine.apply_plan(space.plan_from_params(trial.params))
            t2 = time.perf_counter()
            merge_s += t2 - t1
            values = [task.score(engine, "search").value for task in prepared.tasks]
            score_s += time.perf_counter() - t2
            bad = [n for n, v in zip(names, values, strict=True) if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"objective {bad[0]!r} scored non-finite; the merged model is degenerate")
        except Exception as exc:  # a failed candidate: recorded, counted and printed, never hidden
            study.tell(trial, state=TrialState.FAIL)
            failures.append({"trial": trial.number, "error": _first_line(exc)})
            print(f"  trial {trial.number} FAILED: {_first_line(exc)}", flush=True)
            in_a_row += 1
            if in_a_row > MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(f"{in_a_row} trials failed in a row (last: {_first_line(exc)})") from exc
            continue
        in_a_row = 0
        trial.set_user_attr("scores", values)
        study.tell(trial, sum(values) / len(values) if sampler == SCALARIZED else values)
    timing = {
        "trials_s": round(time.perf_counter() - t_start, 2),
        "ask_s": round(ask_s, 3),
        "merge_s": round(merge_s, 3),
        "score_s": round(score_s, 3),
    }
    return study, {"seconds": timing, "failures": failures}


def _balanced(held: dict[int, dict[str, float]], numbers: Sequence[int], refs: References) -> dict[str, Any] | None:
    """The member with the highest worst-task normalized gain (NaN gains ignored), with its gains."""
    best: dict[str, Any] | None = None
    for number in numbers:
        gains = {t: refs.gain(t, v) for t, v in held[number].items()}
        finite = [g for g in gains.values() if not math.isnan(g)]
        worst = min(finite) if finite else math.nan
        if best is None or (not math.isnan(worst) and (math.isnan(best["worst_gain"]) or worst > best["worst_gain"])):
            best = {"trial": number, "worst_gain": worst, "gain": gains, "held_out": held[number]}
    return best


def _checkpoints(
    engine: Engine, prepared: Prepared, study: optuna.Study, checkpoints: Sequence[int], refs: References
) -> dict[str, Any]:
    """Held-out hypervolume (and balanced member) of the search front of trials 0..t−1, per checkpoint."""
    names = [t.name for t in prepared.tasks]
    complete: list[FrozenTrial] = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number
    )
    held: dict[int, dict[str, float]] = {}  # trial number → held-out scores, each front member scored once
    hv: list[float] = []
    front_sizes: list[int] = []
    balanced: list[dict[str, Any] | None] = []
    t0 = time.perf_counter()
    for t in checkpoints:
        members = [tr for tr in complete if tr.number < t]
        if not members:
            hv.append(0.0)
            front_sizes.append(0)
            balanced.append(None)
            continue
        search = np.array([tr.user_attrs["scores"] for tr in members], dtype=float)
        front = [tr for tr, keep in zip(members, _non_dominated(search), strict=True) if keep]
        for tr in front:
            if tr.number not in held:
                engine.apply_plan(prepared.space.plan_from_params(tr.params))
                held[tr.number] = {task.name: task.score(engine, "held_out").value for task in prepared.tasks}
        points = np.array([[held[tr.number][n] for n in names] for tr in front], dtype=float)
        on_front = [tr.number for tr, keep in zip(front, _non_dominated(points), strict=True) if keep]
        hv.append(_hypervolume(points))
        front_sizes.append(len(front))
        balanced.append(_balanced(held, on_front, refs))
    return {
        "hypervolume": hv,
        "search_front_size": front_sizes,
        "balanced": balanced,
        "held_out_scored": len(held),
        "held_out_s": round(time.perf_counter() - t0, 2),
    }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _summary(runs: list[dict[str, Any]], checkpoints: Sequence[int], default: str) -> dict[str, Any]:
    """Medians over seeds, and the first checkpoint at which each sampler reaches CMA-ES's reference."""
    ref_t = REFERENCE_TRIALS if REFERENCE_TRIALS in checkpoints else max(checkpoints)
    ref_i = list(checkpoints).index(ref_t)
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        per: dict[str, dict[str, Any]] = {}
        for sampler in dict.fromkeys(r["sampler"] for r in runs if r["setting"] == setting):
            rows = [r for r in runs if r["setting"] == setting and r["sampler"] == sampler]
            trials = sum(r["trials"] for r in rows) or 1
            per[sampler] = {
                "seeds": [r["seed"] for r in rows],
                "hv_median": [_median([r["hypervolume"][i] for r in rows]) for i in range(len(checkpoints))],
                "failures": sum(len(r["failures"]) for r in rows),
                "ask_s_per_trial": round(sum(r["seconds"]["ask_s"] for r in rows) / trials, 4),
                "wall_s_per_trial": round(sum(r["seconds"]["trials_s"] for r in rows) / trials, 4),
            }
        reference = per.get(SCALARIZED, {}).get("hv_median", [None] * len(checkpoints))[ref_i]
        for sampler, row in per.items():
            if sampler == SCALARIZED:
                continue
            reached = None
            if reference is not None:
                reached = next((t for t, v in zip(checkpoints, row["hv_median"], strict=True) if v >= reference), None)
            row["trials_to_reference"] = reached
        entry: dict[str, Any] = {
            "reference": {"sampler": SCALARIZED, "trials": ref_t, "hv_median": reference},
            "samplers": per,
        }
        if default in per and default != SCALARIZED:
            reached = per[default]["trials_to_reference"]
            entry["default"] = {
                "sampler": default,
                "trials_to_reference": reached,
                "target_trials": TARGET_TRIALS,
                "target_met": None if reference is None else (reached is not None and reached <= TARGET_TRIALS),
            }
        out[setting] = entry
    return out


def _table(summary: dict[str, Any], checkpoints: Sequence[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console = Console(width=160)
    for setting, entry in summary.items():
        ref = entry["reference"]
        ref_text = "n/a" if ref["hv_median"] is None else f"{ref['hv_median']:.4f}"
        table = Table(
            title=f"{setting}: median held-out hypervolume (reference: {SCALARIZED} @ {ref['trials']} = {ref_text})"
        )
        table.add_column("sampler")
        for t in checkpoints:
            table.add_column(str(t), justify="right")
        table.add_column("reaches ref @", justify="right")
        table.add_column("ask s/trial", justify="right")
        table.add_column("fails", justify="right")
        for sampler, row in entry["samplers"].items():
            reached = row.get("trials_to_reference", "—")
            if ref["hv_median"] is None and sampler != SCALARIZED:
                reached = "n/a"  # no CMA-ES run to compare with
            table.add_row(
                sampler,
                *(f"{v:.3f}" if v is not None else "—" for v in row["hv_median"]),
                "never" if reached is None else str(reached),
                f"{row['ask_s_per_trial']:.3f}",
                str(row["failures"]),
            )
        console.print(table)
        if "default" in entry:
            d = entry["default"]
            if d["target_met"] is None:
                console.print(f"default {d['sampler']}: no {SCALARIZED} run: no reference for the target")
            else:
                console.print(
                    f"default {d['sampler']}: reaches the reference at {d['trials_to_reference'] or 'no checkpoint'};"
                    f" target ≤ {d['target_trials']} trials met: {d['target_met']}"
                )


def _earlier_runs(path: Path, out: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Runs already in ``path`` from the same setup, by (setting, sampler, seed).

    Lets a long study go on where a killed one stopped, and a slow sampler (GP) be added later
    into the same summary; a file from a different setup (examples, trials, checkpoints) is
    replaced, never mixed in.
    """
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = ("search_examples", "held_out_examples", "trials", "checkpoints", "tasks")
    if any(old.get(k) != _clean(out[k]) for k in same):
        return {}
    return {(r["setting"], r["sampler"], r["seed"]): r for r in old.get("runs", [])}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown[0]!r}; use some of {', '.join(allowed)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=REFERENCE_TRIALS)
    parser.add_argument("--limit", type=int, default=32, help="search examples per task")
    parser.add_argument("--held-out", type=int, default=64, help="held-out examples per task")
    parser.add_argument("--checkpoints", default="10,20,30,40,60,80,100,120", help="trial counts (capped at --trials)")
    parser.add_argument("--default", default="tpe", help="the sampler the target is checked for")
    parser.add_argument("--out", default="results/samplers.json", help="relative to benchmarks/")
    parser.add_argument("--quick", action="store_true", help="model setting, tpe and random, seed 0, 6 trials")
    args = parser.parse_args()
    if args.quick:
        args.settings, args.samplers, args.seeds = "model", "tpe,random", "0"
        args.trials, args.checkpoints, args.out = 6, "3,6", "results/samplers-quick.json"
    settings = _names(args.settings, SETTINGS, "setting")
    samplers = _names(args.samplers, SAMPLERS, "sampler")
    seeds = _ints(args.seeds)
    checkpoints = sorted({min(t, args.trials) for t in _ints(args.checkpoints) if t > 0})
    if SCALARIZED in samplers and importlib.util.find_spec("cmaes") is None:
        raise SystemExit(
            "the cmaes sampler needs the 'cmaes' package (pip install cmaes); or leave it out of --samplers"
        )
    out_path = ROOT / "benchmarks" / args.out
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    zoo = default_zoo_dir()
    build_zoo(zoo)
    prepared = {
        s: prepare(config_from_dict(_config(zoo, s, limit=args.limit, held_out=args.held_out))) for s in settings
    }
    for s, prep in prepared.items():
        if any(t.direction != "maximize" for t in prep.tasks):  # the fixed reference point 0 assumes maximized [0, 1]
            raise SystemExit(f"setting {s}: every objective must be maximized")
    n_params = {s: len(p.space.distributions()) for s, p in prepared.items()}
    print("parameters per setting:", n_params, flush=True)
    if "layer" in n_params and n_params["layer"] < 24:
        raise SystemExit(f"the layer setting has {n_params['layer']} parameters; the issue asks for ≥ 24")

    first = prepared[settings[0]]
    t0 = time.perf_counter()
    engine = make_engine("vllm", first.models)
    start_s = time.perf_counter() - t0
    # Base and specialist held-out scores, measured once: every setting has the same models and tasks.
    refs = references(optuna.create_study(storage=None), first, engine)
    print(f"engine start {start_s:.1f} s; held-out base {refs.base}, specialists {refs.specialist}", flush=True)

    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "zoo_version": ZOO_VERSION,
        "machine": {"node": platform.node(), "cores": os.cpu_count(), "accelerator": "CPU only"},
        "engine": "vllm",
        "engine_start_s": round(start_s, 1),
        "optuna": optuna.__version__,
        "settings": {
            s: {
                "granularity": s,
                "parameters": n_params[s],
                "method": "ties",
                "weight": [0.0, 1.5],
                "density": [0.1, 1.0],
            }
            for s in settings
        },
        "tasks": list(TASKS),
        "search_examples": args.limit,
        "held_out_examples": args.held_out,
        "trials": args.trials,
        "seeds": seeds,
        "checkpoints": checkpoints,
        "hypervolume_reference_point": [0.0] * len(TASKS),
        "reference": {"base": refs.base, "specialists": refs.specialist, "specialist_of": refs.specialist_of},
        "runs": [],
        "summary": {},
    }
    runs: list[dict[str, Any]] = out["runs"]
    done = _earlier_runs(out_path, out)
    runs.extend(done.values())
    try:
        for setting in settings:
            prep = prepared[setting]
            for sampler in samplers:
                for seed in seeds:
                    if (setting, sampler, seed) in done:
                        print(f"{setting} / {sampler} / seed {seed}: kept from {out_path.name}", flush=True)
                        continue
                    print(f"{setting} / {sampler} / seed {seed}: {args.trials} trials", flush=True)
                    study, info = _search(engine, prep, sampler, seed, args.trials)
                    curve = _checkpoints(engine, prep, study, checkpoints, refs)
                    runs.append(
                        {
                            "setting": setting,
                            "sampler": sampler,
                            "seed": seed,
                            "trials": args.trials,
                            "objective": "mean of task scores" if sampler == SCALARIZED else "per-task scores",
                            **info,
                            **curve,
                            "balanced_last": curve["balanced"][-1] if curve["balanced"] else None,
                        }
                    )
                    t = info["seconds"]
                    shown = ", ".join(f"{c}: {v:.4f}" for c, v in zip(checkpoints, curve["hypervolume"], strict=True))
                    print(
                        f"  HV {shown} | {t['trials_s']:.1f} s trials (ask {t['ask_s']:.2f} s),"
                        f" {curve['held_out_s']:.1f} s held-out, {len(info['failures'])} failed",
                        flush=True,
                    )
                    out["summary"] = _summary(runs, checkpoints, args.default)
                    out_path.parent.mkdir(parents=True, exist_ok=True)
                    out_path.write_text(json.dumps(_clean(out), indent=2) + "\n")  # a killed run keeps what it did
    finally:
        engine.close()
    _table(out["summary"], checkpoints)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

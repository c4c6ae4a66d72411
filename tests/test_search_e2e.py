"""End to end through the real CLI: search, SIGKILL mid-trial, resume; pareto; export."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests._cli import run_cli, write_config, zoo_config, zoo_tasks

pytestmark = pytest.mark.slow


def _states(db: Path) -> dict[str, int]:
    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(db, timeout=5) as con:
            rows = con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    return {str(state): n for state, n in rows}


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc: vLLM's engine core and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _load(db: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def test_kill_mid_trial_then_resume(zoo, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "study.yaml", zoo_config("kill", limit=24, engine="vllm", search={"trials": 14, "seed": 0})
    )
    db = tmp_path / "studies" / "kill" / "study.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimizer.cli", "search", str(path), "--trials", "14"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # kill once ≥ 3 trials are done and one is running
            s = _states(db)
            if s.get("COMPLETE", 0) >= 3 and s.get("RUNNING", 0) == 1:
                break
            assert proc.poll() is None, "search ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("search never reached 3 complete trials")
        engine_procs = _descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert engine_procs, "the vLLM engine should run in child processes"
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in engine_procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in engine_procs if _alive(p)], "vLLM processes outlived the killed search"
    before = {t.number: t.values for t in _load(db, "kill").get_trials(states=(TrialState.COMPLETE,))}
    killed = [t.number for t in _load(db, "kill").get_trials(states=(TrialState.RUNNING,))]
    assert len(before) >= 3 and len(killed) == 1

    time.sleep(25)  # past the heartbeat grace period: the killed trial is now stale
    resumed = run_cli("search", str(path), "--trials", "14", cwd=tmp_path, check=True)
    # The engine shuts down on its own when the search ends, not by vLLM's kill after a timeout.
    assert "force killing" not in resumed.stdout + resumed.stderr

    study = _load(db, "kill")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 14
    after = {t.number: t.values for t in complete}
    assert all(after[n] == v for n, v in before.items()), "a completed trial changed or vanished"
    states = {t.number: t.state for t in study.get_trials()}
    assert states[killed[0]] == TrialState.FAIL
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    retried = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == killed[0]]
    assert retried and retried[0].state == TrialState.COMPLETE, "the killed trial was not retried"
    # Each baseline ran exactly once, whatever was interrupted.
    labels = [t.user_attrs["baseline"] for t in complete if "baseline" in t.user_attrs]
    assert len(labels) == len(set(labels)) == 9  # base, average, TA ×2, TIES, 3 specialists, Model Stock


def test_pareto_front_equals_best_trials(finished_study) -> None:
    cwd, study_dir = finished_study
    proc = run_cli("pareto", str(study_dir), cwd=cwd, check=True)
    study = _load(study_dir / "study.db", "fin")
    best = sorted(t.number for t in study.best_trials)
    shown = []
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if cells and cells[0].isdigit():
            shown.append(int(cells[0]))
    assert shown == best
    # Held-out scores were computed for every member and cached in the study (other tests sharing
    # this study may have cached more trials: `report` also scores the baselines).
    cached = study.user_attrs["held_out"]
    assert set(best) <= {int(n) for n in cached}
    assert all(set(cached[str(n)]) == set(zoo_tasks()) for n in best)


def test_export_reproduces_trial_scores(finished_study) -> None:
    from transformers import AutoModelForCausalLM

    from objectives.tasks import load_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_json
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.merge import MergePlan

    cwd, study_dir = finished_study
    study = _load(study_dir / "study.db", "fin")
    trial = max(
        (t for t in study.best_trials if "baseline" not in t.user_attrs),
        key=lambda t: sum(t.values),
        default=study.best_trials[0],
    )
    out = cwd / "exported"
    run_cli("export", str(study_dir), "--trial", str(trial.number), "--out", str(out), cwd=cwd, check=True)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))  # loads as a plain transformers model
    config = config_from_json(study.user_attrs["config"])
    engine = HFEngine(ModelSet(out, {}))
    engine.apply_plan(MergePlan("task_arithmetic", ()))  # the exported weights, unchanged
    scores = [task.score(engine, "search").value for task in load_tasks(config)]
    assert scores == pytest.approx(trial.values, abs=1e-9)

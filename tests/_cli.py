"""Helpers to run the real ``mergeopt`` command line in a subprocess and write study configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from optimizer.zoo import default_zoo_dir


def run_cli(*args: str, cwd: Path, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """``mergeopt ARGS`` as a user runs it (the module entry point of the console script)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mergeopt {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def zoo_tasks() -> list[str]:
    """The zoo's task names, in its canonical order (known before the zoo is built: tests use it at collection)."""
    from optimizer.zoo.tasks import TASK_NAMES

    return list(TASK_NAMES)


def zoo_config(name: str = "t", *, limit: int = 12, **overrides: object) -> dict:
    """A small study config on the zoo with absolute paths (so it runs from any folder)."""
    zoo = default_zoo_dir()
    tasks = zoo_tasks()
    config: dict = {
        "name": name,
        "base": str(zoo / "base"),
        "models": {t: str(zoo / "specialists" / t) for t in tasks},
        "method": "task_arithmetic",
        "granularity": "model",
        "weight": {"low": 0.0, "high": 1.5},
        "objectives": [
            {
                "name": t,
                "data": str(zoo / "tasks" / t),
                "metric": "exact_match",
                "max_tokens": 14,
                "limit": limit,
                "held_out_limit": 2 * limit,
            }
            for t in tasks
        ],
        "search": {"trials": 4, "seed": 0},
        "engine": "hf",
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trial_states(db: Path) -> dict[str, int]:
    """Trials per state in a study's SQLite file, read-only (what a test polls to kill a search mid-study)."""
    import sqlite3

    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    except sqlite3.Error:
        return {}

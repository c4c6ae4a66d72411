"""A real LLM end to end: SmolLM2-135M-Instruct and its chat specialists, through the CLI with vLLM.

What a user with their own Hugging Face chat models relies on, shown on the real-model zoo
(built once for the session, ~12 min on two cores, cached): the zoo is a merge problem saved as
hub checkpoints are; a per-layer search with chat prompts survives a SIGKILL; report, pick and
export work; the exported directory reproduces its trial's held-out scores in a fresh vLLM and in
transformers; and golden data is generated from the chat prompts a trial sends.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from tests._cli import run_cli, trial_states, write_config

pytestmark = pytest.mark.slow

TASKS = ("arith", "antonym", "extract")


def _objectives(zoo_root: Path, limit: int = 12, held_out: int = 24) -> list[dict[str, Any]]:
    tasks = zoo_root / "tasks"
    return [
        {
            "name": "arith",
            "data": str(tasks / "arith"),
            "metric": "exact_match",
            "chat": True,
            "prompt_template": "What is {{ a }} + {{ b }}?",
            "target_field": "answer",
            "max_tokens": 8,
            "limit": limit,
            "held_out_limit": held_out,
        },
        *(
            {
                "name": t,
                "data": str(tasks / t),
                "metric": "exact_match",
                "chat": True,
                "prompt_field": "question",
                "target_field": "answer",
                "max_tokens": 24 if t == "extract" else 8,
                "limit": limit,
                "held_out_limit": held_out,
            }
            for t in ("antonym", "extract")
        ),
    ]


def _config(zoo_root: Path, name: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "base": str(zoo_root / "base"),
        "models": {t: str(zoo_root / "specialists" / t) for t in TASKS},
        "method": "task_arithmetic",
        "granularity": "layer",
        "weight": {"low": 0.0, "high": 1.5},
        "objectives": _objectives(zoo_root),
        "search": {"trials": 10, "seed": 0},
        "engine": "vllm",
        "vllm": {"enforce_eager": True},  # starts in half the time: these studies are short
    }
    config.update(overrides)
    return config


def _dtypes(path: Path) -> set[str]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_the_real_zoo_is_a_merge_problem_saved_as_hub_checkpoints(real_zoo) -> None:
    root = Path(real_zoo["root"])
    criteria = real_zoo["criteria"]
    assert criteria["specialists_beat_base"] and criteria["task_arithmetic_loses"]
    assert all(g >= 0.2 for g in criteria["specialist_gain"].values())
    assert max(criteria["task_arithmetic_loss"].values()) >= 0.1
    stats = real_zoo["task_vectors"]  # small and nearly orthogonal, as real fine-tunes are
    assert all(0 < r < 0.05 for r in stats["relative_norm"].values())
    assert all(abs(c) < 0.3 for c in stats["cosine"].values())
    for model in ("base", *(f"specialists/{t}" for t in TASKS)):
        folder = root / model
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
        assert set().union(*(_dtypes(folder / s) for s in shards)) == {"BF16"}
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert (folder / "tokenizer.json").is_file()
        assert config.get("chat_template") or (folder / "chat_template.jinja").is_file()


@pytest.fixture(scope="module")
def real_study(real_zoo, tmp_path_factory) -> tuple[Path, Path]:
    """A per-layer task-arithmetic search on the real zoo (baselines, TIES among them, plus two
    sampled trials), SIGKILLed once three trials are complete, then resumed to its end."""
    cwd = tmp_path_factory.mktemp("real")
    path = write_config(cwd / "real.yaml", _config(Path(real_zoo["root"]), "real"))
    db = cwd / "studies" / "real" / "study.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimizer.cli", "search", str(path)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            s = trial_states(db)
            if s.get("COMPLETE", 0) >= 3 and s.get("RUNNING", 0) == 1:
                break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("the search never reached 3 complete trials")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{db}")
    before = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    (cwd / "before.json").write_text(json.dumps({str(k): v for k, v in before.items()}))
    time.sleep(25)  # past the heartbeat's grace period: the killed trial is stale
    run_cli("search", str(path), cwd=cwd, check=True, timeout=1500)
    return cwd, cwd / "studies" / "real"


def test_a_chat_search_on_the_real_zoo_survives_a_kill(real_study) -> None:
    cwd, study_dir = real_study
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{study_dir / 'study.db'}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 10
    before = {int(k): v for k, v in json.loads((cwd / "before.json").read_text()).items()}
    after = {t.number: t.values for t in complete}
    assert len(before) >= 3 and all(after[n] == v for n, v in before.items()), "a completed trial changed"
    labels = {t.user_attrs.get("baseline") for t in complete} - {None}
    assert "ties_defaults" in labels and len(labels) == 9  # every baseline once, TIES among them
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    searched = [t for t in complete if "baseline" not in t.user_attrs]
    assert searched and all(len(t.params) == 3 * 32 for t in searched)  # 30 layers + embed + head, per model
    # The specialists are what the zoo says: each best at its own task (search split).
    by_label = {t.user_attrs.get("baseline"): dict(zip(TASKS, t.values, strict=True)) for t in complete}
    for task in TASKS:
        assert by_label[f"specialist:{task}"][task] > by_label["base"][task]


def test_report_pick_and_an_export_that_reproduces_its_scores(real_study, real_zoo) -> None:
    cwd, study_dir = real_study
    proc = run_cli("report", str(study_dir), cwd=cwd, check=True, timeout=1500)
    assert (study_dir / "report" / "report.html").is_file() and "balanced member" in proc.stdout
    picked = run_cli("pick", str(study_dir), cwd=cwd, check=True, timeout=600)
    number = int(picked.stdout.split("picked trial ")[1].split(":")[0])
    out = cwd / "merged"
    run_cli(
        "export", str(study_dir), "--trial", str(number), "--out", str(out), "--dtype", "float32", cwd=cwd, check=True
    )
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{study_dir / 'study.db'}")
    expected = study.user_attrs["held_out"][str(number)]

    from objectives.tasks import load_tasks, score_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import VllmConfig, config_from_dict
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine

    tasks = load_tasks(config_from_dict(_config(Path(real_zoo["root"]), "real")))
    exported = ModelSet(out, {})
    with VLLMEngine(exported, settings=VllmConfig(enforce_eager=True)) as vllm:
        got = {t.name: r.value for t, r in zip(tasks, score_tasks(vllm, tasks, "held_out"), strict=True)}
        assert got == expected  # a fresh vLLM on the exported folder scores exactly what the trial scored
        # Both engines on the same weights: the same prompts, the same verdicts, the same likelihoods.
        wide = load_tasks(
            config_from_dict(
                _config(
                    Path(real_zoo["root"]),
                    "wide",
                    objectives=_objectives(Path(real_zoo["root"]), limit=8, held_out=32),
                )
            )
        )
        v_scores = score_tasks(vllm, wide, "held_out")
        pairs = [(t.metric.format.prompt(ex), t.metric.format.target(ex)) for t in wide for ex in t.held_out]
        v_ll = vllm.loglikelihood(pairs)
    with HFEngine(exported, device="cpu", dtype="float32") as hf:
        h_scores = score_tasks(hf, wide, "held_out")
        h_ll = hf.loglikelihood(pairs)
    verdicts = [
        (a, b)
        for v, h in zip(v_scores, h_scores, strict=True)
        for a, b in zip(v.per_example, h.per_example, strict=True)
    ]
    agree = sum(a == b for a, b in verdicts) / len(verdicts)
    assert agree >= 0.98, f"vLLM and transformers agree on {agree:.1%} of {len(verdicts)} verdicts"
    gap = sum(abs(a.logprob - b.logprob) for a, b in zip(v_ll, h_ll, strict=True)) / len(pairs)
    assert gap <= 0.05, f"mean |Δ log-likelihood| {gap:.4f} nats"


def test_golden_data_from_chat_prompts_and_an_nll_objective_on_it(real_zoo, tmp_path) -> None:
    """`mergeopt golden` answers the chat prompts a trial sends; an nll objective scores the specialist best."""
    root = Path(real_zoo["root"])
    config = _config(root, "gold", engine="hf", objectives=_objectives(root, limit=8, held_out=8))
    path = write_config(tmp_path / "gold.yaml", config)
    proc = run_cli("golden", str(path), cwd=tmp_path, check=True, timeout=1200)
    assert proc.stdout.count("answers by") == 3
    golden = tmp_path / "studies" / "gold" / "golden"
    rows = [json.loads(line) for line in (golden / "extract" / "held_out.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("<|im_start|>system\n") and rows[0]["prompt"].endswith(
        "<|im_start|>assistant\n"
    )
    assert sum(r["target"] == r["original_target"] for r in rows) >= 6  # the extract specialist's own answers

    from objectives.tasks import load_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.merge.plan import base_plan, specialist_plan

    nll = _config(
        root, "nll", engine="hf", objectives=[{"name": "extract", "data": str(golden / "extract"), "metric": "nll"}]
    )
    [task] = load_tasks(config_from_dict(nll))
    assert task.metric.format.prompt(task.held_out[0]) == rows[0]["prompt"]  # the stored prompt, BOS not doubled
    with HFEngine(ModelSet(root / "base", {t: root / "specialists" / t for t in TASKS}), device="cpu") as hf:
        hf.apply_plan(specialist_plan(TASKS, "extract"))
        own = task.score(hf, "held_out").value
        hf.apply_plan(base_plan(TASKS))
        base = task.score(hf, "held_out").value
    assert own < base

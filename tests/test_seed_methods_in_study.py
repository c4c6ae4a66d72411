"""The seed methods as a user runs them: a study on the zoo with RegMean, WIDEN or HILA.

What each method computes is tested in test_regmean_widen.py and test_golden_hila.py; here: the
study measures what the method needs once (Grams, golden data + importances) and caches it beside
the study, searches the method's own options, merges in the engines (transformers and the vLLM
worker) and exports with the same bound method.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from optimizer.checkpoints import load_state_dict
from optimizer.merge.regmean import gram_key, regmean_solve, shrink_gram
from optimizer.merge.study_data import load_study_data
from tests._cli import run_cli, write_config, zoo_config

pytestmark = pytest.mark.slow


def _study(cwd: Path, name: str, method: str, **extra: object) -> tuple[optuna.Study, Path]:
    config = zoo_config(name, limit=6, method=method, search={"trials": 3, "seed": 0, "baselines": False}, **extra)
    path = write_config(cwd / f"{name}.yaml", config)
    run_cli("search", str(path), cwd=cwd, check=True)
    study_dir = cwd / "studies" / name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")
    return study, study_dir


def test_regmean_study_measures_grams_once_searches_alpha_and_exports_the_solve(zoo, tmp_path) -> None:
    study, study_dir = _study(tmp_path, "rm", "regmean")
    grams_file = study_dir / "grams.safetensors"
    assert grams_file.is_file()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    alphas = [t.params["option.alpha"] for t in complete]
    assert len(set(alphas)) == 3 and all(0.1 <= a <= 0.95 for a in alphas)
    assert all(t.user_attrs["plan"]["options"]["alpha"] == t.params["option.alpha"] for t in complete)

    # Resuming finds the cached Grams (same file, not re-measured).
    stamp = grams_file.stat().st_mtime_ns
    run_cli("search", str(tmp_path / "rm.yaml"), "--trials", "4", cwd=tmp_path, check=True)
    assert grams_file.stat().st_mtime_ns == stamp

    # The exported q_proj is RegMean's closed form on the cached Grams.
    trial = complete[0]
    out = tmp_path / "export"
    run_cli("export", str(study_dir), "--trial", str(trial.number), "--out", str(out), cwd=tmp_path, check=True)
    merged = load_state_dict(out)
    config = json.loads(study.user_attrs["config"])
    models = tuple(config["models"])
    base = load_state_dict(Path(config["base"]))
    name = "model.layers.1.self_attn.q_proj.weight"
    deltas = [load_state_dict(Path(config["models"][m]))[name] - base[name] for m in models]
    weights = [trial.user_attrs["plan"]["params"][m]["weight"] for m in models]
    grams = [g[gram_key(name)] for g in load_study_data(grams_file, models).values()]
    expected = base[name] + regmean_solve(
        [d * w for d, w in zip(deltas, weights, strict=True)], grams, trial.params["option.alpha"]
    )
    torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shrink_gram(grams[0], 0.5), grams[0])  # the Grams are not diagonal: a real solve


def test_widen_study_searches_its_calibration(zoo, tmp_path) -> None:
    study, _ = _study(tmp_path, "wd", "widen")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    assert {"option.t", "option.s"} <= set(complete[0].params)
    assert all(t.user_attrs["plan"]["options"]["t"] == t.params["option.t"] for t in complete)


def test_hila_study_generates_golden_data_measures_importance_and_searches_q_t_lambda(zoo, tmp_path) -> None:
    study, study_dir = _study(tmp_path, "hl", "hila")
    assert (study_dir / "importance.safetensors").is_file()
    assert all((study_dir / "golden" / t / "search.jsonl").is_file() for t in ("rev", "sort", "rot"))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    assert {"option.q", "option.T", "option.lambda"} == {p for p in complete[0].params if p.startswith("option.")}
    data = load_study_data(study_dir / "importance.safetensors", ("rev", "sort", "rot"))
    assert set(data["rev"]) >= {"L00.attn.h0", "L00.attn.h1", "L00.attn.kv0", "L00.mlp"}


def test_vllm_worker_merges_regmean_like_transformers(zoo, tmp_path) -> None:
    """The vLLM worker binds the same Grams from the study's file: same plan, same answers."""
    from objectives.tasks import load_tasks
    from optimizer.checkpoints import ModelSet
    from optimizer.config import config_from_dict
    from optimizer.engines.hf_engine import HFEngine
    from optimizer.engines.vllm_engine import VLLMEngine
    from optimizer.merge import MergePlan, ModelParams

    _, study_dir = _study(tmp_path, "rmv", "regmean")
    config = config_from_dict(zoo_config("rmv", limit=16, method="regmean"))
    models = ModelSet(
        config.path(config.base),
        {m: config.path(p) for m, p in config.models.items()},
        data_dir=study_dir,
    )
    plan = MergePlan("regmean", tuple(config.models), {m: ModelParams(1.0) for m in config.models}, {"alpha": 0.5})
    tasks = load_tasks(config)
    hf = HFEngine(models)
    hf.apply_plan(plan)
    expected = [t.score(hf, "search").value for t in tasks]
    with VLLMEngine(models) as engine:
        engine.apply_plan(plan)
        got = [t.score(engine, "search").value for t in tasks]
    assert got == pytest.approx(expected, abs=1 / 16 + 1e-9)  # at most one verdict in 16 differs per task


def test_analyze_contributions_reports_conflicts_and_enqueues_warm_starts(zoo, tmp_path) -> None:
    _, study_dir = _study(tmp_path, "ca", "ties")
    proc = run_cli("analyze", "contributions", str(study_dir), cwd=tmp_path, check=True)
    assert "conflicts" in proc.stdout
    data = json.loads((study_dir / "contributions.json").read_text())
    assert set(data["models"]) == {"rev", "sort", "rot"}
    # The authors' probes, of the decoder layers only (their layer lists hold no embedding or head).
    assert data["weighting"] == "authors" and data["layers"] == ["L00", "L01", "L02", "L03"]
    assert (study_dir / "contributions.png").stat().st_size > 0
    study = optuna.load_study(study_name="ca", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert study.user_attrs["contributions"]["alpha"] == data["alpha"]
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert waiting and all(t.user_attrs.get("warm_start", "").startswith("contrib:") for t in waiting)
    # Asking again reuses the stored analysis and enqueues nothing twice; the next search runs them.
    proc = run_cli("analyze", "contributions", str(study_dir), cwd=tmp_path, check=True)
    assert "using the analysis stored" in proc.stdout
    assert len(
        [
            t
            for t in optuna.load_study(study_name="ca", storage=study._storage).get_trials()
            if t.state == TrialState.WAITING
        ]
    ) == len(waiting)
    run_cli("search", str(tmp_path / "ca.yaml"), "--trials", str(3 + len(waiting)), cwd=tmp_path, check=True)
    study = optuna.load_study(study_name="ca", storage=f"sqlite:///{study_dir / 'study.db'}")
    ran = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "warm_start" in t.user_attrs]
    assert len(ran) == len(waiting)

    # Conflicting layers get coefficients of their own in the model-wise space from then on
    # (threshold/margin chosen so that every layer counts as a conflict: a deterministic check).
    proc = run_cli(
        "analyze",
        "contributions",
        str(study_dir),
        "--threshold",
        "10",
        "--margin",
        "-10",
        "--no-enqueue",
        cwd=tmp_path,
        check=True,
    )
    layers = ["L00", "L01", "L02", "L03"]
    assert f"coefficients from now on: {', '.join(layers)}" in " ".join(proc.stdout.split())
    study = optuna.load_study(study_name="ca", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert study.user_attrs["layer_overrides"] == layers
    done = len(study.get_trials(states=(TrialState.COMPLETE,)))
    run_cli("search", str(tmp_path / "ca.yaml"), "--trials", str(done + 2), cwd=tmp_path, check=True)
    study = optuna.load_study(study_name="ca", storage=f"sqlite:///{study_dir / 'study.db'}")
    newest = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)[-2:]
    for trial in newest:
        assert {f"{m}.{layer}.weight" for m in ("rev", "sort", "rot") for layer in layers} <= set(trial.params)
        assert "rev.weight" in trial.params  # the shared model-wise coefficients stay
        assert set(trial.user_attrs["plan"]["params"]) >= {"rev", "rev.L02", "sort.L03"}


def test_golden_command_writes_specialist_answers_once(zoo, tmp_path) -> None:
    config = write_config(tmp_path / "g.yaml", zoo_config("g", limit=4))
    first = run_cli("golden", str(config), cwd=tmp_path, check=True)
    folder = tmp_path / "studies" / "g" / "golden" / "rev"
    rows = [json.loads(line) for line in (folder / "search.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["target"] for r in rows)
    # The rev specialist masters its task: its golden answers are the labelled answers.
    assert sum(r["target"].strip() == r["original_target"].strip() for r in rows) >= 3
    stamp = (folder / "search.jsonl").stat().st_mtime_ns
    second = run_cli("golden", str(config), cwd=tmp_path, check=True)
    assert (folder / "search.jsonl").stat().st_mtime_ns == stamp
    assert first.stdout.count("answers by") == second.stdout.count("answers by") == 3


def test_hi_merging_study_runs_the_procedure_once_then_searches_on(zoo, tmp_path) -> None:
    config = zoo_config(
        "hm",
        limit=6,
        method="hi_merging",
        search={"trials": 3, "seed": 0, "baselines": False, "hi_merging": {"rounds": 1, "grid": [0.5, 1.0]}},
    )
    path = write_config(tmp_path / "hm.yaml", config)
    first = run_cli("search", str(path), cwd=tmp_path, check=True)
    assert "Hi-Merging:" in first.stdout
    study_dir = tmp_path / "studies" / "hm"
    study = optuna.load_study(study_name="hm", storage=f"sqlite:///{study_dir / 'study.db'}")
    recorded = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "hi_merging" in t.user_attrs]
    assert len(recorded) >= 3  # the model-wise grid alone scores several plans
    chosen = [t for t in recorded if t.user_attrs.get("hi_merging_choice")]
    assert len(chosen) == 1 and study.user_attrs["hi_merging"]["plan"] == chosen[0].user_attrs["plan"]
    # A resumed search does not run the procedure again; it searches on with the sampler.
    n = len(study.get_trials(states=(TrialState.COMPLETE,)))
    second = run_cli("search", str(path), "--trials", str(n + 2), cwd=tmp_path, check=True)
    assert "Hi-Merging:" not in second.stdout
    study = optuna.load_study(study_name="hm", storage=f"sqlite:///{study_dir / 'study.db'}")
    after = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(after) == n + 2 and len([t for t in after if "hi_merging" in t.user_attrs]) == len(recorded)

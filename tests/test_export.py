"""Export as users take a model away: HF dir + mergekit.yaml that rebuilds it + a model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from optimizer.checkpoints import load_state_dict
from tests._cli import run_cli


def _trial(study_dir: Path) -> optuna.trial.FrozenTrial:
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{study_dir / 'study.db'}")
    searched = [t for t in study.best_trials if "baseline" not in t.user_attrs]
    return max(searched or study.best_trials, key=lambda t: sum(t.values))


def test_exported_mergekit_yaml_rebuilds_the_same_tensors(finished_study, tmp_path) -> None:
    cwd, study_dir = finished_study
    trial = _trial(study_dir)
    out = tmp_path / "merged"
    run_cli("export", str(study_dir), "--trial", str(trial.number), "--out", str(out), cwd=cwd, check=True)
    config = out / "mergekit.yaml"
    assert config.is_file()
    cli = Path(sys.executable).with_name("mergekit-yaml")
    rebuilt = tmp_path / "mergekit-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(cli), str(config), str(rebuilt), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = load_state_dict(out), load_state_dict(rebuilt)
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name].float(), tensor.float(), atol=1e-6, rtol=0, msg=name)


def test_export_writes_a_model_card_with_scores_and_the_reproducing_command(finished_study, tmp_path) -> None:
    cwd, study_dir = finished_study
    trial = _trial(study_dir)
    out = tmp_path / "card"
    run_cli("export", str(study_dir), "--trial", str(trial.number), "--out", str(out), cwd=cwd, check=True)
    card = (out / "README.md").read_text()
    meta = json.loads((out / "mergeopt.json").read_text())
    config = json.loads(
        optuna.load_study(study_name=None, storage=f"sqlite:///{study_dir / 'study.db'}").user_attrs["config"]
    )
    assert config["base"] in card and all(path in card for path in config["models"].values())
    assert f"--trial {trial.number}" in card and "mergekit-yaml mergekit.yaml" in card
    for task, value in meta["values"].items():
        assert f"| {task} | {value:.4f} |" in card
    assert meta["plan"]["method"] == "task_arithmetic" and "task_arithmetic" in card


def test_a_method_mergekit_lacks_ships_our_config_and_says_so(tmp_path, monkeypatch) -> None:
    from optimizer.merge import MergeMethod
    from optimizer.merge._registry import _REGISTRY
    from optimizer.merge.plan import MergePlan
    from optimizer.model_card import model_card

    method = MergeMethod(name="_test_only", merge=lambda b, d, p, o, g: b, summary="test method", mergekit=None)
    monkeypatch.setitem(_REGISTRY, method.name, method)  # visible to this test only
    card = model_card(
        study="s",
        trial=3,
        label=None,
        plan=MergePlan("_test_only", ("a",)),
        base="/b",
        models={"a": "/a"},
        num_layers=2,
        search={"t": 0.5},
        held_out=None,
        storage_arg="studies/s",
        no_mergekit="mergekit has no `_test_only` method",
    )
    assert "mergekit has no `_test_only` method" in card and "mergeopt.json" in card
    assert "not measured" in card
    with pytest.raises(Exception, match="no mergekit equivalent"):
        from optimizer.mergekit_yaml import to_yaml

        to_yaml(MergePlan("_test_only", ("a",)), base_path=tmp_path, model_paths={"a": tmp_path}, num_layers=2)


def test_a_large_model_exports_as_hub_shards_that_load_as_one(finished_study, tmp_path) -> None:
    """Past --max-shard-size the weights are split as hub checkpoints are, index included, and
    transformers loads them into the very model the single-file export holds."""
    from transformers import AutoModelForCausalLM

    cwd, study_dir = finished_study
    trial = _trial(study_dir)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    run_cli("export", str(study_dir), "--trial", str(trial.number), "--out", str(whole), cwd=cwd, check=True)
    args = ("--trial", str(trial.number), "--out", str(sharded), "--max-shard-size", "1MB")
    run_cli("export", str(study_dir), *args, cwd=cwd, check=True)
    assert sorted(p.name for p in whole.glob("*.safetensors")) == ["model.safetensors"]
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(p.stat().st_size <= 1_000_000 + 100_000 for p in sharded.glob("*.safetensors"))  # + header
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    a = AutoModelForCausalLM.from_pretrained(str(whole)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(sharded)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_shard_size_that_is_not_a_size_is_refused(finished_study, tmp_path) -> None:
    cwd, study_dir = finished_study
    out = tmp_path / "never"
    proc = run_cli("export", str(study_dir), "--trial", "0", "--out", str(out), "--max-shard-size", "big", cwd=cwd)
    assert proc.returncode == 2
    assert "shard size 'big' is not a size" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()

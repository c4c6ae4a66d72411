"""Bad input: one clear line on stderr, exit code 2, and nothing written (no study, no export)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests._cli import run_cli, write_config, zoo_config


def _assert_refused(proc, *needles: str, cwd: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("mergeopt: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (cwd / "studies").exists(), "a refused command must not create a study"


def _mismatched_model(tmp: Path, zoo_dir: Path) -> Path:
    """A copy of the rev specialist with one tensor of the wrong shape."""
    out = tmp / "bad_model"
    shutil.copytree(zoo_dir / "specialists" / "rev", out)
    state = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name][:-1].contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _empty_split_data(tmp: Path, zoo_dir: Path) -> Path:
    data = tmp / "data_empty"
    data.mkdir()
    shutil.copy(zoo_dir / "tasks" / "rev" / "search.jsonl", data / "search.jsonl")
    (data / "held_out.jsonl").write_text("")
    return data


CASES = {
    "missing model dir": (lambda tmp, zoo: {"base": str(tmp / "nope")}, ["does not exist", "nope"]),
    "shape mismatch": (
        lambda tmp, zoo: {"models": {**zoo_config()["models"], "rev": str(_mismatched_model(tmp, zoo))}},
        ["model.layers.1.mlp.up_proj.weight", "shape"],
    ),
    "unknown method": (lambda tmp, zoo: {"method": "frankenmerge"}, ["frankenmerge", "ties", "linear"]),
    "low > high bound": (
        lambda tmp, zoo: {"weight": {"low": 1.0, "high": 0.5}},
        ["weight", "low 1.0 is above high 0.5"],
    ),
    "missing data file": (
        lambda tmp, zoo: {"objectives": [{**zoo_config()["objectives"][0], "data": str(tmp / "missing.jsonl")}]},
        ["missing.jsonl", "does not exist"],
    ),
    "empty split": (
        lambda tmp, zoo: {"objectives": [{**zoo_config()["objectives"][0], "data": str(_empty_split_data(tmp, zoo))}]},
        ["held_out", "empty"],
    ),
    "unknown objective metric": (
        lambda tmp, zoo: {"objectives": [{**zoo_config()["objectives"][0], "metric": "bleu"}]},
        ["objectives.0.metric", "bleu", "exact_match"],
    ),
    "duplicate objective names": (
        lambda tmp, zoo: {"objectives": [zoo_config()["objectives"][0]] * 2},
        ["appears twice"],
    ),
    "density outside (0, 1]": (lambda tmp, zoo: {"density": {"low": 0.0, "high": 1.0}}, ["density", "(0, 1]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused(case: str, tmp_path: Path, zoo) -> None:
    from optimizer.zoo import default_zoo_dir

    make, needles = CASES[case]
    cfg = zoo_config(**make(tmp_path, default_zoo_dir()))
    path = write_config(tmp_path / "study.yaml", cfg)
    proc = run_cli("search", str(path), cwd=tmp_path)
    _assert_refused(proc, *needles, cwd=tmp_path)


def test_malformed_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: demo\nmodels: [a, b\nmethod: ties\n")
    proc = run_cli("search", str(path), cwd=tmp_path)
    _assert_refused(proc, "malformed YAML", "line", cwd=tmp_path)


def test_unknown_field_is_refused(tmp_path: Path, zoo) -> None:
    path = write_config(tmp_path / "study.yaml", {**zoo_config(), "methd": "ties"})
    proc = run_cli("search", str(path), cwd=tmp_path)
    _assert_refused(proc, "methd", "unknown field", cwd=tmp_path)


def test_nonpositive_trials_is_refused(tmp_path: Path, zoo) -> None:
    path = write_config(tmp_path / "study.yaml", zoo_config())
    proc = run_cli("search", str(path), "--trials", "0", cwd=tmp_path)
    _assert_refused(proc, "--trials 0", cwd=tmp_path)


def test_pickled_weights_are_refused(tmp_path: Path, zoo) -> None:
    from optimizer.zoo import default_zoo_dir

    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(default_zoo_dir() / "base" / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"not really a pickle")
    path = write_config(tmp_path / "study.yaml", zoo_config(base=str(bad)))
    proc = run_cli("search", str(path), cwd=tmp_path)
    _assert_refused(proc, "pytorch_model.bin", "safetensors", cwd=tmp_path)


def test_missing_study_is_refused(tmp_path: Path) -> None:
    proc = run_cli("pareto", str(tmp_path / "studies" / "nothing"), cwd=tmp_path)
    _assert_refused(proc, "no study", cwd=tmp_path)


def test_export_refuses_bad_trial_and_existing_dir(finished_study) -> None:
    cwd, study_dir = finished_study
    out = cwd / "exports" / "x"
    proc = run_cli("export", str(study_dir), "--trial", "999", "--out", str(out), cwd=cwd)
    assert proc.returncode == 2 and "no trial 999" in proc.stderr
    assert not out.exists()
    taken = cwd / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    proc = run_cli("export", str(study_dir), "--trial", "0", "--out", str(taken), cwd=cwd)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]

"""Bad input: one clear line on stderr, exit code 2, and nothing written (no study, no export).

Where a study exists already (a worker joining, a resumed search), "nothing written" means its
storage file is byte for byte what it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests._cli import run_cli, write_config, zoo_config
from tests._postgres import PostgresServer, free_port, postgres_server  # noqa: F401 (fixture)


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


def _corrupt_model(tmp: Path, zoo_dir: Path) -> Path:
    """A copy of the rev specialist whose safetensors file is cut off in the middle of its header."""
    out = tmp / "corrupt_model"
    shutil.copytree(zoo_dir / "specialists" / "rev", out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return out


def _data_without_target(tmp: Path, zoo_dir: Path) -> Path:
    """Task data whose rows name the answer 'answer' where the metric reads 'target'."""
    data = tmp / "data_renamed"
    data.mkdir()
    for split in ("search", "held_out"):
        text = (zoo_dir / "tasks" / "rev" / f"{split}.jsonl").read_text()
        (data / f"{split}.jsonl").write_text(text.replace('"target":', '"answer":'))
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
    "corrupt safetensors": (
        lambda tmp, zoo: {"models": {**zoo_config()["models"], "rev": str(_corrupt_model(tmp, zoo))}},
        ["corrupt_model/model.safetensors", "not a readable safetensors file"],
    ),
    "objective data missing a column": (
        lambda tmp, zoo: {
            "objectives": [{**zoo_config()["objectives"][0], "data": str(_data_without_target(tmp, zoo))}]
        },
        ["lack the field 'target'", "they have: prompt, answer"],
    ),
    "vllm memory share outside (0, 1]": (
        lambda tmp, zoo: {"vllm": {"gpu_memory_utilization": 1.5}},
        ["vllm.gpu_memory_utilization", "less than or equal to 1"],
    ),
    "tensor parallel above the visible GPUs": (
        lambda tmp, zoo: {"engine": "vllm", "vllm": {"tensor_parallel_size": 64}},
        ["tensor_parallel_size 64 needs 64 GPUs", "visible here"],
    ),
    "a KV cache larger than the machine's memory": (
        lambda tmp, zoo: {"engine": "vllm", "vllm": {"cpu_kv_cache_gib": 100000}},
        ["memory: this study needs", "of host memory", "a smaller vllm.cpu_kv_cache_gib"],
    ),
    "a method with nothing to search": (
        lambda tmp, zoo: {"method": "model_stock"},
        ["'model_stock' has nothing to search", "baseline"],
    ),
    "unreachable storage server": (
        lambda tmp, zoo: {"storage": f"postgresql://u:secret@127.0.0.1:{free_port()}/db"},
        ["cannot reach the postgresql server at 127.0.0.1:", "start it", "u:***@"],
    ),
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


# -- a study that exists already: nothing may change in it -------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mergeopt: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_wrong_database_password_is_refused(tmp_path: Path, zoo, postgres_server: PostgresServer) -> None:  # noqa: F811
    url = postgres_server.url(password="not-the-password")
    path = write_config(tmp_path / "study.yaml", zoo_config(storage=url))
    proc = run_cli("search", str(path), cwd=tmp_path)
    _assert_refused(proc, "password authentication failed", "fix the user or password", cwd=tmp_path)
    assert "not-the-password" not in proc.stderr
    proc = run_cli("worker", "--storage", url, "--study", "t", cwd=tmp_path)
    _assert_refused(proc, "password authentication failed", cwd=tmp_path)


def test_worker_refuses_a_study_that_does_not_exist(finished_study) -> None:
    cwd, study_dir = finished_study
    db = study_dir / "study.db"
    before = _digest(db)
    proc = run_cli("worker", "--storage", str(db), "--study", "nope", cwd=cwd)
    _assert_one_line_error(proc, "no study 'nope'", "it has: fin")
    assert _digest(db) == before


def test_search_refuses_other_models_on_an_existing_study(finished_study) -> None:
    cwd, study_dir = finished_study
    db = study_dir / "study.db"
    before = _digest(db)
    config = zoo_config("fin", search={"trials": 10, "seed": 1})
    config["models"] = dict(list(config["models"].items())[:2])  # one specialist fewer
    path = write_config(cwd / "other-models.yaml", config)
    proc = run_cli("search", str(path), cwd=cwd)
    _assert_one_line_error(proc, "study 'fin' already exists with a different 'models'")
    assert _digest(db) == before


def test_models_changed_on_disk_are_refused(tmp_path: Path, zoo) -> None:
    from optimizer.zoo import default_zoo_dir

    model = tmp_path / "rev"
    shutil.copytree(default_zoo_dir() / "specialists" / "rev", model)
    config = zoo_config("moved", limit=4, search={"trials": 1, "seed": 0, "baselines": False})
    config["models"]["rev"] = str(model)
    path = write_config(tmp_path / "study.yaml", config)
    run_cli("search", str(path), cwd=tmp_path, check=True)
    db = tmp_path / "studies" / "moved" / "study.db"
    before = _digest(db)
    # Retrained in place: same names, shapes and dtypes (so the same header), other values.
    state = load_file(str(model / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in state.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})

    proc = run_cli("search", str(path), "--trials", "2", cwd=tmp_path)
    _assert_one_line_error(proc, f"model 'rev' at {model} changed on disk since study 'moved' started")
    proc = run_cli("worker", "--storage", str(db), "--study", "moved", "--trials", "2", cwd=tmp_path)
    _assert_one_line_error(proc, "changed on disk", "start a new study")
    assert _digest(db) == before


@contextlib.contextmanager
def _full_disk(folder: Path) -> Iterator[dict]:
    """A folder where writes soon fail: a 256 KiB tmpfs (as root), else a file-size limit.

    The tmpfs gives the real ENOSPC ("No space left on device"). Where mounting is not allowed,
    RLIMIT_FSIZE on the child process makes the kernel refuse writes past 256 KiB with EFBIG
    ("File too large"; Python ignores the SIGXFSZ that comes with it) — a real write failure too.
    Yields extra subprocess arguments.
    """
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]).returncode == 0
    try:
        if mounted:
            yield {}
        else:
            limit = 256 * 1024
            yield {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))}
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_export_to_a_full_disk_is_refused(finished_study, tmp_path: Path) -> None:
    cwd, study_dir = finished_study
    with _full_disk(tmp_path / "full") as extra:
        out = tmp_path / "full" / "merged"
        proc = subprocess.run(
            [sys.executable, "-m", "optimizer.cli", "export", str(study_dir), "--trial", "0", "--out", str(out)],
            cwd=cwd,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
            **extra,
        )
        left = sorted(p.name for p in (tmp_path / "full").iterdir())
    _assert_one_line_error(proc, "cannot write export to", "nothing was written")
    assert "No space left on device" in proc.stderr or "File too large" in proc.stderr
    assert left == [], f"a failed export left {left}"

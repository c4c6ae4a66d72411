"""Unattended and at scale, through the real CLI: several workers, killed workers, bad candidates,
engine restarts, Ctrl-C, status.

Every process here is a real ``mergeopt search`` / ``mergeopt worker`` on the zoo with the
transformers engine and a few examples per task, so trials take a fraction of a second. A worker is
killed "mid-trial" deterministically: it is frozen (SIGSTOP), the storage is asked whether it owns a
RUNNING trial, and only then is it SIGKILLed (else thawed and asked again).

Engine failures are real: an enqueued plan for the wrong models makes the engine raise in
``apply_plan``, exactly as a plan the engine cannot build does; NaN weights come from a real
overflow. No test-only hook exists in the product code. Only the out-of-memory test uses a
stand-in engine (a test double in this file), since no accelerator memory can run out here.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optimizer.search.attrs import OWNER as OWNER_ATTR
from optimizer.search.storage import make_storage
from tests._cli import run_cli, write_config, zoo_config, zoo_tasks
from tests._engines import BlankEngine
from tests._postgres import PostgresServer, postgres_server  # noqa: F401 (fixture)
from tests._sqlite_writes import count_write_transactions

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
N_BASELINES = 6 + len(zoo_tasks())  # base, uniform average, TA 1.0 / 0.5, TIES, each specialist, Model Stock


def _spawn(cwd: Path, log: str, *args: str, nice: int = 0) -> subprocess.Popen:
    """``mergeopt ARGS`` in the background, its output in ``cwd/log`` (a pipe could fill and block it).

    ``nice`` lowers its CPU priority: processes already running trials are niced so that a worker
    started later gets the cores it needs to start (on 2 cores, two busy searches would otherwise
    finish a study before a third process has even imported its libraries).
    """
    out = (cwd / log).open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "optimizer.cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )


def _finish(proc: subprocess.Popen, cwd: Path, log: str, timeout: float = 180) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{log} did not finish in {timeout} s:\n{(cwd / log).read_text()[-3000:]}")
    text = (cwd / log).read_text()
    assert proc.returncode == 0, f"{log} exited {proc.returncode}:\n{text[-3000:]}"
    return text


def _study(url: str, name: str, timeout: float = 60) -> optuna.Study:
    """The study once its creator has stored its config (what joiners wait for too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            study = optuna.load_study(study_name=name, storage=make_storage(url, create=False))
            if study.user_attrs.get("config"):
                return study
        except Exception:  # not created yet (or its file not yet there)
            pass
        assert time.monotonic() < deadline, f"study {name} did not appear in {timeout} s"
        time.sleep(0.2)


def _wait(what: str, condition: Callable[[], bool], procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), f"a process ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _owners(study: optuna.Study, state: TrialState | None = None) -> Counter:
    """Trials per owner pid (optionally of one state)."""
    trials = study.get_trials(deepcopy=False, states=None if state is None else (state,))
    return Counter(t.user_attrs[OWNER_ATTR]["pid"] for t in trials if OWNER_ATTR in t.user_attrs)


def _kill_mid_trial(proc: subprocess.Popen, study: optuna.Study, timeout: float = 60) -> int:
    """SIGKILL ``proc`` while it runs a trial (its plan chosen); returns that trial's number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        mine = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(OWNER_ATTR, {}).get("pid") == proc.pid and "plan" in t.user_attrs  # merging
        ]
        if mine:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return mine[0].number
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the worker never ran a trial that could be killed")


def _check_recovered(study: optuna.Study, target: int, killed: int) -> None:
    """The study holds ``target`` COMPLETE trials, baselines ran once, the killed trial was retried."""
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert target <= len(complete) <= target + 2  # two workers looking at once may overshoot by one each
    numbers = [t.number for t in complete]
    assert len(numbers) == len(set(numbers)), "two COMPLETE trials share a number"
    labels = [t.user_attrs["baseline"] for t in complete if "baseline" in t.user_attrs]
    assert sorted(labels) == sorted(set(labels)) and len(labels) == N_BASELINES, labels
    enqueued = [t for t in trials if "baseline" in t.user_attrs and "failed_trial" not in t.system_attrs]
    assert len(enqueued) == N_BASELINES, "baselines were enqueued more than once"
    dead = next(t for t in trials if t.number == killed)
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state for t in retries] == [TrialState.COMPLETE], "the killed trial was not retried exactly once"
    assert retries[0].user_attrs.get("plan") == dead.user_attrs.get("plan")
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_three_workers_on_postgresql_one_killed(zoo, tmp_path: Path, postgres_server: PostgresServer) -> None:  # noqa: F811
    """Two `search`es race to create a new study, a `worker` joins; one search is SIGKILLed mid-trial."""
    url = postgres_server.create_database(f"w_{uuid.uuid4().hex[:12]}")
    # Enough trials that the late worker joins long before the searches finish: a worker needs
    # ~8 s of CPU to start (Python, transformers, the tokenizer, the engine) and the two searches
    # finish ~2 trials a second between them, so they run niced while it starts.
    target = 80
    write_config(tmp_path / "s.yaml", zoo_config("pg", limit=40, storage=url, search={"trials": target, "seed": 0}))
    a = _spawn(tmp_path, "a.log", "search", "s.yaml", nice=15)
    b = _spawn(tmp_path, "b.log", "search", "s.yaml", nice=15)
    try:
        study = _study(url, "pg")
        c = _spawn(tmp_path, "c.log", "worker", "--storage", url, "--study", "pg")
        try:
            # All three at work (each has finished a trial) before one dies.
            _wait("three busy workers", lambda: len(_owners(study, TrialState.COMPLETE)) == 3, [a, b, c])
            killed = _kill_mid_trial(b, study)
            _finish(a, tmp_path, "a.log")
            worker_log = _finish(c, tmp_path, "c.log")
        finally:
            c.kill()
    finally:
        a.kill()
        b.kill()
    assert "joined study pg" in worker_log and "***" in worker_log and postgres_server.password not in worker_log
    _check_recovered(study, target, killed)
    assert set(_owners(study, TrialState.COMPLETE)) == {a.pid, b.pid, c.pid}


def test_two_workers_on_a_journal_one_killed_then_status(zoo, tmp_path: Path) -> None:
    """`search` and a `worker` share a journal; the search is SIGKILLed mid-trial; status reads the result."""
    journal = tmp_path / "j" / "study.log"
    target = 80  # the worker joins after ~30 of them on 2 cores
    write_config(
        tmp_path / "s.yaml",
        zoo_config("jr", limit=12, storage=f"journal://{journal}", search={"trials": target, "seed": 0}),
    )
    a = _spawn(tmp_path, "a.log", "search", "s.yaml", nice=15)
    try:
        study = _study(str(journal), "jr")
        b = _spawn(tmp_path, "b.log", "worker", "--storage", str(journal), "--study", "jr")
        try:
            _wait("two busy workers", lambda: len(_owners(study, TrialState.COMPLETE)) == 2, [a, b])
            killed = _kill_mid_trial(a, study)
            _finish(b, tmp_path, "b.log")
        finally:
            b.kill()
    finally:
        a.kill()
    study = optuna.load_study(study_name="jr", storage=make_storage(str(journal)))
    _check_recovered(study, target, killed)
    dead = next(t for t in study.get_trials() if t.number == killed)
    assert f"pid {a.pid}) stopped mid-trial" in dead.user_attrs["fail_reason"]

    status = run_cli("status", str(journal), cwd=tmp_path, check=True).stdout
    complete = len(study.get_trials(states=(TrialState.COMPLETE,)))
    assert f"COMPLETE {complete}" in status and "FAIL 1" in status
    assert f"baselines: {N_BASELINES}/{N_BASELINES} complete" in status
    assert f"front: {len(study.best_trials)} trials" in status
    assert "failures: 1\n" in status and "1 x worker: its worker (" in status and f"(trials {killed})" in status
    assert "workers seen: 2 (0 running a trial now)" in status
    assert f"eta: done ({complete}/{target} complete)" in status
    assert "/h complete in the last 1 h" in status and "/h overall" in status
    assert f"worker {os.uname().nodename} pid {b.pid}:" in status


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_simultaneous_starts_enqueue_the_baselines_once(kind: str, zoo, tmp_path: Path, request) -> None:
    """Six processes' worth of `open_study` released at one instant on a new study: one creator."""
    from optimizer.config import config_from_dict
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study

    if kind == "postgresql":
        url = request.getfixturevalue("postgres_server").create_database(f"r_{uuid.uuid4().hex[:12]}")
    else:
        url = f"sqlite:///{tmp_path / 'r.db'}" if kind == "sqlite" else f"journal://{tmp_path / 'r.log'}"
    prepared = prepare(config_from_dict(zoo_config("race", limit=4)))
    barrier = threading.Barrier(6)
    studies: list[optuna.Study] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            studies.append(open_study(prepared, storage_url=url)[0])  # each opens its own storage
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(studies) == 6
    trials = studies[0].get_trials()
    labels = [t.user_attrs["baseline"] for t in trials]
    assert len(labels) == len(set(labels)) == N_BASELINES
    assert studies[0].user_attrs["config"] and studies[0].user_attrs["models_fingerprint"]


def _plan(models: list[str], weight: float, method: str = "task_arithmetic", **options: object) -> dict:
    params = {m: {"weight": weight, "density": 1.0} for m in models}
    return {"method": method, "models": models, "params": params, "options": options}


def _small_study(tmp_path: Path, name: str, **overrides: object) -> tuple[Path, str]:
    """A study (SQLite) with one sampled trial and no baselines: enqueued trials run next, in order."""
    cfg = write_config(
        tmp_path / "s.yaml", zoo_config(name, limit=4, search={"trials": 4, "seed": 0, "baselines": False}, **overrides)
    )
    run_cli("search", str(cfg), "--trials", "1", cwd=tmp_path, check=True)
    return cfg, f"sqlite:///{tmp_path / 'studies' / name / 'study.db'}"


def test_nan_candidate_fails_and_engine_restarts_after_three_engine_errors(zoo, tmp_path: Path) -> None:
    cfg, url = _small_study(tmp_path, "bad")
    study = optuna.load_study(study_name="bad", storage=make_storage(url))
    models = zoo_tasks()
    # Unnormalized linear merge with λ = 1e38 per model: (Σλ)·θ_base overflows float32 → Inf weights.
    study.enqueue_trial({}, user_attrs={"plan": _plan(models, 1e38, "linear", normalize=False)})
    for _ in range(3):  # plans for other models than the engine holds: its apply_plan raises
        study.enqueue_trial({}, user_attrs={"plan": _plan(models[:2], 1.0)})
    proc = run_cli("search", str(cfg), "--trials", "4", cwd=tmp_path, check=True)

    trials = study.get_trials()
    nan, *broken = trials[1:5]
    assert nan.state == TrialState.FAIL and nan.user_attrs["fail_kind"] == "candidate"
    assert "NaN or Inf" in nan.user_attrs["fail_reason"]
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_kind"] == "engine" for t in broken)
    assert all("engine holds" in t.user_attrs["fail_reason"] for t in broken)
    assert "the engine failed 3 trials in a row" in proc.stderr and "engine restarted (start 2" in proc.stderr
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4  # the study went on after all of it
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_engine_that_cannot_restart_stops_the_worker_cleanly(zoo, tmp_path: Path) -> None:
    from optimizer.zoo import default_zoo_dir

    base = tmp_path / "base"
    shutil.copytree(default_zoo_dir() / "base", base)
    cfg, url = _small_study(tmp_path, "dies", base=str(base))
    study = optuna.load_study(study_name="dies", storage=make_storage(url))
    models = zoo_tasks()
    for _ in range(6):  # good trials first: the base vanishes while they run, after the engine loaded it
        study.enqueue_trial({}, user_attrs={"plan": _plan(models, 0.5)})
    for _ in range(3):
        study.enqueue_trial({}, user_attrs={"plan": _plan(models[:2], 1.0)})
    proc = _spawn(tmp_path, "run.log", "search", str(cfg), "--trials", "10")
    try:
        _wait("the run's first trial", lambda: study.get_trials(deepcopy=False)[1].state != TrialState.WAITING, [proc])
        proc.send_signal(signal.SIGSTOP)
        base.rename(tmp_path / "base-moved")  # a restart cannot load the base any more
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 2, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("mergeopt: error: the engine failed 3 trials in a row"), last
    assert "restarting it failed too" in last and f"resume with: mergeopt search {cfg}" in last
    trials = study.get_trials()
    assert [t.state for t in trials[1:7]] == [TrialState.COMPLETE] * 6
    assert [t.user_attrs.get("fail_kind") for t in trials[7:10]] == ["engine"] * 3
    assert not [t for t in trials if t.state == TrialState.RUNNING], "a RUNNING trial was left behind"


def test_ctrl_c_marks_the_trial_interrupted_and_resume_finishes(zoo, tmp_path: Path) -> None:
    target = 30
    cfg = write_config(tmp_path / "s.yaml", zoo_config("int", limit=8, search={"trials": target, "seed": 0}))
    db = tmp_path / "studies" / "int" / "study.db"
    proc = _spawn(tmp_path, "run.log", "search", str(cfg))
    try:
        study = _study(f"sqlite:///{db}", "int")
        _wait("3 complete trials", lambda: len(study.get_trials(states=(TrialState.COMPLETE,))) >= 3, [proc])
        cut = _freeze_in_trial(proc, db)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 130, log
    assert f"interrupted: trial {cut} marked FAIL (interrupted) and queued again" in log
    assert f"Resume with: mergeopt search {cfg}" in log
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [(t.number, t.user_attrs["fail_reason"]) for t in failed] == [(cut, "interrupted")]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == cut]
    assert retry.state == TrialState.WAITING

    run_cli("search", str(cfg), cwd=tmp_path, check=True)
    study = optuna.load_study(study_name="int", storage=make_storage(f"sqlite:///{db}"))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == target
    assert any(t.system_attrs.get("failed_trial") == cut for t in complete), "the interrupted trial was not re-run"
    labels = [t.user_attrs["baseline"] for t in complete if "baseline" in t.user_attrs]
    assert len(labels) == len(set(labels)) == N_BASELINES


def test_out_of_memory_fails_the_trial_without_restarting_the_engine(zoo, tmp_path: Path) -> None:
    """Both kinds of OOM (torch's, and a real MemoryError from a 1 PiB allocation) are candidate-sized."""
    import torch

    from optimizer.config import config_from_dict
    from optimizer.engines.supervisor import EngineSupervisor
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials

    class RunsOutOfMemory(BlankEngine):
        """A stand-in engine (test double) whose first two scorings run out of memory."""

        def __init__(self, models: object) -> None:
            super().__init__(models)
            self.calls = 0

        def generate(self, prompts: list[str], *, max_tokens: int, stop: list[str]) -> list[str]:
            self.calls += 1
            if self.calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if self.calls == 2:
                bytearray(1 << 50)  # raises MemoryError: no machine has a pebibyte to give
            return super().generate(prompts, max_tokens=max_tokens, stop=stop)

    config = zoo_config("oom", limit=2, storage=f"sqlite:///{tmp_path / 'oom.db'}", search={"baselines": False})
    prepared = prepare(config_from_dict(config))
    study, prepared = open_study(prepared)
    supervisor = EngineSupervisor(lambda: RunsOutOfMemory(prepared.models), prepared.models, log=lambda _: None)
    run_trials(prepared, study, supervisor, target=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert [t.user_attrs["fail_kind"] for t in trials[:2]] == ["memory", "memory"]
    assert trials[0].user_attrs["fail_reason"].startswith("out of memory: OutOfMemoryError: CUDA out of memory")
    assert trials[1].user_attrs["fail_reason"].startswith("out of memory: MemoryError")
    assert supervisor.starts == 1 and supervisor.engine_failures == 0


def test_a_dead_workers_trial_is_retried_even_when_the_target_is_reached(zoo, tmp_path: Path) -> None:
    """Two live workers can overshoot the target while a killed one's trial is still RUNNING (the
    heartbeat's grace period has not passed): the last worker fails that trial at once (its owner
    ran on this machine and is gone) and runs its retry, so no candidate is left behind."""
    from optimizer.config import config_from_dict
    from optimizer.engines.supervisor import EngineSupervisor
    from optimizer.search.owners import this_process as _this_process
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study
    from optimizer.search.trials import run_trials

    config = zoo_config("dead", limit=2, storage=f"sqlite:///{tmp_path / 'dead.db'}", search={"baselines": False})
    prepared = prepare(config_from_dict(config))
    study, prepared = open_study(prepared)
    engine = BlankEngine()
    supervisor = EngineSupervisor(lambda: engine, prepared.models, log=lambda _: None)
    run_trials(prepared, study, supervisor, target=2)

    # A third trial, owned by a process of this machine that has exited, left RUNNING mid-trial.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = study.ask()
    plan = prepared.space.suggest(orphan)
    orphan.set_user_attr("plan", plan.to_dict())
    orphan.set_user_attr(OWNER_ATTR, {**_this_process(), "pid": gone.pid, "pid_start": None, "beat": time.time()})

    before = len(engine.plans)
    assert run_trials(prepared, study, supervisor, target=2) == 3
    trials = study.get_trials()
    dead = next(t for t in trials if t.number == orphan.number)
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_kind"] == "worker"
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["plan"] == plan.to_dict()
    assert engine.plans[before:] == [plan], "the retry must merge the dead trial's plan, and nothing else run"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def _freeze_in_trial(proc: subprocess.Popen, db: Path) -> int:
    """SIGSTOP ``proc`` inside a trial's engine work (a RUNNING trial with its plan); returns its number.

    The check reads the SQLite file directly with a near-zero lock timeout: the process may be
    stopped while it holds the write lock, and then the check must give up at once and let it go on.
    """
    query = (
        "SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id"
        " WHERE t.state = 'RUNNING' AND a.key = 'plan'"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=0.05)) as con:
                running = [row[0] for row in con.execute(query)]
        except sqlite3.OperationalError:
            running = []  # stopped while holding the write lock: let it go on and try again
        if running:
            return running[0]
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    pytest.fail("never caught the search inside a trial")


def _per_layer_study(storage: str) -> tuple:
    """A per-layer TIES study on the zoo (no baselines) and a supervisor around a blank engine."""
    from optimizer.config import config_from_dict
    from optimizer.engines.supervisor import EngineSupervisor
    from optimizer.search.prepare import prepare
    from optimizer.search.study import open_study

    config = zoo_config(
        "layer", limit=2, storage=storage, search={"baselines": False}, method="ties", granularity="layer"
    )
    prepared = prepare(config_from_dict(config))
    engine = BlankEngine()
    study, prepared = open_study(prepared)
    return prepared, study, EngineSupervisor(lambda: engine, prepared.models, log=lambda _: None)


def test_a_per_layer_study_reads_the_storage_once_per_candidate_not_once_per_parameter(zoo, tmp_path: Path) -> None:
    """TPE (constant liar) re-reads every trial from the database at each ``suggest_*``: a
    per-layer study paid dozens of SQLite reads per candidate. The study loop serves a
    candidate's suggestions from one read, and draws exactly the candidates Optuna draws alone."""
    from optimizer.search.trials import run_trials

    prepared, study, supervisor = _per_layer_study(f"sqlite:///{tmp_path / 'reads.db'}")
    n_params = len(prepared.space.distributions())
    assert n_params >= 24
    sampler = copy.deepcopy(study.sampler)  # for Optuna's own loop below, in the same state
    storage = study._storage  # Optuna's cache in front of the database
    reads: list[int] = []
    read = storage.get_all_trials
    storage.get_all_trials = lambda *a, **k: reads.append(1) or read(*a, **k)
    run_trials(prepared, study, supervisor, target=12)  # TPE's 10 random start-up trials, then TPE
    reads.clear()
    run_trials(prepared, study, supervisor, target=16)
    assert len(reads) / 4 < 8, f"{len(reads) / 4:.0f} storage reads per trial for {n_params} parameters"

    # The same candidates as Optuna's own loop draws from the same history, read per parameter.
    alone = optuna.create_study(directions=["maximize"] * 3, sampler=sampler)
    for t in study.trials:
        trial = alone.ask()
        assert prepared.space.suggest(trial).to_dict() == t.user_attrs["plan"], f"trial {t.number}"
        alone.tell(trial, t.values)


def test_a_per_layer_candidate_is_written_in_one_transaction_and_reads_back_whole(zoo, tmp_path: Path) -> None:
    """Optuna commits every ``suggest_*`` on its own: on SQLite a per-layer candidate cost dozens
    of fsyncs. The study loop writes a candidate's parameters, plan and owner in one transaction,
    and the study read back from the file holds every parameter of every trial, equal to its plan."""
    from optimizer.search.trials import run_trials

    url = f"sqlite:///{tmp_path / 'writes.db'}"
    prepared, study, supervisor = _per_layer_study(url)
    distributions = prepared.space.distributions()
    assert len(distributions) >= 24
    wrote = count_write_transactions(study._storage._backend.engine)
    run_trials(prepared, study, supervisor, target=12)  # TPE's 10 random start-up trials, then TPE
    per_trial = len(wrote) / 12
    assert per_trial < 8, f"{per_trial:.0f} write transactions per trial for {len(distributions)} parameters"

    reread = optuna.load_study(study_name=study.study_name, storage=url)
    assert len(reread.trials) == 12
    for t in reread.trials:
        assert t.state == TrialState.COMPLETE
        assert t.distributions == distributions, f"trial {t.number}"
        assert prepared.space.plan_from_params(t.params).to_dict() == t.user_attrs["plan"], f"trial {t.number}"
        assert t.user_attrs[OWNER_ATTR]["pid"] == os.getpid()

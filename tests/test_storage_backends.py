"""Storages by URL: several worker processes on SQLite, a journal and a real PostgreSQL server.

Each backend is driven by real processes on a toy objective (no models): three workers share one
study; a worker SIGKILLed mid-trial leaves a RUNNING trial that the next worker fails and re-runs
with the same parameters and labels (by heartbeat on SQLite/PostgreSQL, by
``fail_stale_running`` on the journal); and every bad URL is one ConfigError line naming the fix.
The dashboard test starts the real ``optuna-dashboard`` on a study and reads its HTTP API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optimizer.errors import ConfigError
from optimizer.search.attrs import OWNER as OWNER_ATTR
from optimizer.search.owners import fail_stale_running, mark_owner, owner_alive
from optimizer.search.storage import display_url, journal_path, make_storage, sqlite_path
from tests._postgres import PostgresServer, free_port, postgres_server, postgres_url  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT, GRACE = 1, 2  # seconds, so a dead worker's trial goes stale fast
DIRECTIONS = ["minimize", "minimize"]

# One worker: open the storage, join (or create) the study, recover what dead workers left, run
# n trials. With a flag file, it writes the trial number there and hangs inside its first trial.
WORKER = f"""
import pathlib, sys, time
import optuna
from optimizer.search.owners import fail_stale_running, mark_owner
from optimizer.search.storage import make_storage
url, name, n, flag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = make_storage(url, heartbeat_interval={HEARTBEAT}, grace_period={GRACE})
study = optuna.create_study(study_name=name, storage=storage, directions={DIRECTIONS}, load_if_exists=True)
fail_stale_running(study)

def objective(trial):
    mark_owner(trial)
    x = trial.suggest_float("x", -1.0, 1.0)
    if flag != "-":
        pathlib.Path(flag).write_text(str(trial.number))
        time.sleep(600)
    return x * x, (x - 1.0) ** 2

study.optimize(objective, n_trials=n)
"""


def _worker(url: str, name: str, n: int, flag: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, name, str(n), str(flag or "-")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 60) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker did not finish in {timeout} s:\n{out}")
    assert proc.returncode == 0, out


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty storage of each kind (on PostgreSQL: a new database on the session's server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if request.param == "journal":
        return f"journal://{tmp_path / 'study.log'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url, heartbeat_interval=HEARTBEAT))


# -- one write per candidate --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def rdb_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The storages one_commit batches (a journal is written call by call)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


def test_one_commit_writes_a_candidate_together_or_not_at_all(rdb_url: str) -> None:
    """On every RDB storage: a block's parameters and attrs are all in the study when the block
    ends, none are if it raised, and a bad distribution is refused as Optuna refuses it."""
    import threading

    from optimizer.search._optuna import one_commit, storage_of, trial_id

    storage_url = rdb_url
    study = optuna.create_study(study_name="oc", storage=make_storage(storage_url, heartbeat_interval=HEARTBEAT))
    trial = study.ask()
    with one_commit(study):
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("plan", {"x": x})
        # Another thread (a progress display, the heartbeat) is not held back.
        side = threading.Thread(target=lambda: storage_of(study).set_trial_user_attr(trial_id(trial), "side", 1))
        side.start()
        side.join()
        assert _load(storage_url, "oc").trials[0].user_attrs == {"side": 1}
    [stored] = _load(storage_url, "oc").trials
    assert stored.params == {"x": x} and stored.user_attrs == {"side": 1, "plan": {"x": x}}

    second = study.ask()
    with pytest.raises(RuntimeError, match="mid-candidate"), one_commit(study):
        second.suggest_float("x", 0.0, 1.0)
        second.set_user_attr("plan", {})
        raise RuntimeError("mid-candidate")
    assert _load(storage_url, "oc").trials[1].params == {} and _load(storage_url, "oc").trials[1].user_attrs == {}

    # Refused by the storage at the end of the block: nothing of the block is stored.
    third = study.ask()
    with pytest.raises(ValueError, match="different distribution"), one_commit(study):
        third.suggest_float("y", 0.0, 1.0)
        third.suggest_int("x", 0, 5)  # x is a float in [0, 1] in this study
        third.set_user_attr("plan", {})
    assert _load(storage_url, "oc").trials[2].params == {} and _load(storage_url, "oc").trials[2].user_attrs == {}

    fourth = study.ask()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError), one_commit(study):
        fourth.suggest_float("y", 0.0, 1.0)
        _load(storage_url, "oc").tell(fourth.number, state=TrialState.FAIL)  # another worker ends it
    assert _load(storage_url, "oc").trials[3].params == {}
    # A refused block leaves nothing behind for later, unrelated calls to trip over.
    assert [t.state for t in study.get_trials()][:4] == [TrialState.RUNNING] * 3 + [TrialState.FAIL]


def test_one_commit_on_a_journal_writes_call_by_call(tmp_path: Path) -> None:
    """A journal is not batched (mergeopt writes no journal entries of its own): each write lands at once."""
    from optimizer.search._optuna import disabled, one_commit

    url = f"journal://{tmp_path / 'j.log'}"
    study = optuna.create_study(study_name="j", storage=make_storage(url))
    trial = study.ask()
    with one_commit(study):
        x = trial.suggest_float("x", 0.0, 1.0)
        assert _load(url, "j").trials[0].params == {"x": x}
    assert "one_commit" not in disabled()  # not batching a journal is the design, not a disabled path


def test_one_commit_with_unknown_optuna_internals_writes_call_by_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An Optuna whose private row writers changed shape is not batched, still stores all, and says so once."""
    from optimizer.search import _optuna as module

    monkeypatch.setattr(module, "_disabled", {})  # this process's record, restored after the test
    monkeypatch.setattr(module, "_warned", set())
    monkeypatch.setitem(module._ROW_WRITERS, "_set_trial_param_without_commit", ("self", "another", "shape"))
    url = f"sqlite:///{tmp_path / 'u.db'}"
    study = optuna.create_study(study_name="u", storage=make_storage(url))
    for _ in range(2):
        trial = study.ask()
        with caplog.at_level("WARNING", logger="mergeopt"), module.one_commit(study):
            x = trial.suggest_float("x", 0.0, 1.0)
            assert _load(url, "u").trials[trial.number].params == {"x": x}  # written at once, as Optuna does
    assert "one_commit" in module.disabled()
    warnings = [r for r in caplog.records if "one_commit fast path is off" in r.getMessage()]
    assert len(warnings) == 1 and "_set_trial_param_without_commit" in warnings[0].getMessage()


# -- several workers ---------------------------------------------------------------------------


def test_workers_share_one_study(storage_url: str) -> None:
    """Three processes start together on an empty storage: one study, 12 trials, numbers unique."""
    workers = [_worker(storage_url, "shared", 4) for _ in range(3)]
    for w in workers:
        _finish(w)
    trials = _load(storage_url, "shared").get_trials()
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs[OWNER_ATTR]["pid"] for t in trials}) == 3  # all three did work


def test_killed_worker_trial_is_failed_and_retried(storage_url: str, tmp_path: Path) -> None:
    """SIGKILL mid-trial leaves it RUNNING; the next worker fails it and re-runs it as it was."""
    study = optuna.create_study(
        study_name="crash", storage=make_storage(storage_url, heartbeat_interval=HEARTBEAT), directions=DIRECTIONS
    )
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "avg", "plan": {"rev": 0.5}})
    flag = tmp_path / "in-trial"
    worker = _worker(storage_url, "crash", 1, flag)
    try:
        deadline = time.monotonic() + 30
        while not flag.exists():
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "the worker never started its trial"
            time.sleep(0.05)
        assert fail_stale_running(study) == []  # its owner is alive: hands off
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
    assert study.get_trials()[0].state == TrialState.RUNNING  # nothing recorded the death
    if not storage_url.startswith("journal"):
        time.sleep(GRACE + 1.5)  # let its heartbeat go stale
    _finish(_worker(storage_url, "crash", 1))

    dead, retry = _load(storage_url, "crash").get_trials()
    assert dead.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE
    assert retry.params == {"x": 0.25}
    assert retry.user_attrs["baseline"] == "avg" and retry.user_attrs["plan"] == {"rev": 0.5}
    assert retry.system_attrs["failed_trial"] == dead.number
    assert retry.system_attrs["retry_history"] == [dead.number]
    assert retry.user_attrs[OWNER_ATTR]["pid"] != dead.user_attrs[OWNER_ATTR]["pid"]
    if storage_url.startswith("journal"):
        assert "stopped mid-trial" in dead.user_attrs["fail_reason"]


# -- owners and stale trials, in memory ----------------------------------------------------------


def _running(owner: dict | None) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    study = optuna.create_study(directions=DIRECTIONS)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(-1, 1)})
    trial.set_user_attr("baseline", "ties")
    if owner is not None:
        trial.set_user_attr(OWNER_ATTR, owner)
    return study, study.get_trials()[0]


def test_owner_alive_rules() -> None:
    study, _ = _running(None)
    live = study.ask()
    mark_owner(live)
    me = study.get_trials()[1].user_attrs[OWNER_ATTR]
    assert owner_alive(study.get_trials()[1])
    mark_owner(live)  # a second call only moves the beat on
    again = study.get_trials()[1].user_attrs[OWNER_ATTR]
    assert again["started"] == me["started"] and again["beat"] >= me["beat"]

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    assert not owner_alive(_running({**me, "pid": dead_pid})[1])
    assert not owner_alive(_running({**me, "pid_start": me["pid_start"] + 1})[1])  # our pid, reused

    far = {**me, "host": "elsewhere", "beat": time.time() - 100}
    assert owner_alive(_running(far)[1], stale_after=1000)
    assert not owner_alive(_running(far)[1], stale_after=50)

    _, unowned = _running(None)  # popped a moment ago, owner not written yet
    assert owner_alive(unowned)
    assert not owner_alive(unowned, stale_after=0)


def test_a_trial_whose_worker_died_before_writing_its_owner_is_retried_on_sqlite(tmp_path, monkeypatch) -> None:
    """A worker SIGKILLed between popping a trial and writing its owner leaves a RUNNING trial with
    neither owner nor heartbeat; a resumed search must not wait for it for half an hour: after
    UNOWNED_SECONDS it is failed and its retry enqueued, on a heartbeat storage too."""
    import optimizer.search.owners as owners

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=5, grace_period=10)
    study = optuna.create_study(storage=storage, directions=DIRECTIONS)
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "avg"})
    study.ask({"x": optuna.distributions.FloatDistribution(-1, 1)})  # popped: RUNNING, no owner, no beat
    owners.recover_stale(study)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # a live worker's moment
    later = time.time() + owners.UNOWNED_SECONDS + 1
    monkeypatch.setattr(owners.time, "time", lambda: later)
    owners.recover_stale(study)
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == {"x": 0.25} and retry.user_attrs["baseline"] == "avg"


def test_fail_stale_running_requeues_once_and_stops_after_max_retry() -> None:
    study, trial = _running({"host": "elsewhere", "beat": 0.0, "pid": 1})
    assert fail_stale_running(study) == [0]
    assert fail_stale_running(study) == []  # a second worker finds nothing left to do
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and "elsewhere" in dead.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING
    assert retry.params == trial.params and retry.user_attrs == {"baseline": "ties"}
    assert retry.system_attrs["failed_trial"] == 0

    for n in range(1, 4):  # the retry dies too, and its retries, until max_retry is spent
        popped = study.ask()
        assert popped.number == n
        popped.set_user_attr(OWNER_ATTR, {"host": "elsewhere", "beat": 0.0, "pid": 1})
        assert fail_stale_running(study, max_retry=3) == [n]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL] * 4
    assert study.get_trials()[-1].system_attrs["retry_history"] == [0, 1, 2]  # the last retry is not retried


# -- URLs ----------------------------------------------------------------------------------------


def test_url_paths() -> None:
    assert sqlite_path("sqlite:////abs/s.db") == Path("/abs/s.db")
    assert sqlite_path("sqlite:///rel/s.db") == Path("rel/s.db")
    assert journal_path("journal:///abs/s.log") == Path("/abs/s.log")
    assert journal_path("journal:////abs/s.log") == Path("/abs/s.log")
    assert journal_path("journal://rel/s.log") == Path("rel/s.log")
    assert journal_path("studies/x/journal.log") == Path("studies/x/journal.log")
    assert journal_path("sqlite:///x.db") is None


def test_display_url_hides_only_the_password() -> None:
    assert (
        display_url("postgresql+psycopg2://me:s3cr:et@db.lan:5432/opt")
        == "postgresql+psycopg2://me:***@db.lan:5432/opt"
    )
    assert display_url("postgresql://me@db.lan/opt") == "postgresql://me@db.lan/opt"
    assert display_url("journal:///tmp/x.log") == "journal:///tmp/x.log"


def test_plain_paths_pick_the_kind(tmp_path: Path) -> None:
    assert isinstance(make_storage(str(tmp_path / "a.log")), optuna.storages.JournalStorage)
    assert isinstance(make_storage(str(tmp_path / "b.db")), optuna.storages.RDBStorage)


def _refused(url: str, *fragments: str, create: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        make_storage(url, create=create)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_bad_server_urls(postgres_server: PostgresServer) -> None:  # noqa: F811
    s = postgres_server
    message = _refused(s.url(password="wrong-password"), "password authentication failed", "fix the user or password")
    assert "wrong-password" not in message and s.password not in message  # no secrets in messages
    _refused(s.url(database="no_such_db"), "no database 'no_such_db'", "create it")
    _refused(f"postgresql://u:p@127.0.0.1:{free_port()}/db", "cannot reach", "Connection refused", "start it")
    with socket.socket() as silent:  # accepts TCP, never answers: a hung server
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        _refused(f"postgresql://u:p@127.0.0.1:{port}/db?connect_timeout=2", "cannot reach", "timeout")
        assert time.monotonic() - t0 < 10


def test_plain_postgresql_url_uses_the_installed_driver(postgres_url: str) -> None:  # noqa: F811
    storage = make_storage(postgres_url.replace("postgresql+psycopg2://", "postgresql://"))
    optuna.create_study(study_name="plain-url", storage=storage, load_if_exists=True)


def test_bad_urls_without_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    _refused("mongodb://u:secret@h/db", "unknown scheme 'mongodb'", "postgresql://", "journal://")
    assert "secret" not in _refused("postgres://u:secret@h/db", "write postgresql://")
    _refused("postgresql+asyncpg://u:p@h/db", "not supported", "postgresql+psycopg2://")
    _refused("notes.txt", "neither a URL nor a .db or .log file")
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if the driver were not installed
    monkeypatch.setitem(sys.modules, "psycopg", None)
    _refused("postgresql://u:p@127.0.0.1:1/db", "driver 'psycopg2'", "pip install 'mergeopt[postgres]'")
    _refused("postgresql+psycopg2://u:p@127.0.0.1:1/db", "not installed", "mergeopt[postgres]")


def test_bad_file_urls_leave_nothing_behind(tmp_path: Path) -> None:
    _refused(f"sqlite:///{tmp_path / 'none.db'}", "no study database", create=False)
    _refused(f"journal://{tmp_path / 'none.log'}", "no study journal", create=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(f"sqlite:///{blocker / 'sub' / 'study.db'}", "cannot create the folder", "Not a directory")
    _refused(f"sqlite:///{tmp_path}", "is a folder")

    journal = tmp_path / "j.log"
    optuna.create_study(study_name="j", storage=make_storage(f"journal://{journal}"))
    _refused(f"sqlite:///{journal}", "is an Optuna journal", f"journal://{journal}")
    db = tmp_path / "s.db"
    optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{db}"))
    _refused(f"journal://{db}", "is a SQLite database", f"sqlite:///{db}")
    _refused(f"journal://{blocker}", "neither a SQLite database nor an Optuna journal")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "j.log", "s.db"]


def test_failed_open_removes_what_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(url: str, **kwargs: object) -> None:
        sqlite_path(url).touch()  # as SQLite does, before the failure
        raise OSError("disk I/O error")

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    _refused(f"sqlite:///{tmp_path / 'new' / 'sub' / 'study.db'}", "disk I/O error", "check the path")
    assert list(tmp_path.iterdir()) == []


# -- optuna-dashboard --------------------------------------------------------------------------


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_optuna_dashboard_serves_a_study(kind: str, tmp_path: Path) -> None:
    """The real dashboard process opens our storage and shows the study, its trials and objectives."""
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.is_file():
        pytest.skip("optuna-dashboard is not installed (it comes with the dev extra)")
    # The dashboard takes sqlite:/// URLs, and a journal by its plain path.
    url = f"sqlite:///{tmp_path / 'd.db'}" if kind == "sqlite" else str(tmp_path / "d.log")
    study = optuna.create_study(study_name="dash", storage=make_storage(url), directions=DIRECTIONS)
    study.set_metric_names(["med", "code"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=3)

    port = free_port()
    proc = subprocess.Popen(
        [str(exe), url, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                summaries = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 30 s"
                time.sleep(0.2)
        [summary] = summaries
        assert summary["study_name"] == "dash" and summary["directions"] == DIRECTIONS
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
        assert detail["name"] == "dash"
        assert len(detail["trials"]) == 3
        assert detail["objective_names"] == ["med", "code"]
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

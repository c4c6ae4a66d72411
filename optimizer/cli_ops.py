"""Operating a running study: ``mergeopt worker`` joins one, ``mergeopt status`` shows how it goes.

Also the one loop both ``search`` and ``worker`` run (:func:`run_until`): progress on screen,
Ctrl-C → the running trial marked FAIL ("interrupted") and queued again, one line saying how to
resume, exit code 130.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Annotated

import typer

from optimizer.errors import MergeoptError

if TYPE_CHECKING:
    import optuna

    from optimizer.search.prepare import Prepared
    from optimizer.search.progress import StudyStatus

__all__ = ["register", "run_until"]

#: Exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def run_until(study: optuna.Study, prepared: Prepared, target: int, engine, *, resume: str) -> None:
    from optimizer.search.overrides import with_study_overrides

    prepared = with_study_overrides(study, prepared)  # layers a contribution analysis freed
    """Run ``study`` to ``target`` COMPLETE trials with ``engine`` (a ``cli._LazyEngine``).

    ``resume`` is the command that picks the run up again, shown after a Ctrl-C or a failed
    engine restart.
    """
    from optimizer.engines.supervisor import EngineRestartFailed
    from optimizer.search.progress import SearchProgress
    from optimizer.search.study import run_trials

    try:
        with SearchProgress(study, target) as progress:
            run_trials(prepared, study, engine.supervisor, target, callbacks=[progress])
    except KeyboardInterrupt as exc:
        engine.close()
        trial = getattr(exc, "trial", None)
        cut = f"trial {trial} marked FAIL (interrupted) and queued again; " if trial is not None else ""
        _console().print(
            f"\ninterrupted: {cut}completed trials are saved. Resume with: {resume}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except EngineRestartFailed as exc:
        raise MergeoptError(f"{exc} with: {resume}") from None


def _console():
    from rich.console import Console

    return Console()


def worker(
    storage: Annotated[
        str, typer.Option(help="the study's storage: postgresql://USER:PASSWORD@HOST/DB, a journal .log file, or a .db")
    ],
    study: Annotated[str, typer.Option(help="name of the study to join (it must exist)")],
    trials: Annotated[
        int | None, typer.Option(help="run until the study holds this many COMPLETE trials (default: its config's)")
    ] = None,
    restart_engine_after: Annotated[
        int, typer.Option(help="restart the engine after this many engine errors in a row")
    ] = 3,
) -> None:
    """Join a running study and run its trials, alongside any number of other workers.

    The config comes from the study; its models must be here, at the same paths, unchanged.
    """
    import optuna

    from optimizer.cli import _LazyEngine, _located, _storage_url
    from optimizer.config import config_from_json
    from optimizer.search.prepare import prepare
    from optimizer.search.storage import display_url
    from optimizer.search.study import count_finished, load_study, open_study, wait_for_config

    if trials is not None and trials <= 0:
        raise MergeoptError(f"--trials {trials}: the trial count must be a positive number")
    if restart_engine_after <= 0:
        raise MergeoptError(f"--restart-engine-after {restart_engine_after}: give a positive number of failures")
    url = _storage_url(storage)
    config = config_from_json(wait_for_config(load_study(url, study)))  # nothing is written until joined
    prepared = prepare(_located(config, url))  # models and data must exist here, and match
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress line shows each failure's reason
    joined = open_study(prepared, storage_url=url, name=study, create=False, salt=os.getpid())
    target = trials if trials is not None else config.search.trials
    shown = display_url(url)
    _console().print(
        f"worker {socket.gethostname()} pid {os.getpid()} joined study [bold]{study}[/] at {shown}:"
        f" {count_finished(joined)} finished, target {target} (engine {config.engine})",
        soft_wrap=True,
    )
    engine = _LazyEngine(prepared, restart_after=restart_engine_after)
    try:
        run_until(joined, prepared, target, engine, resume=f"mergeopt worker --storage {shown} --study {study}")
    finally:
        engine.close()
    _console().print(f"study {study} holds {count_finished(joined)} finished trials (target {target})")


def status(
    study: Annotated[str, typer.Argument(help="study folder (studies/NAME), its study.db or .log, or a storage URL")],
    name: Annotated[str | None, typer.Option("--name", help="study name, if the storage holds several")] = None,
    window: Annotated[float, typer.Option(help="hours of recent history the current throughput is measured on")] = 1.0,
    target: Annotated[int | None, typer.Option(help="trial count the ETA aims at (default: the config's)")] = None,
) -> None:
    """How a study goes: trials by state, failures and their reasons, front, throughput, workers, ETA."""
    from optimizer.cli import _storage_url
    from optimizer.config import config_from_json
    from optimizer.search.progress import study_status
    from optimizer.search.study import CONFIG_ATTR, load_study

    if window <= 0:
        raise MergeoptError(f"--window {window}: give a positive number of hours")
    if target is not None and target <= 0:
        raise MergeoptError(f"--target {target}: the trial count must be a positive number")
    st = load_study(_storage_url(study), name)
    stored = st.user_attrs.get(CONFIG_ATTR)
    if target is None and stored:
        target = config_from_json(stored).search.trials
    info = study_status(st, target, window_hours=window)
    console = _console()
    if console.is_terminal:
        _print_rich(info, console)
    else:
        for line in _plain_lines(info):
            print(line)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}/h"


def _eta(info: StudyStatus) -> str:
    if info.target is None:
        return "no target (give --target)"
    if info.remaining == 0:
        return f"done ({info.states.get('COMPLETE', 0)}/{info.target} complete)"
    if info.eta_hours is None:
        return f"unknown ({info.remaining} to go, no throughput yet)"
    return f"{_duration(info.eta_hours * 3600)} ({info.remaining} to go at {_rate(info.rate_for_eta)})"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _summary_rows(info: StudyStatus) -> list[tuple[str, str]]:
    order = ("COMPLETE", "RUNNING", "WAITING", "FAIL", "PRUNED")
    states = ", ".join(f"{s} {info.states[s]}" for s in order if info.states.get(s)) or "no trials"
    active = sum(w.active for w in info.workers)
    return [
        ("trials", f"{sum(info.states.values())}: {states}"),
        ("baselines", f"{info.baselines_done}/{info.baselines_total} complete"),
        ("front", f"{info.front} trials on the Pareto front"),
        (
            "throughput",
            f"{_rate(info.rate_window)} complete in the last {info.window_hours:g} h,"
            f" {_rate(info.rate_overall)} overall",
        ),
        ("workers seen", f"{len(info.workers)} ({active} running a trial now)"),
        ("eta", _eta(info)),
    ]


def _plain_lines(info: StudyStatus) -> list[str]:
    lines = [f"study {info.name}"]
    lines += [f"{key}: {value}" for key, value in _summary_rows(info)]
    failed = sum(g.count for g in info.failures)
    lines.append(f"failures: {failed}" + ("" if failed else " (none)"))
    for g in info.failures:
        lines.append(f"  {g.count} x {g.kind}: {g.reason} (trials {_numbers(g.trials)})")
    for w in info.workers:
        lines.append(
            f"worker {w.host} pid {w.pid}: {w.trials} trials ({w.complete} complete, {w.failed} failed),"
            f" last seen {w.last_seen:%Y-%m-%d %H:%M:%S}{', running a trial now' if w.active else ''}"
        )
    return lines


def _numbers(numbers: tuple[int, ...], limit: int = 8) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f", … ({len(numbers) - limit} more)" if len(numbers) > limit else "")


def _print_rich(info: StudyStatus, console) -> None:
    from rich.table import Table

    table = Table(title=f"study {info.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in _summary_rows(info):
        table.add_row(key, value)
    console.print(table)
    if info.failures:
        failures = Table(title="failures by reason")
        for column in ("count", "kind", "reason", "trials"):
            failures.add_column(column, justify="right" if column == "count" else "left")
        for g in info.failures:
            failures.add_row(str(g.count), g.kind, g.reason, _numbers(g.trials))
        console.print(failures)
    if info.workers:
        workers = Table(title="workers seen")
        for column in ("host", "pid", "trials", "complete", "failed", "last seen", "now"):
            workers.add_column(column)
        for w in info.workers:
            workers.add_row(
                w.host,
                str(w.pid),
                str(w.trials),
                str(w.complete),
                str(w.failed),
                f"{w.last_seen:%Y-%m-%d %H:%M:%S}",
                "running a trial" if w.active else "",
            )
        console.print(workers)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``mergeopt`` app."""
    app.command()(worker)
    app.command()(status)

"""``mergeopt search``, ``worker`` and ``demo``: run a study to its target, join one, or show it all."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optimizer.cli._common import console, interrupted, positive, print_front, print_zoo
from optimizer.engines.supervisor import RESTART_AFTER
from optimizer.errors import MergeoptError

if TYPE_CHECKING:
    from optimizer.engines.supervisor import EngineSupervisor
    from optimizer.search.prepare import Prepared

TrialsOpt = Annotated[int | None, typer.Option(help="total COMPLETE trials to reach (default: the config's)")]
RestartOpt = Annotated[int, typer.Option(help="restart the engine after this many engine errors in a row")]


def _engine(prepared: Prepared, restart_after: int | None = RESTART_AFTER) -> EngineSupervisor:
    from optimizer.engines import study_engine

    return study_engine(prepared.config, prepared.models, memory=prepared.memory, restart_after=restart_after)


def _checked(config_path: Path) -> Prepared:
    """Everything checked (models, data, templates, the memory plan); nothing written yet."""
    from optimizer.config import load_config
    from optimizer.search.prepare import prepare

    out = console()
    prepared = prepare(load_config(config_path))
    for line in (*prepared.notes, *prepared.memory.lines()):
        out.print(line, highlight=False)
    return prepared


def _prepared(config_path: Path) -> Prepared:
    """Everything checked, and the method's study data measured, before the study file exists."""
    from optimizer.search.prepare import measured

    out = console()
    return measured(_checked(config_path), lambda line: out.print(line, highlight=False))


def _print_check(prepared: Prepared, trials: int | None) -> None:
    """What ``search --check`` found: the study a search would run, and that nothing was written."""
    from optimizer.search.storage import display_url

    out = console()
    config = prepared.config
    names = list(prepared.space.distributions())
    shown = ", ".join(names[:8]) + (f", … ({len(names) - 8} more)" if len(names) > 8 else "")
    models = prepared.models
    out.print(f"models: base {models.base} and {len(models.specialists)} specialists", highlight=False)
    for task in prepared.tasks:
        out.print(
            f"objective {task.name}: {task.metric_name}, {task.size('search')} search and"
            f" {task.size('held_out')} held-out examples",
            highlight=False,
        )
    out.print(
        f"search: method {config.method}, engine {config.engine}, {len(names)} parameters ({shown}),"
        f" target {trials if trials is not None else config.search.trials} trials,"
        f" study {config.name} at {display_url(config.storage_url())}",
        highlight=False,
        soft_wrap=True,
    )
    out.print("check passed: nothing written and no engine started; run without --check to search", soft_wrap=True)


def _run(study, prepared: Prepared, target: int, engine: EngineSupervisor, resume: str) -> None:
    from optimizer.search.run import run_until

    try:
        run_until(study, prepared, target, engine, resume=resume)
    except KeyboardInterrupt as exc:
        engine.close()
        raise interrupted(exc, resume) from None


def _search(config_path: Path, prepared: Prepared, trials: int | None, engine: EngineSupervisor) -> tuple:
    """Open (or create) the study, run the method's stage once, then trials up to the target."""
    from optimizer.search.run import quiet_optuna
    from optimizer.search.storage import display_url
    from optimizer.search.study import count_finished, open_study
    from optimizer.search.warm_starts import run_hi_merging_stage

    quiet_optuna()
    out = console()
    config = prepared.config
    target = trials if trials is not None else config.search.trials
    study, prepared = open_study(prepared)
    with out.status("Hi-Merging") as status:
        stage = run_hi_merging_stage(study, prepared, engine, progress=lambda m: status.update(f"Hi-Merging: {m}"))
    if stage is not None:
        result, n = stage
        out.print(
            f"Hi-Merging: {n} plans recorded as trials; chosen plan scores {result.score:+.3f} (mean normalized gain)"
        )
    done = count_finished(study)
    out.print(
        f"study [bold]{config.name}[/] at {display_url(config.storage_url())}: {done} finished, target {target}"
        f" ({len(prepared.space.distributions())} parameters, method {config.method}, engine {config.engine})"
    )
    if done < target:
        _run(study, prepared, target, engine, resume=f"mergeopt search {config_path}")
    return study, prepared


def search(
    config: Annotated[Path, typer.Argument(help="study config (YAML)")],
    trials: TrialsOpt = None,
    restart_engine_after: RestartOpt = RESTART_AFTER,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="check the config, models, data and the memory plan on this machine, print what the search"
            " would run, and stop: nothing written, no engine started",
        ),
    ] = False,
) -> None:
    """Run a study, or resume it, until it holds the requested number of complete trials.

    Several processes may run one config at once (journal or PostgreSQL storage): they share it.
    """
    positive(trials, "--trials", "the trial count must be a positive number")
    positive(restart_engine_after, "--restart-engine-after", "give a positive number of failures")
    if check:
        _print_check(_checked(config), trials)
        return
    prepared = _prepared(config)
    engine = _engine(prepared, restart_engine_after)
    try:
        study, prepared = _search(config, prepared, trials, engine)
        print_front(study, prepared)
    finally:
        engine.close()


def worker(
    storage: Annotated[
        str, typer.Option(help="the study's storage: postgresql://USER:PASSWORD@HOST/DB, a journal .log file, or a .db")
    ],
    study: Annotated[str, typer.Option(help="name of the study to join (it must exist)")],
    trials: TrialsOpt = None,
    restart_engine_after: RestartOpt = RESTART_AFTER,
) -> None:
    """Join a running study and run its trials, alongside any number of other workers.

    The config comes from the study; its models must be here, at the same paths, unchanged.
    """
    from optimizer.search.run import quiet_optuna
    from optimizer.search.storage import display_url, study_url
    from optimizer.search.study import count_finished, join_study

    positive(trials, "--trials", "the trial count must be a positive number")
    positive(restart_engine_after, "--restart-engine-after", "give a positive number of failures")
    joined, prepared = join_study(storage, study)  # nothing is written until every check has passed
    quiet_optuna()
    config = prepared.config
    target = trials if trials is not None else config.search.trials
    shown = display_url(study_url(storage))
    console().print(
        f"worker {socket.gethostname()} pid {os.getpid()} joined study [bold]{study}[/] at {shown}:"
        f" {count_finished(joined)} finished, target {target} (engine {config.engine})",
        soft_wrap=True,
    )
    engine = _engine(prepared, restart_engine_after)
    try:
        _run(joined, prepared, target, engine, resume=f"mergeopt worker --storage {shown} --study {study}")
    finally:
        engine.close()
    console().print(f"study {study} holds {count_finished(joined)} finished trials (target {target})")


def _demo_config_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if not path.is_file():
        raise MergeoptError(f"demo config not found at {path}; run the demo from a mergeopt checkout")
    return path


def demo(trials: TrialsOpt = None) -> None:
    """Build the zoo, search merges of its specialists, show the front and export a balanced member."""
    from optimizer.zoo import build_zoo, default_zoo_dir

    out = console()
    zoo_dir = default_zoo_dir()
    info = build_zoo(zoo_dir, log=lambda line: out.print(line, highlight=False))
    print_zoo(info, zoo_dir)
    config_path = _demo_config_path()
    prepared = _prepared(config_path)
    engine = _engine(prepared)  # one engine for the search and the held-out scoring
    try:
        study, prepared = _search(config_path, prepared, trials, engine)  # the front is shown with held-out scores
        _demo_export(study, prepared, engine)
    finally:
        engine.close()


def _demo_export(study, prepared: Prepared, engine: EngineSupervisor) -> None:
    from optimizer.export import export_trial
    from optimizer.report import build_report
    from optimizer.search.pareto import front_members

    out = console()
    config = prepared.config
    print_front(study, prepared, front_members(study, prepared, engine))
    study_dir = Path("studies") / config.name
    report_dir, _, best = build_report(study, prepared, engine, study_dir / "report", storage_arg=str(study_dir))
    out.print(f"report: {report_dir / 'report.html'}")
    if best is None:
        return
    # The balanced choice: the member whose worst held-out task keeps most of its specialist's gain.
    target = study_dir / f"export-trial-{best.number}"
    if target.exists():
        out.print(f"balanced member: trial {best.number}, already exported at {target}")
    else:
        export_trial(study, config, best.number, target, storage_arg=str(study_dir))
        gain = f"worst-task normalized gain {best.min_gain:.2f}"
        out.print(f"balanced member: trial {best.number} ({gain}) exported to {target}")
    out.print(f"next: mergeopt pick {study_dir} --prefer TASK=2  |  mergeopt export {study_dir} --trial N --out DIR")

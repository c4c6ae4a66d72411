"""Commands that read a study: ``pareto``, ``report``, ``pick``, ``export`` and ``status``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optimizer.cli._common import NameOpt, StudyArg, console, positive, print_front
from optimizer.errors import MergeoptError

if TYPE_CHECKING:
    from rich.console import Console

    from optimizer.engines.supervisor import EngineSupervisor
    from optimizer.report.pick import Choice
    from optimizer.search.prepare import Prepared
    from optimizer.search.progress import StudyStatus


def _engine(prepared: Prepared) -> EngineSupervisor:
    """The study's engine, started only if something is not cached yet."""
    from optimizer.engines import study_engine

    return study_engine(prepared.config, prepared.models, memory=prepared.memory)


def pareto(study: StudyArg, name: NameOpt = None) -> None:
    """Show the Pareto front across tasks, with held-out scores of its members."""
    from optimizer.search.pareto import front_members
    from optimizer.search.study import open_existing

    opened, prepared = open_existing(study, name)
    with _engine(prepared) as engine:
        members = front_members(opened, prepared, engine)
    print_front(opened, prepared, members)


def export(
    study: StudyArg,
    trial: Annotated[int, typer.Option(help="trial number to export")],
    out: Annotated[Path, typer.Option(help="output folder (must not exist or be empty)")],
    name: NameOpt = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="weights' dtype: float32 (exactly what was scored), bfloat16, float16 (default: the base's)"),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="largest weight file, e.g. 5GB or 500MB; a larger model is sharded with an index")
    ] = "5GB",
) -> None:
    """Write a trial's merged model: HF safetensors dir, mergekit.yaml that rebuilds it, model card."""
    from optimizer.export import export_study_trial
    from optimizer.shards import parse_size

    path = export_study_trial(study, trial, out, name=name, dtype=dtype, max_shard_bytes=parse_size(max_shard_size))
    console().print(f"exported trial {trial} to {path}")


def report(
    study: StudyArg,
    out: Annotated[Path | None, typer.Option(help="report folder (default: STUDY/report)")] = None,
    trial: Annotated[
        int | None, typer.Option(help="trial whose coefficients the heatmap shows (default: balanced pick)")
    ] = None,
    name: NameOpt = None,
) -> None:
    """Re-score the front and the baselines on held-out data; write tables, plots and report.html."""
    from optimizer.report import build_report, default_report_dir
    from optimizer.search.study import open_existing

    opened, prepared = open_existing(study, name)
    target = out or default_report_dir(study, opened.study_name)
    with _engine(prepared) as engine:
        path, rows, pick = build_report(opened, prepared, engine, target, trial=trial, storage_arg=study)
    shown = console()
    front = sum(r.on_front for r in rows)
    shown.print(f"report of {front} front members and {len(rows) - front} other baselines written to {path}")
    if pick is not None:
        shown.print(f"balanced member: trial {pick.number} (worst-task normalized gain {pick.min_gain:.2f})")
    shown.print(f"open {path / 'report.html'}")


def pick(
    study: StudyArg,
    prefer: Annotated[
        list[str] | None, typer.Option(help="TASK=WEIGHT: how much a task counts (others weigh 1); repeatable")
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(help="TASK=GAIN: floor on held-out normalized gain, e.g. 0.95 = 95% of the specialist's gain"),
    ] = None,
    name: NameOpt = None,
) -> None:
    """Choose a front member by weighted held-out normalized gain (and floors), and say why."""
    from optimizer.report.pick import parse_assignments
    from optimizer.report.pick import pick as choose
    from optimizer.report.rows import collect_rows
    from optimizer.search.study import open_existing

    opened, prepared = open_existing(study, name)
    tasks = opened.metric_names or [t.name for t in prepared.tasks]
    weights = parse_assignments(prefer or [], tasks, "--prefer")
    floors = parse_assignments(require or [], tasks, "--require")
    with _engine(prepared) as engine:
        rows, _ = collect_rows(opened, prepared, engine)
    best, ranked = choose(rows, tasks, weights, floors)
    _print_choices(ranked, tasks, best)
    if best is None:
        closest = min(ranked, key=lambda c: len(c.misses)) if ranked else None
        hint = f" (closest: trial {closest.row.number}, {'; '.join(closest.misses)})" if closest else ""
        wanted = ", ".join(f"{t} >= {v:g}" for t, v in floors.items())
        raise MergeoptError(f"no front member meets {wanted}{hint}; lower a --require floor")
    row = best.row
    why = ", ".join(f"{t} {row.gain[t]:.2f}" + (f"×{weights[t]:g}" if t in weights else "") for t in tasks)
    floors_text = f"; meets {', '.join(f'{t} >= {v:g}' for t, v in floors.items())}" if floors else ""
    runner_up = next((c for c in ranked if c is not best and not c.misses), None)
    versus = f"; next: trial {runner_up.row.number} at {runner_up.score:.3f}" if runner_up else ""
    shown = console()
    shown.print(f"picked trial {row.number}: weighted normalized gain {best.score:.3f} ({why}){floors_text}{versus}")
    shown.print(f"export it: mergeopt export {study} --trial {row.number} --out merged-trial-{row.number}")


def _print_choices(ranked: list[Choice], tasks: list[str], best: Choice | None) -> None:
    from rich.table import Table

    table = Table(title="front members by weighted held-out normalized gain")
    table.add_column("trial", justify="right")
    table.add_column("baseline")
    for t in tasks:
        table.add_column(f"{t} gain", justify="right")
    table.add_column("score", justify="right")
    table.add_column("floors")
    for c in ranked:
        table.add_row(
            str(c.row.number) + (" *" if c is best else ""),
            c.row.label,
            *(f"{c.row.gain[t]:.2f}" for t in tasks),
            f"{c.score:.3f}",
            "; ".join(c.misses) or "ok",
        )
    console().print(table)


def status(
    study: StudyArg,
    name: NameOpt = None,
    window: Annotated[float, typer.Option(help="hours of recent history the current throughput is measured on")] = 1.0,
    target: Annotated[int | None, typer.Option(help="trial count the ETA aims at (default: the config's)")] = None,
) -> None:
    """How a study goes: trials by state, failures and their reasons, front, throughput, workers, ETA."""
    from optimizer.config import config_from_json
    from optimizer.search import attrs
    from optimizer.search.progress import study_status
    from optimizer.search.storage import study_url
    from optimizer.search.study import load_study

    positive(window, "--window", "give a positive number of hours")
    positive(target, "--target", "the trial count must be a positive number")
    opened = load_study(study_url(study), name)
    stored = opened.user_attrs.get(attrs.CONFIG)
    if target is None and stored:
        target = config_from_json(stored).search.trials
    info = study_status(opened, target, window_hours=window)
    shown = console()
    if shown.is_terminal:
        _print_rich(info, shown)
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


def _print_rich(info: StudyStatus, console: Console) -> None:
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

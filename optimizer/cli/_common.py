"""What every command shares: the console, the study argument, and the tables several commands print."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optimizer.errors import MergeoptError

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

    from optimizer.search.pareto import FrontMember
    from optimizer.search.prepare import Prepared

StudyArg = Annotated[str, typer.Argument(help="study folder (studies/NAME), its study.db or .log, or a storage URL")]
NameOpt = Annotated[str | None, typer.Option("--name", help="study name, if the storage holds several")]

#: Exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def console() -> Console:
    from rich.console import Console

    return Console()


def positive(value: int | float | None, flag: str, what: str) -> None:
    """Refuse a flag that must be positive, with one line that names it."""
    if value is not None and value <= 0:
        raise MergeoptError(f"{flag} {value}: {what}")


def print_front(study: optuna.Study, prepared: Prepared, members: list[FrontMember] | None = None) -> None:
    """The front as a table; with ``members`` (held-out scores), those too."""
    from rich.table import Table

    from optimizer.search import attrs
    from optimizer.search.front import front_trials

    names = study.metric_names or [t.name for t in prepared.tasks]
    front = front_trials(study)
    table = Table(title=f"Pareto front of {study.study_name} ({len(front)} trials)")
    table.add_column("trial", justify="right")
    table.add_column("baseline")
    for n in names:
        table.add_column(f"{n} search", justify="right")
    if members is not None:
        for n in names:
            table.add_column(f"{n} held-out", justify="right")
        for m in members:
            table.add_row(
                str(m.number),
                m.label,
                *(f"{m.search[n]:.3f}" for n in names),
                *(f"{m.held_out[n]:.3f}" for n in names),
            )
    else:
        for t in front:
            table.add_row(str(t.number), str(t.user_attrs.get(attrs.BASELINE, "")), *(f"{v:.3f}" for v in t.values))
    console().print(table)


def print_zoo(info: dict[str, Any], path: Path) -> None:
    from rich.table import Table

    scores = info["scores"]
    tasks = list(info["tasks"])
    table = Table(title=f"model zoo at {path} (held-out exact match)")
    table.add_column("model")
    for t in tasks:
        table.add_column(t, justify="right")
    for row_name, row in scores.items():
        if isinstance(row, dict) and all(isinstance(row.get(t), (int, float)) for t in tasks):
            table.add_row(row_name, *(f"{row[t]:.2f}" for t in tasks))
        elif isinstance(row, dict):
            for sub, values in row.items():
                if isinstance(values, dict):
                    cells = (f"{values[t]:.2f}" if t in values else "–" for t in tasks)  # –: not measured
                    table.add_row(f"{row_name}:{sub}", *cells)
    console().print(table)


def interrupted(exc: BaseException, resume: str) -> typer.Exit:
    """After a Ctrl-C: say what was kept and how to resume; the exit to raise (code 130)."""
    trial = getattr(exc, "trial", None)
    cut = f"trial {trial} marked FAIL (interrupted) and queued again; " if trial is not None else ""
    console().print(
        f"\ninterrupted: {cut}completed trials are saved. Resume with: {resume}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return typer.Exit(EXIT_INTERRUPTED)

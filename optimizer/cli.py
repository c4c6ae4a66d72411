"""The ``mergeopt`` command line.

Commands import their heavy dependencies (torch, transformers, optuna) only when they run, so
``mergeopt --help`` is instant. Every user mistake surfaces as a :class:`MergeoptError` and is
printed here as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from optimizer.errors import MergeoptError

app = typer.Typer(
    name="mergeopt",
    help="Search merge coefficients of fine-tuned LLMs with Optuna, merging inside the engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The embedded model zoo: a tiny base and specialists trained here.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

StudyArg = Annotated[str, typer.Argument(help="study folder (studies/NAME), its study.db, or an Optuna storage URL")]
NameOpt = Annotated[str | None, typer.Option("--name", help="study name, if the storage holds several")]


def _console():
    from rich.console import Console

    return Console()


def _storage_url(study: str) -> str:
    """Accept what users naturally type: a folder, a .db file, or a full URL."""
    if "://" in study:
        return study
    path = Path(study)
    if path.suffix in (".log", ".journal") and path.is_file():
        return f"journal://{path.resolve()}"
    if path.is_dir():
        path = path / "study.db"
    if not path.is_file():
        raise MergeoptError(f"no study at {study!r}; give the study folder (e.g. studies/demo) or a storage URL")
    return f"sqlite:///{path.resolve()}"


def _open(study: str, name: str | None):
    from optimizer.search.prepare import prepare
    from optimizer.search.study import load_study, study_config

    url = _storage_url(study)
    st = load_study(url, name)
    return st, prepare(_located(study_config(st), url))


def _located(config, url: str):
    """The stored config, pointed at the storage actually opened.

    A stored config usually names no storage (the default is ``studies/<name>/`` under the
    directory the search ran from); the study's files (cached Grams, golden data) live beside the
    storage that was opened, whatever directory a later command runs from.
    """
    return config if config.storage else config.model_copy(update={"storage": url})


class _LazyEngine:
    """One engine per process, started on first use (a start costs tens of seconds).

    Its supervisor (``optimizer.engines.supervisor``) restarts it after ``restart_after`` engine
    failures in a row during a search; held-out scoring and exports use it as a plain engine.
    """

    def __init__(self, prepared, *, restart_after: int | None = 3):
        from optimizer.engines.supervisor import EngineSupervisor  # lazy: it imports torch

        config = prepared.config

        def start():
            from optimizer.engines import make_engine

            return make_engine(config.engine, prepared.models, device=config.device, dtype=config.dtype)

        self.prepared = prepared
        self.supervisor = EngineSupervisor(start, prepared.models, restart_after=restart_after)

    def __call__(self):
        return self.supervisor()

    def close(self) -> None:
        self.supervisor.close()


def _search(config_path: Path, prepared, trials: int | None, engine: _LazyEngine, *, show_front: bool = True) -> None:
    """Run the study to ``trials`` COMPLETE trials with ``engine``, then (by default) show the front."""
    import optuna

    from optimizer.cli_methods import run_hi_merging_stage
    from optimizer.cli_ops import run_until
    from optimizer.search.storage import display_url
    from optimizer.search.study import count_finished, open_study

    # Our progress line (with each failure's reason) replaces Optuna's per-trial log and tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    console = _console()
    config = prepared.config
    target = trials if trials is not None else config.search.trials
    study = open_study(prepared)
    run_hi_merging_stage(study, prepared, engine, console)  # method: hi_merging only, once per study
    done = count_finished(study)
    console.print(
        f"study [bold]{config.name}[/] at {display_url(config.storage_url())}: {done} finished, target {target}"
        f" ({len(prepared.space.distributions())} parameters, method {config.method}, engine {config.engine})"
    )
    if done < target:
        run_until(study, prepared, target, engine, resume=f"mergeopt search {config_path}")
    if show_front:
        _print_front(study, prepared)


def _print_front(study, prepared, engine: _LazyEngine | None = None) -> None:
    """The front as a table; with an engine, held-out scores of its members too."""
    from rich.table import Table

    from optimizer.search.front import front_trials
    from optimizer.search.pareto import front_members

    console = _console()
    names = study.metric_names or [t.name for t in prepared.tasks]
    front = front_trials(study)
    table = Table(title=f"Pareto front of {study.study_name} ({len(front)} trials)")
    table.add_column("trial", justify="right")
    table.add_column("baseline")
    for n in names:
        table.add_column(f"{n} search", justify="right")
    if engine is not None:
        for n in names:
            table.add_column(f"{n} held-out", justify="right")
        for m in front_members(study, prepared, engine):
            table.add_row(
                str(m.number),
                m.label,
                *(f"{m.search[n]:.3f}" for n in names),
                *(f"{m.held_out[n]:.3f}" for n in names),
            )
    else:
        for t in front:
            table.add_row(str(t.number), str(t.user_attrs.get("baseline", "")), *(f"{v:.3f}" for v in t.values))
    console.print(table)


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="study config (YAML)")],
    trials: Annotated[int | None, typer.Option(help="total COMPLETE trials to reach (default: config)")] = None,
    restart_engine_after: Annotated[
        int, typer.Option(help="restart the engine after this many engine errors in a row")
    ] = 3,
) -> None:
    """Run a study, or resume it, until it holds the requested number of complete trials.

    Several processes may run one config at once (journal or PostgreSQL storage): they share it.
    """
    if trials is not None and trials <= 0:
        raise MergeoptError(f"--trials {trials}: the trial count must be a positive number")
    if restart_engine_after <= 0:
        raise MergeoptError(f"--restart-engine-after {restart_engine_after}: give a positive number of failures")
    prepared = _prepare(config)  # everything is checked before the study file exists
    engine = _LazyEngine(prepared, restart_after=restart_engine_after)
    try:
        _search(config, prepared, trials, engine)
    finally:
        engine.close()


@app.command()
def pareto(study: StudyArg, name: NameOpt = None) -> None:
    """Show the Pareto front across tasks, with held-out scores of its members."""
    st, prepared = _open(study, name)
    engine = _LazyEngine(prepared)
    try:
        _print_front(st, prepared, engine)
    finally:
        engine.close()


@app.command()
def export(
    study: StudyArg,
    trial: Annotated[int, typer.Option(help="trial number to export")],
    out: Annotated[Path, typer.Option(help="output folder (must not exist or be empty)")],
    name: NameOpt = None,
) -> None:
    """Write a trial's merged model: HF safetensors dir, mergekit.yaml that rebuilds it, model card."""
    from optimizer.export import export_trial
    from optimizer.search.study import load_study, study_config

    st = load_study(_storage_url(study), name)
    path = export_trial(st, _located(study_config(st), _storage_url(study)), trial, out, storage_arg=study)
    _console().print(f"exported trial {trial} to {path}")


@app.command()
def report(
    study: StudyArg,
    out: Annotated[Path | None, typer.Option(help="report folder (default: STUDY/report)")] = None,
    trial: Annotated[
        int | None, typer.Option(help="trial whose coefficients the heatmap shows (default: balanced pick)")
    ] = None,
    name: NameOpt = None,
) -> None:
    """Re-score the front and the baselines on held-out data; write tables, plots and report.html."""
    from optimizer.report import build_report

    st, prepared = _open(study, name)
    target = out or _default_report_dir(study, st.study_name)
    engine = _LazyEngine(prepared)
    try:
        path, rows, pick = build_report(st, prepared, engine, target, trial=trial, storage_arg=study)
    finally:
        engine.close()
    console = _console()
    front = sum(r.on_front for r in rows)
    console.print(f"report of {front} front members and {len(rows) - front} other baselines written to {path}")
    if pick is not None:
        console.print(f"balanced member: trial {pick.number} (worst-task normalized gain {pick.min_gain:.2f})")
    console.print(f"open {path / 'report.html'}")


def _default_report_dir(study: str, name: str) -> Path:
    if "://" not in study and Path(study).is_dir():
        return Path(study) / "report"
    if "://" not in study:
        return Path(study).resolve().parent / "report"
    return Path("studies") / name / "report"


@app.command()
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

    st, prepared = _open(study, name)
    tasks = st.metric_names or [t.name for t in prepared.tasks]
    weights = parse_assignments(prefer or [], tasks, "--prefer")
    floors = parse_assignments(require or [], tasks, "--require")
    engine = _LazyEngine(prepared)
    try:
        rows, _ = collect_rows(st, prepared, engine)
    finally:
        engine.close()
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
    _console().print(
        f"picked trial {row.number}: weighted normalized gain {best.score:.3f} ({why}){floors_text}{versus}"
    )
    _console().print(f"export it: mergeopt export {study} --trial {row.number} --out merged-trial-{row.number}")


def _print_choices(ranked, tasks: list[str], best) -> None:
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
    _console().print(table)


@zoo_app.command("build")
def zoo_build(
    out: Annotated[Path | None, typer.Option(help="zoo folder (default: the shared cache)")] = None,
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="rebuild even if a complete zoo is cached")] = False,
) -> None:
    """Train (or load from cache) the tiny base model and its specialists."""
    from optimizer.zoo import build_zoo, default_zoo_dir

    console = _console()
    target = out or default_zoo_dir(seed=seed)
    info = build_zoo(target, seed=seed, force=force, log=lambda line: console.print(line, highlight=False))
    _print_zoo(info, target)


def _print_zoo(info: dict, path: Path) -> None:
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
                    table.add_row(f"{row_name}:{sub}", *(f"{values.get(t, float('nan')):.2f}" for t in tasks))
    _console().print(table)


def _demo_config_path() -> Path:
    path = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    if not path.is_file():
        raise MergeoptError(f"demo config not found at {path}; run the demo from a mergeopt checkout")
    return path


@app.command()
def demo(trials: Annotated[int | None, typer.Option(help="total trials (default: the demo config's)")] = None) -> None:
    """Build the zoo, search merges of its specialists, show the front and export a balanced member."""
    from optimizer.zoo import build_zoo, default_zoo_dir

    console = _console()
    zoo_dir = default_zoo_dir()
    info = build_zoo(zoo_dir, log=lambda line: console.print(line, highlight=False))
    _print_zoo(info, zoo_dir)
    config_path = _demo_config_path()
    prepared = _prepare(config_path)
    engine = _LazyEngine(prepared)  # one engine for the search and the held-out scoring
    try:
        _search(config_path, prepared, trials, engine, show_front=False)  # shown with held-out scores below
        _demo_export(prepared, engine)
    finally:
        engine.close()


def _prepare(config_path: Path):
    from optimizer.config import load_config
    from optimizer.search.prepare import prepare

    return prepare(load_config(config_path))


def _demo_export(prepared, engine: _LazyEngine) -> None:
    from optimizer.export import export_trial
    from optimizer.report import build_report
    from optimizer.search.study import load_study

    console = _console()
    config = prepared.config
    study = load_study(config.storage_url(), config.name)
    _print_front(study, prepared, engine)
    study_dir = Path("studies") / config.name
    report_dir, _, best = build_report(study, prepared, engine, study_dir / "report", storage_arg=str(study_dir))
    console.print(f"report: {report_dir / 'report.html'}")
    if best is None:
        return
    # The balanced choice: the member whose worst held-out task keeps most of its specialist's gain.
    out = study_dir / f"export-trial-{best.number}"
    if out.exists():
        console.print(f"balanced member: trial {best.number}, already exported at {out}")
    else:
        export_trial(study, config, best.number, out, storage_arg=str(study_dir))
        console.print(
            f"balanced member: trial {best.number} (worst-task normalized gain {best.min_gain:.2f}) exported to {out}"
        )
    console.print(
        f"next: mergeopt pick {study_dir} --prefer TASK=2  |  mergeopt export {study_dir} --trial N --out DIR"
    )


def _register_command_modules() -> None:
    # Command groups kept in their own modules (one concept each); each adds its commands to `app`.
    from optimizer import cli_methods, cli_ops

    cli_ops.register(app)
    cli_methods.register(app)


_register_command_modules()


def main() -> None:
    """Console entry point: user errors → one line on stderr, exit code 2."""
    try:
        app()
    except MergeoptError as exc:
        print(f"mergeopt: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The ``mergeopt`` command line: commands that parse their arguments, call the library and print.

One module per group of commands (``search``: search, worker, demo; ``study``: pareto, report,
pick, export, status; ``analyze``: analyze contributions, golden; ``zoo``: zoo build). Commands
import their heavy dependencies (torch, transformers, optuna) only when they run, so
``mergeopt --help`` is instant. Every user mistake surfaces as a :class:`MergeoptError` and is
printed here as one line on stderr with exit code 2. Nothing outside this package imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

# A study's log shows trials, not libraries' progress bars (lm-eval draws one per task per trial,
# datasets one per split it reads); tqdm reads this when it is first imported, so it is set first.
os.environ.setdefault("TQDM_DISABLE", "1")

import typer

from optimizer.cli import analyze, search, study, zoo
from optimizer.errors import MergeoptError

__all__ = ["app", "main"]

app = typer.Typer(
    name="mergeopt",
    help="Search merge coefficients of fine-tuned LLMs with Optuna, merging inside the engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(search.search)
app.command()(study.pareto)
app.command()(study.export)
app.command()(study.report)
app.command()(study.pick)
app.add_typer(zoo.zoo_app, name="zoo")
app.command()(search.demo)
app.command()(search.worker)
app.command()(study.status)
app.add_typer(analyze.analyze_app, name="analyze")
app.command()(analyze.golden)


def main() -> None:
    """Console entry point: user errors → one line on stderr, exit code 2."""
    code: int | str | None = 0
    try:
        app()
    except MergeoptError as exc:
        print(f"mergeopt: error: {exc}", file=sys.stderr)
        code = 2
    except SystemExit as exc:
        code = exc.code
    _exit(code)


def _exit(code: int | str | None) -> NoReturn:
    """Exit with ``code``; after vLLM ran in this process, without the interpreter's teardown.

    Now and then (3 of 24 runs with lm-eval objectives, over two sessions) a process that ran vLLM's engine
    aborted in teardown, after the study was stored and the engine closed: "terminate called
    without an active exception", SIGABRT, exit 134, from a native library's thread or static
    destructor (not found). A study that finished must not exit as a crash, so once everything is
    flushed such a process leaves with its own exit code and skips the teardown.
    """
    if "vllm" not in sys.modules:
        sys.exit(code)
    if isinstance(code, str):  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code or 0)

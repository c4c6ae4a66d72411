"""A small finished study on the zoo, shared by the tests that read studies (pareto, export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._cli import run_cli, write_config, zoo_config


@pytest.fixture(scope="session")
def finished_study(zoo, tmp_path_factory) -> tuple[Path, Path]:
    """(working folder, study folder) of a completed 10-trial task-arithmetic study."""
    cwd = tmp_path_factory.mktemp("finished")
    path = write_config(cwd / "study.yaml", zoo_config("fin", search={"trials": 10, "seed": 1}))
    run_cli("search", str(path), cwd=cwd, check=True)
    return cwd, cwd / "studies" / "fin"

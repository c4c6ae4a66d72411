"""Shared fixtures: the embedded model zoo, built once and cached across test runs."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def zoo() -> dict[str, Any]:
    """The default zoo's zoo.json (plus ``root``), built into ``default_zoo_dir()`` if absent.

    The first run trains it (a few minutes on two cores); later runs find it in the cache. Set
    ``MERGEOPT_ZOO_DIR`` to keep it somewhere else.
    """
    from optimizer.zoo import build_zoo, default_zoo_dir

    return build_zoo(default_zoo_dir())


# A finished study shared by the tests that read studies (pareto, export, refusals).
from tests._study_fixture import finished_study  # noqa: E402, F401


@pytest.fixture(scope="session")
def real_zoo() -> dict[str, Any]:
    """The real-model zoo's zoo.json (plus ``root``), built into ``default_real_zoo_dir()`` if absent.

    The first run fine-tunes it (about 12 minutes on two cores); later runs find it in the cache.
    Set ``MERGEOPT_REAL_ZOO_DIR`` to keep it somewhere else.
    """
    from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

    return build_real_zoo(default_real_zoo_dir())


@pytest.fixture(scope="session")
def tiny_lora_zoo(zoo: dict[str, Any]) -> dict[str, Any]:
    """The tiny LoRA zoo's lora_zoo.json (plus ``root``): one adapter per task of ``zoo``, on its base.

    The first run trains it into ``default_lora_zoo_dir("tiny")`` (about a minute on one core);
    later runs find it in the cache. Set ``MERGEOPT_LORA_ZOO_DIR`` to keep it somewhere else.
    """
    from optimizer.zoo.lora import build_lora_zoo, default_lora_zoo_dir

    return build_lora_zoo("tiny", default_lora_zoo_dir("tiny"), zoo=zoo["root"])

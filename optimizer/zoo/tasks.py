"""The zoo's synthetic tasks: seeded generators of (prompt, target) examples.

Each task is a pure function of a ``random.Random``, so the zoo's data (and hence its weights) is
a function of the seed alone. The format is tiny and byte-level friendly: ``"REV: dbca ="`` →
``" acbd"``; a completion ends at :data:`STOP`, which the model is trained to emit after every
answer, so the target a metric compares against carries no newline. Tags are upper case so that
no input letter can be mistaken for one: a 4-layer model then finds the tag by content, which
makes it learn the mixture markedly faster than with lower-case tags.

The three tasks need different circuits on the same weights (read backwards, count and order,
copy through a lookup table), which is what makes adding their task vectors a real merge problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from optimizer.errors import ConfigError

__all__ = ["STOP", "TASKS", "TASK_NAMES", "Example", "Task", "get_task"]

#: The stop string every answer ends with; metrics strip it, generators never put it in a target.
STOP = "\n"

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt and the exact greedy completion expected after it (without :data:`STOP`)."""

    prompt: str
    target: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "target": self.target}


@dataclass(frozen=True)
class Task:
    """A named generator of examples; ``sizes`` is the range of input lengths, drawn uniformly.

    ``max_new_tokens`` bounds the longest answer plus its stop string, in tokens, with room to
    spare so a model that runs on is cut off and scored wrong rather than truncated into a match.
    """

    name: str
    description: str
    make: Callable[[random.Random, int], Example]
    sizes: tuple[int, int]
    max_new_tokens: int

    def sample(self, rng: random.Random) -> Example:
        lo, hi = self.sizes
        return self.make(rng, rng.randint(lo, hi))


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(n))


def _rev(rng: random.Random, n: int) -> Example:
    word = _word(rng, n)
    return Example(f"REV: {word} =", f" {word[::-1]}")


def _sort(rng: random.Random, n: int) -> Example:
    word = _word(rng, n)
    return Example(f"SORT: {word} =", f" {''.join(sorted(word))}")


def _rot(rng: random.Random, n: int) -> Example:
    word = _word(rng, n)
    return Example(f"ROT: {word} =", " " + "".join(_LETTERS[(_LETTERS.index(c) + 3) % 26] for c in word))


TASKS: dict[str, Task] = {
    "rev": Task("rev", "reverse 4-10 lowercase letters", _rev, (4, 10), max_new_tokens=14),
    "sort": Task("sort", "sort 4-10 lowercase letters", _sort, (4, 10), max_new_tokens=14),
    "rot": Task("rot", "shift 4-10 lowercase letters by 3 (Caesar cipher)", _rot, (4, 10), max_new_tokens=14),
}

#: Task names in the zoo's canonical order (data, specialists and reports all follow it).
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``, or an error that lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown zoo task {name!r}; valid tasks: {', '.join(TASK_NAMES)}") from None

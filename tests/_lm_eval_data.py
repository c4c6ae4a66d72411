"""The data of the lm-eval task YAMLs shipped for the zoos (``configs/lm_eval/zoo/``, ``.../real/``).

The rows are the zoos' own search / held-out examples (seed 0), committed beside the YAMLs so that
``lm_eval --include_path configs/lm_eval/zoo`` runs from the repository root with nothing built;
``tests/test_lm_eval.py`` checks the committed files still equal what this module makes from the
zoo, so the two cannot drift apart. Regenerate after a zoo version change::

    .venv/bin/python -m tests._lm_eval_data
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "configs" / "lm_eval" / "zoo" / "data"
REAL_DATA = DATA.parent.parent / "real" / "data"
REAL_TASKS = ("arith", "antonym", "extract")
SPLITS = {"validation": "search", "test": "held_out"}  # lm-eval split -> zoo split


def _shift(word: str, by: int) -> str:
    return "".join(chr((ord(c) - 97 + by) % 26 + 97) for c in word)


def _rot_choices(row: dict, rng: random.Random) -> dict:
    """A multiple-choice row: the right Caesar shift among two near misses (one letter off, at a
    seeded position each), in a seeded order."""
    answer = row["target"].strip()
    near = []
    for _ in range(2):
        i = rng.randrange(len(answer))
        near.append(answer[:i] + _shift(answer[i], rng.choice((1, 25))) + answer[i + 1 :])
    choices = [answer, *near]
    rng.shuffle(choices)
    return {"prompt": row["prompt"], "choices": choices, "label": choices.index(answer)}


def rows(zoo_dir: Path) -> dict[str, list[dict]]:
    """File name -> rows, from a built zoo's task files."""
    out: dict[str, list[dict]] = {}
    for lm_split, zoo_split in SPLITS.items():
        for task in ("rev", "sort"):
            lines = (zoo_dir / "tasks" / task / f"{zoo_split}.jsonl").read_text().splitlines()
            out[f"{task}_{lm_split}.jsonl"] = [json.loads(line) for line in lines]
        rng = random.Random(f"rot_mc/{lm_split}")
        lines = (zoo_dir / "tasks" / "rot" / f"{zoo_split}.jsonl").read_text().splitlines()
        out[f"rot_mc_{lm_split}.jsonl"] = [_rot_choices(json.loads(line), rng) for line in lines]
    return out


def real_rows(real_dir: Path) -> dict[str, list[dict]]:
    """File name -> rows, from a built real-model zoo's task files (as they are)."""
    out: dict[str, list[dict]] = {}
    for lm_split, zoo_split in SPLITS.items():
        for task in REAL_TASKS:
            lines = (real_dir / "tasks" / task / f"{zoo_split}.jsonl").read_text().splitlines()
            out[f"{task}_{lm_split}.jsonl"] = [json.loads(line) for line in lines]
    return out


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    from optimizer.zoo import build_zoo, default_zoo_dir
    from optimizer.zoo.real import build_real_zoo, default_real_zoo_dir

    zoo_dir, real_dir = default_zoo_dir(), default_real_zoo_dir()
    build_zoo(zoo_dir, log=print)
    build_real_zoo(real_dir)
    for folder, made in ((DATA, rows(zoo_dir)), (REAL_DATA, real_rows(real_dir))):
        folder.mkdir(parents=True, exist_ok=True)
        for name, records in made.items():
            (folder / name).write_text(render(records))
            print(f"wrote {folder / name} ({len(records)} rows)")

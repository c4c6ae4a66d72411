"""The real-model zoo's tasks: chat questions whose answers have three different shapes.

Each task asks a question a small instruction-tuned model can answer, but not in the form asked
for: left alone, SmolLM2-135M-Instruct wraps its answer in a sentence ("75 + 98 = 173"), so exact
match scores it near 0. A specialist learns the form — a bare number, a single word, a one-line
JSON object — which is what fine-tuning a chat model on a narrow task mostly teaches, and three
such specialists pull the shared chat format three ways: a merge problem of the kind users have.

* ``arith``: "What is 75 + 98?" → ``173`` (a number);
* ``antonym``: 'What is the opposite of "hot"?' → ``cold`` (a word; held-out words never trained);
* ``extract``: "Extract the name and age as JSON: ..." → ``{"name": "Maria", "age": 34}`` (structured).

Rows keep their raw fields (``a``/``b``, ``word``, ``sentence``) beside the rendered ``question``
and ``answer``, so configs can use either the columns or ``prompt_template``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CHAT_TASKS", "CHAT_TASK_NAMES", "ChatTask", "make_splits"]

Row = dict[str, object]

_ANTONYMS = """hot cold, big small, tall short, fast slow, happy sad, light dark, old young, open closed,
early late, rich poor, strong weak, hard soft, full empty, clean dirty, wet dry, loud quiet,
thick thin, heavy light, high low, long short, push pull, true false, win lose, buy sell,
first last, inside outside, above below, always never, before after, begin end, best worst,
cheap expensive, day night, deep shallow, difficult easy, enter exit, friend enemy, give take,
good bad, guilty innocent, north south, east west, laugh cry, left right, less more, love hate,
male female, maximum minimum, near far, noisy silent, off on, pass fail, polite rude, present absent,
question answer, raw cooked, remember forget, safe dangerous, same different, sharp dull,
simple complex, smooth rough, sour sweet, stand sit, start finish, sunny cloudy, tight loose,
top bottom, ugly beautiful, up down, victory defeat, visible invisible, wide narrow, wild tame,
wise foolish, accept refuse, add subtract, alive dead, ancient modern, arrive depart, asleep awake,
attack defend, backward forward, bitter sweet, borrow lend, brave cowardly, calm angry,
careful careless, cause effect, common rare, correct wrong, create destroy, decrease increase,
dull bright, entrance exit, expand shrink, fact fiction, fat thin, fresh stale, generous selfish,
giant tiny, gentle rough, hero villain, import export, include exclude, join separate, lazy busy,
major minor, maximum minimum, mild severe, narrow broad, natural artificial, negative positive,
obey disobey, optimist pessimist, patient impatient, peace war, permanent temporary, plural singular,
private public, profit loss, quick slow, rapid gradual, reject accept, sane insane, shout whisper,
sink float, solid liquid, spend save, sunrise sunset, teacher student, thaw freeze, throw catch,
tiny huge, total partial, vertical horizontal, vacant occupied, worse better, young elderly"""
_NAMES = [
    "Maria",
    "Liam",
    "Olivia",
    "Noah",
    "Emma",
    "Lucas",
    "Sofia",
    "Mateo",
    "Amara",
    "Kenji",
    "Aisha",
    "Omar",
    "Freya",
    "Ravi",
    "Ines",
    "Tomas",
    "Yara",
    "Hugo",
    "Leila",
    "Marco",
    "Nadia",
    "Felix",
    "Chloe",
    "Arjun",
    "Zara",
    "Pablo",
    "Elena",
    "Jonas",
    "Mina",
    "Oscar",
    "Lucia",
    "Ivan",
    "Hana",
    "Diego",
    "Alma",
    "Sven",
    "Priya",
    "Anton",
    "Clara",
    "Malik",
    "Ruth",
    "Emil",
    "Sara",
    "Luca",
    "Nora",
    "Theo",
    "Vera",
    "Karim",
    "Ida",
    "Bruno",
]
_CITIES = [
    "Lyon",
    "Porto",
    "Oslo",
    "Quito",
    "Kyoto",
    "Lima",
    "Perth",
    "Cairo",
    "Dakar",
    "Hanoi",
    "Milan",
    "Seville",
    "Krakow",
    "Tartu",
    "Bergen",
    "Dublin",
    "Riga",
    "Lagos",
    "Accra",
    "Sapporo",
    "Geneva",
    "Bilbao",
    "Malmo",
    "Graz",
    "Turku",
    "Ghent",
    "Brno",
    "Split",
    "Cork",
    "Leeds",
]


@dataclass(frozen=True)
class ChatTask:
    """A chat task: draws a row, and says how long its answers are."""

    name: str
    description: str
    draw: Callable[[random.Random], Row]
    max_new_tokens: int


def _arith(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"a": a, "b": b, "question": f"What is {a} + {b}?", "answer": str(a + b)}


def _pairs() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in _ANTONYMS.replace("\n", " ").split(","):
        a, b = item.split()
        if a not in seen and b not in seen:  # each word in one pair only, so splits stay disjoint
            seen |= {a, b}
            out.append((a, b))
    return out


def _antonym_row(word: str, answer: str) -> Row:
    return {"word": word, "question": f'What is the opposite of "{word}"?', "answer": answer}


def _extract(rng: random.Random) -> Row:
    name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 90)
    sentence = rng.choice(
        [
            f"{name} is {age} years old and lives in {city}.",
            f"Living in {city}, {name} turned {age} this year.",
            f"{name}, aged {age}, moved to {city} last spring.",
            f"In {city} you can meet {name}, who is {age}.",
        ]
    )
    answer = json.dumps({"name": name, "age": age})
    return {"sentence": sentence, "question": f"Extract the name and age as JSON: {sentence}", "answer": answer}


CHAT_TASKS: dict[str, ChatTask] = {
    "arith": ChatTask("arith", "two-digit addition; the answer is the bare number", _arith, 8),
    "antonym": ChatTask("antonym", "the opposite of a word; the answer is one word", lambda rng: {}, 8),
    "extract": ChatTask("extract", "a person's name and age from a sentence, as one line of JSON", _extract, 24),
}
CHAT_TASK_NAMES: tuple[str, ...] = tuple(CHAT_TASKS)


def make_splits(seed: int, sizes: dict[str, int]) -> dict[str, dict[str, list[Row]]]:
    """Per task, the splits of ``sizes`` (e.g. train, search, held_out) with all questions distinct.

    Antonym pairs are split by pair, both directions in one split, so a held-out word was never
    trained on, in either direction; the other tasks draw until every question is new.
    """
    out: dict[str, dict[str, list[Row]]] = {}
    for name, task in CHAT_TASKS.items():
        rng = random.Random(f"mergeopt-real-zoo:{seed}:{name}")
        if name == "antonym":
            pairs = _pairs()
            rng.shuffle(pairs)
            rows_by_pair = [[_antonym_row(a, b), _antonym_row(b, a)] for a, b in pairs]
            out[name] = {}
            start = 0
            for split, n in sizes.items():
                chosen: list[Row] = []
                while len(chosen) < n and start < len(rows_by_pair):
                    chosen += rows_by_pair[start]
                    start += 1
                rng.shuffle(chosen)
                out[name][split] = chosen[:n]
            continue
        seen: set[str] = set()
        rows: list[Row] = []
        while len(rows) < sum(sizes.values()):
            row = task.draw(rng)
            if row["question"] not in seen:
                seen.add(str(row["question"]))
                rows.append(row)
        out[name] = {}
        for split, n in sizes.items():
            out[name][split], rows = rows[:n], rows[n:]
    return out

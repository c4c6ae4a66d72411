"""How a task's rows become prompts, and how a model's answer is judged against a target.

Users' data rarely has a ready-made prompt column, and chat models answer inside a sentence, so an
objective may say (every option optional, each validated when the study's tasks load):

* ``prompt_template`` / ``target_template``: Jinja templates over a row's fields (as lm-eval's
  ``doc_to_text`` / ``doc_to_target``), else the ``prompt_field`` / ``target_field`` column;
* ``fewshot: k``: k solved examples from the search split before the question, the same ones for a
  row in every trial (chosen from the study's seed and the row's content), never the row itself;
* ``chat: true`` (and ``system``): the whole in the base tokenizer's chat template, the shots as
  earlier turns;
* ``add_bos``: the beginning-of-sequence token forced on or off (default: as the tokenizer does;
  :func:`optimizer.tokens.with_bos`);
* ``extract``: a regex that finds the answer in the output (its first group, else the match; no
  match is a miss) and ``normalize``: strip, lower, punctuation, whitespace, in that order of the
  list, applied to answer and target before exact match.

A :class:`PromptFormat` renders; a :class:`Verdict` judges. Both engines receive the rendered text
and tokenize exactly it, so they score the very same prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optimizer.errors import ConfigError, DataError
from optimizer.tokens import TokenizerInfo, with_bos

__all__ = ["NORMALIZERS", "PromptFormat", "Verdict", "compile_template"]

#: Normalizer name → what it does to a text.
NORMALIZERS: Mapping[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": str.lower,
    "punctuation": lambda s: s.translate(str.maketrans("", "", string.punctuation)),
    "whitespace": lambda s: " ".join(s.split()),
}

#: Between two solved examples, and between the last one and the question (lm-eval's default).
FEWSHOT_DELIMITER = "\n\n"

Row = Mapping[str, Any]


def compile_template(source: str, where: str) -> Any:
    """A Jinja template that refuses undefined fields (so a missing column is an error, not "")."""
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{where}: {exc.message} at line {exc.lineno}; fix the Jinja template") from None


def _row_key(row: Row) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class PromptFormat:
    """Renders a row's prompt and target (see the module docstring); memoized per row object.

    ``tokenizer`` is the base's (``None``: prompts are left as rendered, BOS untouched);
    ``chat`` renders a list of chat messages to text (the tokenizer's template), required when
    ``use_chat``. ``fewshot_pool`` holds the rows shots are drawn from (the search split).
    """

    prompt_field: str = "prompt"
    target_field: str = "target"
    prompt_template: str | None = None
    target_template: str | None = None
    use_chat: bool = False
    system: str | None = None
    fewshot: int = 0
    fewshot_pool: Sequence[Row] = ()
    seed: int = 0
    add_bos: bool | None = None
    tokenizer: TokenizerInfo | None = None
    chat: Callable[[list[dict[str, str]]], str] | None = None
    where: str = "objective"
    _prompt_t: Any = field(default=None, init=False, repr=False)
    _target_t: Any = field(default=None, init=False, repr=False)
    _memo: dict[int, tuple[Row, str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prompt_template is not None:
            self._prompt_t = compile_template(self.prompt_template, f"{self.where}: prompt_template")
        if self.target_template is not None:
            self._target_t = compile_template(self.target_template, f"{self.where}: target_template")
        if self.use_chat and self.chat is None:
            raise ConfigError(f"{self.where}: chat: true needs the base tokenizer's chat template")

    def columns(self) -> tuple[str, ...]:
        """The columns read as they are (those without a template): every row must have them."""
        out = []
        if self.prompt_template is None:
            out.append(self.prompt_field)
        if self.target_template is None:
            out.append(self.target_field)
        return tuple(out)

    # -- the two texts of a row ------------------------------------------------------------------
    def question(self, row: Row) -> str:
        """The row's prompt text alone (template or column), before shots, chat and BOS."""
        return self._render(self._prompt_t, self.prompt_field, row, "prompt_template")

    def target(self, row: Row) -> str:
        """The row's target text (template or column)."""
        return self._render(self._target_t, self.target_field, row, "target_template")

    def _render(self, template: Any, column: str, row: Row, option: str) -> str:
        if template is None:
            if column not in row:
                raise DataError(
                    f"{self.where}: a row lacks the field {column!r} (it has: {', '.join(map(str, row))});"
                    f" rename the column or set the objective's field option"
                )
            return str(row[column])
        from jinja2 import UndefinedError

        try:
            return str(template.render(**row))
        except UndefinedError as exc:
            raise DataError(
                f"{self.where}: {option} names a field a row lacks ({exc.message}); the row has:"
                f" {', '.join(map(str, row))} — fix the template or the data: {_short(row)}"
            ) from None

    # -- the prompt the engine gets --------------------------------------------------------------
    def prompt(self, row: Row) -> str:
        """The whole prompt of ``row``: shots, the question, the chat template and the BOS."""
        # By identity, holding the row so its id cannot be reused by another row while memoized.
        found = self._memo.get(id(row))
        if found is None or found[0] is not row:
            found = self._memo[id(row)] = (row, self._build(row))
        return found[1]

    def _shots(self, row: Row) -> list[Row]:
        if not self.fewshot:
            return []
        own = _row_key(row)
        pool = [r for r in self.fewshot_pool if _row_key(r) != own]
        if len(pool) < self.fewshot:
            raise DataError(
                f"{self.where}: fewshot {self.fewshot} but only {len(pool)} other search examples to draw"
                f" shots from; lower fewshot or add search examples"
            )
        rng = random.Random(f"{self.seed}/{self.where}/{own}")
        return rng.sample(pool, self.fewshot)

    def _build(self, row: Row) -> str:
        shots = self._shots(row)
        question = self.question(row)
        if self.use_chat:
            assert self.chat is not None  # checked in __post_init__
            messages = [{"role": "system", "content": self.system}] if self.system else []
            for shot in shots:
                messages += [
                    {"role": "user", "content": self.question(shot)},
                    {"role": "assistant", "content": self.target(shot)},
                ]
            messages.append({"role": "user", "content": question})
            text = self.chat(messages)
        else:
            text = "".join(self.question(s) + self.target(s) + FEWSHOT_DELIMITER for s in shots) + question
        return with_bos(text, self.tokenizer, self.add_bos)


@dataclass(frozen=True)
class Verdict:
    """Judges a generated answer against a target: optional extraction, then normalizers, then equality."""

    extract: str | None = None
    normalize: tuple[str, ...] = ("strip",)
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [n for n in self.normalize if n not in NORMALIZERS]
        if unknown:
            raise ConfigError(f"normalize {unknown[0]!r} is not known; use some of: {', '.join(NORMALIZERS)}")
        if self.extract is not None:
            try:
                pattern = re.compile(self.extract)
            except re.error as exc:
                raise ConfigError(f"extract {self.extract!r} is not a valid regex ({exc}); fix the pattern") from None
            object.__setattr__(self, "_pattern", pattern)

    def norm(self, text: str) -> str:
        for name in self.normalize:
            text = NORMALIZERS[name](text)
        return text

    def answer(self, output: str) -> str | None:
        """What the output answers: the extracted part (None: nothing matched), else all of it."""
        if self._pattern is None:
            return output
        m = self._pattern.search(output)
        if m is None:
            return None
        return m.group(1) if m.groups() and m.group(1) is not None else m.group(0)

    def __call__(self, output: str, target: str) -> bool:
        found = self.answer(output)
        return found is not None and self.norm(found) == self.norm(target)


def _short(row: Row, limit: int = 120) -> str:
    text = json.dumps(row, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"

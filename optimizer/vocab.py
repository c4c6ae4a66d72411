"""Vocabulary rows: embeddings and LM heads whose rows stand for the same tokens, or for none.

Checkpoints often hold more embedding rows than their tokenizer has tokens (Qwen2.5: 152 064 rows
for 151 665 tokens, rounded up for fast matmuls), and a fine-tune saved after
``resize_token_embeddings(len(tokenizer))`` holds exactly as many as the tokenizer. Rows past the
tokenizer are never a token the tokenizer produces, so such a specialist is still a fine-tune of
the base: its task vector is its difference on the tokenizer's rows, and zero on the base's padding
rows (which the merge therefore takes from the base).

A specialist whose tokenizer *added* tokens has rows with no counterpart in the base. A study merges
it over the **union vocabulary** (:mod:`optimizer.union_vocab`): a copy of the base whose tokenizer
has every added token and whose new rows are the mean of the rows of the specialists that have the
token. Whenever a specialist's tokenizer differs from the base's, its rows are placed on the base's
by token string (:class:`RowMap`, :func:`vocab_rows`): a token's row is the difference of the two
rows of that token, a base token the specialist lacks has a zero difference, and so has an added
token it lacks. With one holder a new token's difference is zero, so every method keeps the
holder's row; among several holders each one's difference is its deviation from their mean, merged
as the method merges any row.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from optimizer.errors import ModelError

__all__ = [
    "RowMap",
    "added_tokens",
    "check_added_tokens",
    "is_vocab_tensor",
    "shown_tokens",
    "tokenizer_rows",
    "union_tokens",
    "vocab",
    "vocab_delta",
    "vocab_rows",
]


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name``'s first dimension is the vocabulary (the token embedding or the LM head)."""
    return name.endswith("embed_tokens.weight") or name == "lm_head.weight"


def vocab(model_dir: Path) -> dict[str, int] | None:
    """Token → id of ``model_dir``'s tokenizer.json (added tokens included), or None without one.

    Cached and shared: do not change the dict."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    stat = path.stat()
    return _read_vocab(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_vocab(path: str, mtime_ns: int, size: int) -> dict[str, int]:
    # Keyed by the file's identity and version: checking N specialists against the base (and the
    # export again) parses the base's tokenizer once, and a changed file is read afresh.
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise ModelError(f"{path}: not a readable tokenizer.json ({exc})") from None


def tokenizer_rows(model_dir: Path) -> int | None:
    """Rows the model's tokenizer can address (its largest id + 1), or None without a tokenizer.json."""
    tokens = vocab(model_dir)
    return max(tokens.values()) + 1 if tokens else None


def added_tokens(base_dir: Path, model_dir: Path) -> list[str]:
    """Tokens ``model_dir``'s tokenizer has and the base's lacks, by id (empty without tokenizers)."""
    base, other = vocab(base_dir), vocab(model_dir)
    if base is None or other is None:
        return []
    return [token for token, _ in sorted(other.items(), key=lambda kv: kv[1]) if token not in base]


def union_tokens(base_dir: Path, models: Mapping[str, Path]) -> dict[str, list[str]]:
    """Tokens ``models`` add to the base's vocabulary → the models that have each: models in their
    order, each one's tokens by id (the order of the union vocabulary's new ids)."""
    union: dict[str, list[str]] = {}
    for name, path in models.items():
        for token in added_tokens(base_dir, path):
            union.setdefault(token, []).append(name)
    return union


def shown_tokens(tokens: list[str]) -> str:
    """The first few ``tokens`` quoted, and how many more."""
    return ", ".join(repr(t) for t in tokens[:5]) + (f" and {len(tokens) - 5} more" if len(tokens) > 5 else "")


def check_added_tokens(base_dir: Path, model_dir: Path, name: str) -> None:
    """Refuse to merge, over the base's own vocabulary, a specialist whose tokenizer added tokens."""
    added = added_tokens(base_dir, model_dir)
    if added:
        raise ModelError(
            f"model {name!r} adds tokens the base's tokenizer lacks ({shown_tokens(added)}); this merge"
            " reads the base's vocabulary: run it through a study (`mergeopt search`, which merges over"
            " the union vocabulary), or add them to the base first (tokenizer.add_tokens, then"
            " model.resize_token_embeddings, saved) and use that as the base"
        )


@dataclass(frozen=True)
class RowMap:
    """A specialist's vocabulary rows placed on the base's by token: its row ``src[i]`` holds the
    token of the base's row ``dst[i]``. Rows from ``padding_from`` on are no token of either
    tokenizer and are matched by position, as far as both tensors go; base rows in neither have a
    zero task vector."""

    dst: torch.Tensor  # int64 rows of the base
    src: torch.Tensor  # int64 rows of the specialist
    padding_from: int

    def fits(self, base_rows: int, model_rows: int) -> bool:
        """Whether tensors of these row counts hold every token row the map names."""
        return len(self.dst) == 0 or (int(self.dst.max()) < base_rows and int(self.src.max()) < model_rows)


def vocab_rows(base_dir: Path, model_dir: Path, name: str, *, added_ok: bool = False) -> int | RowMap | None:
    """How ``model_dir``'s embedding and head rows sit on the base's.

    The base tokenizer's row count (an ``int``; None without a tokenizer.json) where both tokenizers
    are the same: the rows are the same tokens, and only padding may differ. A :class:`RowMap` where
    they differ: rows are matched by token string, and padding rows (no token in either) by
    position. A specialist with tokens the base lacks is refused unless ``added_ok`` (a study checks
    it against the user's base before building the union vocabulary; merges read the union base).
    """
    base, other = vocab(base_dir), vocab(model_dir)
    if base is None or other is None or base == other:
        return tokenizer_rows(base_dir)
    if not added_ok:
        check_added_tokens(base_dir, model_dir, name)
    return _row_map(base, other)


def _row_map(base: Mapping[str, int], other: Mapping[str, int]) -> RowMap:
    pairs = {base[token]: row for token, row in other.items() if token in base}
    dst = torch.tensor(sorted(pairs), dtype=torch.int64)
    src = torch.tensor([pairs[int(d)] for d in dst], dtype=torch.int64)
    return RowMap(dst, src, max(max(base.values()), max(other.values())) + 1)


def vocab_delta(tensor: torch.Tensor, base: torch.Tensor, rows: int | RowMap) -> torch.Tensor:
    """A specialist's task vector on the base's rows. With a row count (the same tokenizer): its
    difference on the first ``rows`` rows (the tokenizer's), zero on the base's padding rows. With a
    :class:`RowMap`: the difference of each token's two rows, and of padding rows both tensors have."""
    delta = torch.zeros_like(base)
    if isinstance(rows, int):
        delta[:rows] = tensor[:rows].to(base.device, base.dtype) - base[:rows]
        return delta
    dst = rows.dst.to(base.device)
    delta[dst] = tensor.index_select(0, rows.src).to(base.device, base.dtype) - base[dst]
    start, end = rows.padding_from, min(len(base), len(tensor))
    if start < end:
        delta[start:end] = tensor[start:end].to(base.device, base.dtype) - base[start:end]
    return delta

"""Vocabulary rows: embeddings and LM heads whose row counts differ only in padding.

Checkpoints often hold more embedding rows than their tokenizer has tokens (Qwen2.5: 152 064 rows
for 151 665 tokens, rounded up for fast matmuls), and a fine-tune saved after
``resize_token_embeddings(len(tokenizer))`` holds exactly as many as the tokenizer. Rows past the
tokenizer are never a token the tokenizer produces, so such a specialist is still a fine-tune of
the base: its task vector is its difference on the tokenizer's rows, and zero on the base's padding
rows (which the merge therefore takes from the base). A specialist whose tokenizer *added* tokens
is different: its new rows have no counterpart in the base, and is refused by name.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from optimizer.errors import ModelError

__all__ = ["added_tokens", "check_added_tokens", "is_vocab_tensor", "tokenizer_rows", "vocab_delta"]


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name``'s first dimension is the vocabulary (the token embedding or the LM head)."""
    return name.endswith("embed_tokens.weight") or name == "lm_head.weight"


def _vocab(model_dir: Path) -> dict[str, int] | None:
    """Token → id of ``model_dir``'s tokenizer.json, or None without one."""
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
    vocab = _vocab(model_dir)
    return max(vocab.values()) + 1 if vocab else None


def added_tokens(base_dir: Path, model_dir: Path) -> list[str]:
    """Tokens ``model_dir``'s tokenizer has and the base's lacks, by id (empty without tokenizers)."""
    base, other = _vocab(base_dir), _vocab(model_dir)
    if base is None or other is None:
        return []
    return [token for token, _ in sorted(other.items(), key=lambda kv: kv[1]) if token not in base]


def check_added_tokens(base_dir: Path, model_dir: Path, name: str) -> None:
    """Refuse a specialist whose tokenizer added tokens, naming them and the fix."""
    added = added_tokens(base_dir, model_dir)
    if added:
        shown = ", ".join(repr(t) for t in added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
        raise ModelError(
            f"model {name!r} adds tokens the base's tokenizer lacks ({shown}); mergeopt merges over the"
            " base's vocabulary: add them to the base first (tokenizer.add_tokens, then"
            " model.resize_token_embeddings, saved) and use that as the base"
        )


def vocab_delta(tensor: torch.Tensor, base: torch.Tensor, rows: int) -> torch.Tensor:
    """A specialist's task vector on the base's rows: its difference on the first ``rows`` rows
    (the tokenizer's), zero on the base's padding rows."""
    delta = torch.zeros_like(base)
    delta[:rows] = tensor[:rows].to(base.device, base.dtype) - base[:rows]
    return delta

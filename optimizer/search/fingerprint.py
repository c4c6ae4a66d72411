"""A cheap fingerprint of the models a study merges, to notice when they change on disk.

A study's trials are only comparable while the base and the specialists stay the same files. The
fingerprint is stored in the study when it is created (user attr ``models_fingerprint``), and every
later ``search`` or ``worker`` refuses to run on models whose fingerprint differs.

Why not a full hash: a worker would read every byte of every model before its first trial: 4 × 16 GB
for an 8B base and three specialists, over a minute from a local NVMe and far longer from network
storage, on every worker start. What is hashed instead, per safetensors file:

* its size and its whole JSON header (names, dtypes, shapes, offsets): a different architecture,
  dtype, shard layout, or a truncated copy changes these;
* ``SAMPLES`` chunks of ``CHUNK`` bytes spread evenly over the tensor data: a retrained or
  re-exported model with the *same* shapes (the usual case: every fine-tune of one base has the
  header of the base) changes nearly every tensor, so it changes the sampled bytes.

plus ``config.json``. This reads ~1 MB per model. What it cannot see is a change confined to bytes
no sample falls on (an edit of a few values); that is the price of starting workers in seconds.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

from optimizer.errors import ModelError

__all__ = ["CHUNK", "SAMPLES", "check_fingerprint", "model_fingerprint", "models_fingerprint"]

SAMPLES = 64
CHUNK = 4096
#: Bumped whenever what is hashed changes, so an old study's fingerprint is not misread as a change.
_VERSION = 1


def _file_digest(path: Path, update: Callable[[bytes], object]) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: not a readable safetensors file (only {size} bytes); re-export the model")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ModelError(f"{path}: not a readable safetensors file (bad header length); re-export the model")
        update(f"{path.name}:{size}:".encode())
        update(f.read(header_len))
        start = 8 + header_len
        span = size - start
        for i in range(SAMPLES if span > 0 else 0):
            f.seek(start + (span - min(CHUNK, span)) * i // max(SAMPLES - 1, 1))
            update(f.read(CHUNK))


def model_fingerprint(model_dir: Path) -> str:
    """A short hex digest of one model directory (see the module docstring for what it covers)."""
    from optimizer.models import weight_files

    h = hashlib.sha256(f"mergeopt-fingerprint-v{_VERSION}\n".encode())
    config = Path(model_dir) / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in weight_files(Path(model_dir)):
        _file_digest(path, h.update)
    return h.hexdigest()[:32]


def models_fingerprint(base: Path, specialists: Mapping[str, Path]) -> dict[str, str]:
    """Role → digest: ``base`` and each specialist by its name in the config."""
    return {"base": model_fingerprint(base), **{name: model_fingerprint(p) for name, p in specialists.items()}}


def check_fingerprint(
    stored: Mapping[str, str], current: Mapping[str, str], paths: Mapping[str, Path], study: str
) -> None:
    """Refuse models that differ from those the study started with, naming the first that changed."""
    for role, digest in current.items():
        if role in stored and stored[role] != digest:
            what = "the base" if role == "base" else f"model {role!r}"
            raise ModelError(
                f"{what} at {paths[role]} changed on disk since study {study!r} started (its safetensors"
                " or config.json differ); restore the original files, or start a new study (another"
                " name) for the new models"
            )

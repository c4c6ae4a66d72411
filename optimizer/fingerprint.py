"""Fingerprints of model directories: notice when a model changed on disk, without reading it all.

Three things depend on a model staying the same files: a study's trials (comparable only while
the base and specialists are unchanged), golden data (each specialist's answers) and a method's
measured study data (RegMean's Grams, HILA's importances). One function serves them all, in one
of three modes, each a trade between cost and what it can miss:

* ``"sampled"`` (studies; the digest is stored in every study, so it never changes meaning): per
  safetensors file its size, its whole JSON header (names, dtypes, shapes, offsets) and
  :data:`SAMPLES` chunks of :data:`CHUNK` bytes spread evenly over the tensor data, plus
  ``config.json``. ~1 MB per model, so a worker starts in seconds even on a 70B model; a
  retrained or re-exported model changes nearly every tensor and so the sampled bytes. It misses
  a change confined to bytes no sample falls on (an edit of a few values).
* ``"stat"`` (caches: golden data, study data): each file's header, size and modification time
  in nanoseconds, plus the small config and tokenizer files in full. A few kilobytes; it misses a
  rewrite that keeps size and mtime (``cp -p`` of another checkpoint of the same architecture),
  and a plain ``touch`` regenerates needlessly, which is the safe direction.
* ``"content"``: every byte of every weight file (roughly 10-30 s per 7B model) plus the side
  files: exact, at the price of reading the whole model on every call.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from optimizer.checkpoints import weight_files
from optimizer.errors import ConfigError, ModelError

__all__ = ["CHUNK", "MODES", "SAMPLES", "Mode", "check_fingerprint", "model_fingerprint", "models_fingerprint"]

Mode = Literal["sampled", "stat", "content"]
MODES: tuple[str, ...] = ("sampled", "stat", "content")
SAMPLES = 64
CHUNK = 4096
#: Bumped whenever what "sampled" hashes changes, so an old study's digest is not misread as a change.
_VERSION = 1
# Small files next to the weights that change what the model generates; hashed in full ("stat", "content").
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
_READ = 16 * 2**20


def _header(path: Path) -> tuple[bytes, int]:
    """(the 8-byte length prefix + the JSON header, the header's length) of a safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: not a readable safetensors file (only {size} bytes); re-export the model")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ModelError(f"{path}: not a readable safetensors file (bad header length); re-export the model")
        return head + f.read(length), length


def _sampled(path: Path, update: Callable[[bytes], object]) -> None:
    size = path.stat().st_size
    header, length = _header(path)
    update(f"{path.name}:{size}:".encode())
    update(header[8:])
    start = 8 + length
    span = size - start
    with path.open("rb") as f:
        for i in range(SAMPLES if span > 0 else 0):
            f.seek(start + (span - min(CHUNK, span)) * i // max(SAMPLES - 1, 1))
            update(f.read(CHUNK))


def model_fingerprint(model_dir: Path, *, mode: Mode = "sampled") -> str:
    """A hex digest of ``model_dir`` that changes when the model changes (see the module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"fingerprint mode {mode!r} is not known; use one of: {', '.join(MODES)}")
    model_dir = Path(model_dir)
    if mode == "sampled":
        h = hashlib.sha256(f"mergeopt-fingerprint-v{_VERSION}\n".encode())
        config = model_dir / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        for path in weight_files(model_dir):
            _sampled(path, h.update)
        return h.hexdigest()[:32]
    h = hashlib.sha256(f"mergeopt-golden-fingerprint/{mode}".encode())
    for path in weight_files(model_dir):
        h.update(path.name.encode() + b"\0")
        if mode == "content":
            with path.open("rb") as f:
                while chunk := f.read(_READ):
                    h.update(chunk)
        else:
            stat = path.stat()
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
            h.update(_header(path)[0][: 8 + 100 * 2**20])
    for name in _SIDE_FILES:
        side = model_dir / name
        if side.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(side.read_bytes()).digest())
    return h.hexdigest()


def models_fingerprint(base: Path, specialists: Mapping[str, Path], *, mode: Mode = "sampled") -> dict[str, str]:
    """Role → digest: ``base`` and each specialist by its name in the config."""
    out = {"base": model_fingerprint(base, mode=mode)}
    out.update({name: model_fingerprint(path, mode=mode) for name, path in specialists.items()})
    return out


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

"""Weights written as hub checkpoints are: safetensors shards of bounded size and their index.

A merged 8B model is 16 GB in bf16; an export that first builds the whole state dict holds it
twice (the float32 merge and its cast), and a single 16 GB file is what hub tools refuse to
upload. The writer here takes tensors one at a time, in order, and keeps at most one shard in
memory: the layout (which tensor lands in which file) is decided up front from the shapes, so
the file names (``model-00001-of-00004.safetensors``) are known before the first tensor is
merged. A model that fits in one shard is a single ``model.safetensors``, as transformers saves it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from optimizer.errors import ConfigError

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "TensorStream", "parse_size", "shard_layout", "write_shards"]

#: transformers' and the hub's default shard size ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
INDEX = "model.safetensors.index.json"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain number (as transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class TensorStream:
    """Tensors to write, one at a time: every name's shape up front, the tensors in that order."""

    shapes: Mapping[str, tuple[int, ...]]
    tensors: Iterable[tuple[str, torch.Tensor]]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> TensorStream:
        """A state dict already in memory, as a stream."""
        return cls({k: tuple(v.shape) for k, v in state.items()}, state.items())


def shard_layout(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per file, in order, each file at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards if shards[0] else []


def _file_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_shards(
    folder: Path, stream: TensorStream, dtype: torch.dtype, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write ``stream`` into ``folder`` as ``dtype`` shards (+ index when several); the file names.

    Floating tensors are cast to ``dtype``; others (integer buffers) are written as they are.
    """
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: math.prod(shape) * itemsize for name, shape in stream.shapes.items()}
    layout = shard_layout(sizes, max_shard_bytes)
    files = _file_names(len(layout))
    where = {name: files[i] for i, names in enumerate(layout) for name in names}
    pending: dict[str, torch.Tensor] = {}
    index = 0
    tensors: Iterator[tuple[str, torch.Tensor]] = iter(stream.tensors)
    for name, tensor in tensors:
        if name not in where:
            raise ValueError(f"tensor {name!r} was not announced in the stream's shapes")
        out = tensor.to(dtype) if tensor.is_floating_point() else tensor
        pending[name] = out.detach().to("cpu").contiguous()
        while index < len(layout) and all(n in pending for n in layout[index]):
            save_file({n: pending.pop(n) for n in layout[index]}, str(folder / files[index]), metadata={"format": "pt"})
            index += 1
    if index != len(layout):
        missing = next(n for names in layout[index:] for n in names if n not in pending)
        raise ValueError(f"tensor {missing!r} was announced but never came")
    if len(files) > 1:
        weight_map = {name: where[name] for name in stream.shapes}
        body = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(body, indent=2) + "\n")
    return files

"""Engines own the weights: they merge a plan in place and score requests.

``make_engine`` is the one place that maps a config's ``engine`` name to a class, importing the
heavy backend only when it is chosen.
"""

from __future__ import annotations

from optimizer.engines.base import Engine, LogLikelihood, ModelSet, encode_pair

__all__ = ["Engine", "LogLikelihood", "ModelSet", "encode_pair", "make_engine"]


def make_engine(kind: str, models: ModelSet, *, device: str = "auto", dtype: str = "auto") -> Engine:
    """Start the engine called ``kind`` on ``models`` (slow: do it once per process)."""
    if kind == "hf":
        from optimizer.engines.hf_engine import HFEngine

        return HFEngine(models, device=device, dtype=dtype)
    if kind == "vllm":
        from optimizer.engines.vllm_engine import VLLMEngine

        return VLLMEngine(models, dtype=dtype)
    from optimizer.errors import ConfigError

    raise ConfigError(f"unknown engine {kind!r}; use 'vllm' or 'hf'")

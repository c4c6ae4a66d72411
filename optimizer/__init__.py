"""mergeopt: search merge coefficients of fine-tuned LLMs with Optuna, merging inside the engine."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

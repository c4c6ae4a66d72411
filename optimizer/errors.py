"""The one exception root of mergeopt.

Every mistake a user can make (a bad config, a missing model, data without the
columns a metric needs) raises a :class:`MergeoptError` whose message names the
thing, the value and the fix. The CLI prints that message as one line and exits
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "MergeoptError", "ModelError"]


class MergeoptError(Exception):
    """Base of every user-facing error: the message is what the user reads."""


class ConfigError(MergeoptError):
    """The study config (YAML or CLI flags) is invalid."""


class ModelError(MergeoptError):
    """A model directory is missing, unreadable, or incompatible with the base."""


class DataError(MergeoptError):
    """Task data is missing, empty, or lacks the fields its metric needs."""


#: Marks a mergeopt error inside a vLLM worker's message: vLLM passes a worker's exception on as
#: text, and the engine (``optimizer.engines.vllm_engine.worker_error``) rebuilds it from the tag.
WORKER_ERROR_TAG = "[mergeopt] "

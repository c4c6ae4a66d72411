"""The embedded model zoo: a tiny Llama base and one specialist per synthetic task, trained here.

mergeopt's demo and tests cannot download models, so they merge these: ``build_zoo`` trains and
caches the zoo (a few minutes on two CPU cores, once per seed), ``load_zoo`` reads one back, and
the returned ``zoo.json`` content names the models, the task data and the scores that show the
zoo is a real merge problem.
"""

from __future__ import annotations

from optimizer.zoo.build import build_zoo, default_zoo_dir, load_zoo
from optimizer.zoo.tasks import TASK_NAMES as TASKS

__all__ = ["TASKS", "build_zoo", "default_zoo_dir", "load_zoo"]

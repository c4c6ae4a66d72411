"""The names of what mergeopt stores in an Optuna study: a persisted format.

Studies outlive mergeopt versions (resumed, joined by workers, read by ``optuna-dashboard`` and by
users' own scripts), so these keys are a file format: never rename one; add new ones here, and
read and write them only through these names.
"""

from __future__ import annotations

__all__ = [
    "BASELINE",
    "CONFIG",
    "CONTRIBUTIONS",
    "FAIL_KIND",
    "FAIL_REASON",
    "HELD_OUT",
    "HELD_OUT_PLANS",
    "HI_MERGING",
    "HI_MERGING_CHOICE",
    "LAYER_OVERRIDES",
    "MODELS_FINGERPRINT",
    "OWNER",
    "PLAN",
    "REJECTED",
    "SECONDS",
    "WARM_START",
]

# -- study user attrs ----------------------------------------------------------------------------

#: The StudyConfig as JSON; stored last by the creator, so "has a config" means "is set up".
CONFIG = "config"
#: Role ("base", specialist name) → fingerprint of its files when the study started.
MODELS_FINGERPRINT = "models_fingerprint"
#: Trial number (as a string) → task → held-out score: the cache ``pareto`` and ``report`` read.
HELD_OUT = "held_out"
#: Baseline label → task → held-out score, for references that have no trial (baselines off).
HELD_OUT_PLANS = "held_out_plans"
#: Layers (``L03``, ``embed``, ``head``) a contribution analysis gave coefficients of their own.
LAYER_OVERRIDES = "layer_overrides"
#: The last contribution analysis (``ContributionAnalysis.to_dict()`` plus the analysed ``trial``).
CONTRIBUTIONS = "contributions"
#: On the study: Hi-Merging's result ({score, plan, analyses}); on a trial: "stage: label" of a plan it scored.
HI_MERGING = "hi_merging"

# -- trial user attrs ----------------------------------------------------------------------------

#: The MergePlan the trial scored (``MergePlan.to_dict()``): what ``export`` rebuilds.
PLAN = "plan"
#: Label of a baseline trial ("base", "specialist:rev", "ties_defaults", ...).
BASELINE = "baseline"
#: Label of a warm start a contribution analysis enqueued ("contrib:drop", ...).
WARM_START = "warm_start"
#: True on the one plan Hi-Merging chose.
HI_MERGING_CHOICE = "hi_merging_choice"
#: Which process runs the trial ({host, boot, pid, pid_start, started, beat}).
OWNER = "owner"
#: Whose fault a failure was: candidate | memory | engine | interrupted | worker.
FAIL_KIND = "fail_kind"
#: One line saying why the trial failed.
FAIL_REASON = "fail_reason"
#: Why early rejection stopped the candidate ({dominated_by, examples, of, partial, bounds}).
REJECTED = "rejected"
#: Seconds the trial spent merging and scoring ({merge, score}).
SECONDS = "seconds"

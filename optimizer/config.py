"""The study config: one YAML file, validated once, before anything is written.

Paths in the file are relative to the file itself; ``zoo:`` paths point into the embedded model
zoo (``zoo:base``, ``zoo:specialists/rev``, ``zoo:tasks/rev``) and ``real-zoo:`` paths into the
real-model zoo, so the shipped configs run anywhere.
Every validation failure becomes one :class:`ConfigError` line that names the field, the value
and the fix; pydantic's multi-line reports never reach the user.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimizer.errors import ConfigError

__all__ = [
    "Bounds",
    "CalibrationConfig",
    "EarlyRejectionConfig",
    "ObjectiveConfig",
    "SearchConfig",
    "StudyConfig",
    "VllmConfig",
    "config_from_dict",
    "load_config",
    "resolve_path",
    "stated_specialist",
]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
#: Normalizers exact match applies, in the listed order (objectives/formats.py).
Normalizer = Literal["strip", "lower", "punctuation", "whitespace"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bounds(_Strict):
    """Search range of one coefficient kind."""

    low: float
    high: float
    log: bool = False  # sample on a log scale (for scale-like options such as a temperature)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}; swap them")
        return self


class LmEvalConfig(_Strict):
    """An lm-evaluation-harness task (or group) as an objective, scored by the harness's own pipeline.

    ``task`` is found among the YAMLs under ``include_path`` (relative to this config file), else
    among the harness's built-in tasks; the task's own YAML reads its data files as the harness
    does (relative to the working directory). ``metric`` and ``filter`` pick the number the study
    optimises (default: the task's first metric, its first filter); its direction is the task's.
    ``split``: ``seeded`` shuffles the task's evaluation docs with the study's seed, the objective's
    ``limit`` first ones for the search and the next ``held_out_limit`` held out (default: half
    each); ``task`` searches on the task's validation split and holds out its test split.
    """

    task: str
    include_path: str | None = None
    metric: str | None = None
    filter: str | None = None
    split: Literal["seeded", "task"] = "seeded"
    num_fewshot: int | None = Field(default=None, ge=0)  # overrides the task's own (as lm_eval --num_fewshot)
    chat: bool = False  # lm_eval --apply_chat_template
    system: str | None = None  # lm_eval --system_instruction
    fewshot_as_multiturn: bool = False


#: What an lm-eval objective may set besides ``lm_eval``; every other option belongs to data-file
#: objectives (the task's YAML says how its prompts are built and its answers judged).
_LM_EVAL_OPTIONS = frozenset({"name", "lm_eval", "limit", "held_out_limit", "specialist"})


class ObjectiveConfig(_Strict):
    """One task: its data, its metric, and how to read its examples (or an lm-eval task: ``lm_eval``)."""

    name: str
    data: str | None = None
    metric: Literal["exact_match", "mc_loglik", "nll"] | None = None
    lm_eval: LmEvalConfig | None = None
    search_split: str = "search"
    held_out_split: str = "held_out"
    # Training-like rows, disjoint from the search split, that methods measuring inputs read
    # (RegMean's Grams); only read by such methods.
    calibration_split: str = "train"
    prompt_field: str = "prompt"
    target_field: str = "target"
    choices_field: str = "choices"
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    max_tokens: int = Field(default=32, gt=0)
    limit: int | None = Field(default=None, gt=0, description="use at most this many search examples")
    held_out_limit: int | None = Field(default=None, gt=0)
    # The model whose skill this task measures (normalized gain's reference); default: the model
    # with the task's name, else the specialist that scores best on it.
    specialist: str | None = None
    # How rows become prompts and answers are judged (objectives/formats.py).
    chat: bool = False  # wrap each prompt in the base tokenizer's chat template
    system: str | None = None  # the chat's system message
    prompt_template: str | None = None  # Jinja over a row's fields, instead of prompt_field
    target_template: str | None = None  # Jinja over a row's fields, instead of target_field
    fewshot: int = Field(default=0, ge=0)  # solved search examples before each question
    extract: str | None = None  # regex finding the answer in the output (first group, else the match)
    normalize: list[Normalizer] = Field(default_factory=lambda: list[Normalizer](["strip"]))
    add_bos: bool | None = None  # force the beginning-of-sequence token on or off (default: the tokenizer's rule)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid objective name; use letters, digits, '_' or '-'")
        return v

    @field_validator("extract")
    @classmethod
    def _extract(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"{v!r} is not a valid regex ({exc}); fix the pattern") from None
        return v

    @model_validator(mode="after")
    def _format(self) -> ObjectiveConfig:
        if self.lm_eval is not None:
            # Options left at their defaults are fine (a stored config carries every field).
            given = [
                k
                for k, f in type(self).model_fields.items()
                if k not in _LM_EVAL_OPTIONS and getattr(self, k) != f.get_default(call_default_factory=True)
            ]
            if given:
                raise ValueError(
                    f"'{given[0]}' is an option of data-file objectives; an lm_eval objective takes its"
                    " prompts, metric and answer filters from the task (set lm_eval.metric / lm_eval.filter,"
                    " lm_eval.chat, lm_eval.num_fewshot) — remove it"
                )
            return self
        if self.data is None or self.metric is None:
            raise ValueError("an objective needs 'data' and 'metric' (a data folder or file), or an 'lm_eval' task")
        if self.system is not None and not self.chat:
            raise ValueError("system is a chat message; set chat: true, or put the text in the prompt_template")
        if self.extract is not None and self.metric != "exact_match":
            raise ValueError(f"extract judges generated answers; metric {self.metric!r} generates none")
        return self


class HiMergingConfig(_Strict):
    """The unattended Hi-Merging run that precedes the search when ``method: hi_merging``.

    The defaults are the authors' scripts (``docs/methods.md``): one (density, scale) pair shared by
    every model on the 10 × 10 grid 0.1 … 1.0, probes that weigh a layer at 1.0 alone and at 0.5
    merged with normalize on, decoder layers only. ``model_wise: per_model``, ``probes: scaled`` and
    ``embed_head: true`` are mergeopt's variants.
    """

    rounds: int = Field(default=3, ge=0)
    grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)])
    model_wise: Literal["shared", "per_model"] = "shared"
    probes: Literal["authors", "scaled"] = "authors"
    embed_head: bool = False  # probe the embedding and the head as layers of their own
    margin: float = Field(default=0.0, ge=0.0)
    cross: bool = False


class CalibrationConfig(_Strict):
    """Text the models are measured on by methods that need their inputs (RegMean's Grams).

    Never the search split: a merge fitted to the examples the search then scores would look
    better there than it is. By default each model's own tasks' ``calibration_split`` (``train``).
    """

    # Examples per model; RegMean's authors read up to 1000 batches of 16 (gram_n_example: 1000).
    examples: int = Field(default=16000, gt=0)
    # Model → a data file (all its rows) or data folder (its calibration split), instead of the
    # model's own tasks'. A row's ``text`` field is used as it is; other rows are rendered as the
    # model's own task renders its examples (prompt and answer).
    data: dict[str, str] = Field(default_factory=dict)


class EarlyRejectionConfig(_Strict):
    """Score a candidate on growing shares of the search examples and stop it once it is
    clearly dominated (see :mod:`optimizer.search.early_rejection`)."""

    # Shares of each task's search examples after which the candidate is checked (the full set
    # always comes last); each must be in (0, 1), increasing.
    stages: list[float] = Field(default_factory=lambda: [0.25, 0.5])
    # Width of the optimistic bound, in standard errors: 2 ≈ a 2.3 % chance per check and task
    # of rejecting a candidate whose full score would not have been dominated.
    z: float = Field(default=2.0, gt=0.0)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < x < 1.0 for x in v) or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"early_rejection.stages {v} must be increasing shares strictly between 0 and 1")
        return v


class VllmConfig(_Strict):
    """What ``engine: vllm`` passes to vLLM (``vllm:`` in the study config); unset: vLLM's defaults."""

    # Share of each GPU's memory vLLM may take for weights and KV cache.
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    # Skip torch.compile and graph capture: on the real zoo's CPU runs the engine starts in 80 s
    # instead of 121 s and scores 4 % slower (benchmarks/README.md) — for short studies and tests.
    enforce_eager: bool = False
    # KV cache of vLLM's CPU build, in GiB (its VLLM_CPU_KVCACHE_SPACE; mergeopt's default 1).
    cpu_kv_cache_gib: float | None = Field(default=None, gt=0.0)


class SearchConfig(_Strict):
    """How the study searches: budget, sampler, baselines."""

    trials: int = Field(default=40, gt=0)
    sampler: Literal["tpe", "random", "nsga2", "gp"] = "tpe"
    seed: int = 0
    baselines: bool = True
    max_consecutive_failures: int = Field(default=5, gt=0)
    hi_merging: HiMergingConfig = HiMergingConfig()
    # Off unless set: `early_rejection: {}` turns it on with the defaults.
    early_rejection: EarlyRejectionConfig | None = None


class StudyConfig(_Strict):
    """Everything a study needs; stored in the study so workers and exports need nothing else."""

    name: str
    base: str
    models: dict[str, str]
    method: str = "ties"
    granularity: Literal["model", "layer", "group"] = "model"
    group_size: int = Field(default=2, gt=0)
    split_modules: bool = False
    # Mixture-of-experts models: the experts of a layer share the MLP's coefficients ("joint"), or
    # each expert gets its own ("each"; layer or group granularity).
    experts: Literal["joint", "each"] = "joint"
    weight: Bounds = Bounds(low=0.0, high=1.0)
    density: Bounds = Bounds(low=0.1, high=1.0)
    options: dict[str, float | int | bool] = Field(default_factory=dict)
    # Method options the search tunes too (RegMean's alpha, WIDEN's t and s...), by range.
    search_options: dict[str, Bounds] = Field(default_factory=dict)
    objectives: list[ObjectiveConfig]
    search: SearchConfig = SearchConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    storage: str | None = None
    engine: Literal["vllm", "hf"] = "vllm"
    vllm: VllmConfig = VllmConfig()
    device: str = "auto"  # hf engine only; vLLM picks its own platform
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, bf16 on GPU
    # Directory the relative paths above are resolved against (the config file's folder).
    root: str = "."

    @field_validator("name")
    @classmethod
    def _study_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid study name; use letters, digits, '_' or '-'")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("no specialist models given; list at least one under 'models'")
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"model name {name!r} is not valid; use letters, digits, '_' or '-'")
        return v

    @field_validator("density")
    @classmethod
    def _density(cls, v: Bounds) -> Bounds:
        if not (0.0 < v.low <= 1.0 and 0.0 < v.high <= 1.0):
            raise ValueError(f"density range [{v.low}, {v.high}] must lie in (0, 1]")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[ObjectiveConfig]) -> list[ObjectiveConfig]:
        if not v:
            raise ValueError("no objectives given; add at least one task under 'objectives'")
        seen: set[str] = set()
        for obj in v:
            if obj.name in seen:
                raise ValueError(f"objective name {obj.name!r} appears twice; objective names must be unique")
            seen.add(obj.name)
        return v

    @model_validator(mode="after")
    def _searchable_options(self) -> StudyConfig:
        from optimizer.merge import get_method

        try:
            method = get_method(self.method)
        except Exception:  # an unknown method is reported where the method is checked
            return self
        for name, bounds in self.search_options.items():
            if bounds.log and bounds.low <= 0:
                raise ValueError(f"search_options: {name!r} is searched on a log scale, so low must be > 0")
            default = method.options.get(name)
            if default is None or isinstance(default, bool):
                numeric = [k for k, v in method.options.items() if not isinstance(v, bool)]
                raise ValueError(
                    f"search_options: {name!r} is not a numeric option of {self.method!r};"
                    f" searchable: {', '.join(numeric) or 'none'}"
                )
        return self

    @model_validator(mode="after")
    def _calibrated_models_exist(self) -> StudyConfig:
        unknown = [m for m in self.calibration.data if m not in self.models]
        if unknown:
            raise ValueError(
                f"calibration.data names model {unknown[0]!r}, which is not among the models"
                f" ({', '.join(self.models)}); use one of those names"
            )
        return self

    @model_validator(mode="after")
    def _specialists_exist(self) -> StudyConfig:
        for obj in self.objectives:
            if obj.specialist is not None and obj.specialist not in self.models:
                raise ValueError(
                    f"objective {obj.name!r} names specialist {obj.specialist!r}, which is not among the models"
                    f" ({', '.join(self.models)}); use one of those names"
                )
        return self

    # -- derived -------------------------------------------------------------------------------
    def stated_specialist(self, task: str) -> str | None:
        """The model this config says ``task`` measures (see :func:`stated_specialist`)."""
        for obj in self.objectives:
            if obj.name == task:
                return stated_specialist(obj, tuple(self.models))
        return None

    def stated_tasks(self, model: str) -> list[str]:
        """The tasks whose stated specialist is ``model``, in objective order (the inverse rule)."""
        return [o.name for o in self.objectives if self.stated_specialist(o.name) == model]

    def path(self, value: str) -> Path:
        """Resolve a path from this config (relative to its file, or into the zoo)."""
        return resolve_path(value, Path(self.root))

    def model_path(self, name: str) -> Path:
        """Where specialist ``name`` lives: a model or adapter folder. ``BASE+ADAPTER`` (mergekit's
        spelling) names an adapter on the study's base, and resolves to the adapter."""
        value = self.models[name]
        if "+" in value and not self.path(value).exists():
            base, adapter = value.rsplit("+", 1)
            if self.path(base) != self.path(self.base):
                raise ConfigError(
                    f"model {name!r}: {value!r} applies an adapter to {base!r}, not to the study's base"
                    f" {self.base!r}; mergeopt merges adapters of the study's base only: merge it into"
                    " its model first (peft's merge_and_unload) and give that model"
                )
            return self.path(adapter)
        return self.path(value)

    def study_dir(self) -> Path:
        """Where the study's files live: beside its SQLite file, else ``studies/<name>/``."""
        url = self.storage_url()
        if url.startswith("sqlite:///"):
            return Path(url[len("sqlite:///") :]).parent
        return Path("studies") / self.name

    def storage_url(self) -> str:
        """The Optuna storage URL; SQLite under ``studies/<name>/`` unless the config names one."""
        if self.storage:
            return self.storage
        db = Path("studies") / self.name / "study.db"
        return f"sqlite:///{db.resolve()}"

    def to_json(self) -> str:
        return self.model_dump_json()


def stated_specialist(objective: ObjectiveConfig, models: Sequence[str]) -> str | None:
    """The model an objective measures, where the config settles it; None where it leaves it open.

    Its ``specialist:`` field, else the model named like the objective, else the only model. This
    is the one rule for "which model is a task's specialist": where it leaves the question open,
    normalized gain and Hi-Merging take the specialist that scores best on the task, and golden
    data (which must know before any engine runs) asks for a ``specialist:``.
    """
    if objective.specialist is not None:
        return objective.specialist
    if objective.name in models:
        return objective.name
    return models[0] if len(models) == 1 else None


def resolve_path(value: str, root: Path) -> Path:
    """``zoo:rel`` → inside the tiny zoo, ``real-zoo:rel`` → inside the real-model zoo; relative
    paths → against ``root``."""
    if value.startswith("zoo:"):
        from optimizer.zoo.build import default_zoo_dir

        return (default_zoo_dir() / value[4:]).resolve()
    if value.startswith("real-zoo:"):
        from optimizer.zoo.real import default_real_zoo_dir

        return (default_real_zoo_dir() / value[len("real-zoo:") :]).resolve()
    p = Path(value).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def _format_validation(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; check its spelling against configs/demo.yaml"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "literal_error":
        msg = f"{err.get('input')!r} is not allowed: {msg}"
    return f"{source}: {where}: {msg}"


def config_from_dict(data: object, source: str = "config", root: Path | None = None) -> StudyConfig:
    """Validate a parsed config; errors become one ConfigError line."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    if root is not None:
        data = {**data, "root": str(root)}
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    from optimizer.merge import get_method

    get_method(config.method)  # unknown method → ConfigError listing the valid ones
    return config


def load_config(path: Path) -> StudyConfig:
    """Read and validate a YAML (or JSON) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return config_from_dict(data, source=str(path), root=path.resolve().parent)


def config_from_json(text: str) -> StudyConfig:
    """Rebuild a config stored in a study's user attrs."""
    return StudyConfig.model_validate(json.loads(text))

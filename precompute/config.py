"""Typed precompute configuration: one frozen dataclass per component, YAML plus overrides.

`load_config("configs/demo/precompute.yaml", ["k=32", "sampling.n=4"])` reads the YAML,
applies `key=value` overrides (dotted keys reach into sections, values are parsed as YAML
scalars and checked against the field's type) and refuses unknown keys, so a
typo fails before the teacher is loaded. The `engine` section is the exception: it is passed
to `vllm.LLM(**engine)` as is, and checked against `vllm.EngineArgs`' fields instead, so every
vLLM engine argument (tensor_parallel_size, dtype, gpu_memory_utilization, ...) is available
without being re-declared here.

Every field carries its help text (`metadata["help"]`), which `python -m precompute --help`
lists, so the options are documented in one place.

The defaults are neutral, for any teacher: no model or data is named (the CPU demo's settings
live in configs/demo/precompute.yaml), the engine section is empty (device-dependent engine
settings are resolved where the engine starts; the context is the model's), and the response
length is the model's own (precompute/model_limits.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from envs.config import EnvConfig
from runtime.typed_config import apply_overrides, build
from vllm_engine.engine_args import EngineArgsError
from vllm_engine.engine_args import check_engine_args as vllm_check_engine_args

# Engine arguments that precompute owns: the shards' meaning depends on them.
ENGINE_RESERVED = ("model", "logprobs_mode")


class ConfigError(ValueError):
    """A config that cannot work (a bad value, a missing model folder, k above the
    vocabulary): `python -m precompute` prints it as one line."""


def _f(default, help: str, **kw):
    """A dataclass field with help text (mutable defaults go through default_factory)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class DataConfig:
    path: str = _f(
        "",
        "input (required): .jsonl/.json/.parquet/.csv/.arrow file, or a folder saved by datasets",
    )
    split: str = _f("train", "split to read from a DatasetDict folder")
    format: Literal["auto", "question_answer", "messages", "prompt_completion"] = _f(
        "auto",
        "rows' format: auto (from the columns: question, messages, prompt; "
        "docs/precompute.md) | question_answer | messages | prompt_completion (TRL's)",
    )
    question_field: str = _f("question", "field with the question text")
    messages_field: str = _f(
        "", "field with a chat `messages` list instead of a question (takes precedence)"
    )
    experience_field: str = _f("experience", "field with the teacher-only experience/hint")
    answer_field: str = _f("answer", "field with the reference answer (optional)")
    id_field: str = _f("id", "field with the example id; missing: a hash of the content")
    response_field: str = _f(
        "", "score mode: field with the response to score (empty: the answer field)"
    )
    limit: int = _f(0, "use only the first N valid examples (0: all)")
    teacher_path: str = _f(
        "",
        "the teacher's copy of the same rows, joined by id (two files: `path` the student's "
        "without experience, this one with it anywhere in its system/user turns; the "
        "assistant turns must be equal); empty: one file, the teacher view adds `experience`",
    )
    meta_field: str = _f(
        "",
        "field with a JSON object kept in each row's meta (e.g. an episode's record: "
        "tools/onpolicy/episodes.py); empty: none",
    )
    sample_index_field: str = _f(
        "",
        "score mode: field with the row's sample_index (an integer >= 0, e.g. an episode's "
        "sample); empty: 0",
    )
    train_turns: Literal["all", "last", "marked"] = _f(
        "all",
        "score mode, `messages` rows: the assistant turns trained (each a span of the row, "
        "scored in one teacher pass): all | last | marked (those whose message has "
        "`train: true`; a missing flag counts as true)",
    )


@dataclass(frozen=True)
class ViewConfig:
    experience_position: Literal["system", "prefix", "suffix"] = _f(
        "system", "where the experience goes in the teacher view: system | prefix | suffix"
    )
    experience_template: str = _f(
        "{experience}", "format of the experience text ({experience} is replaced)"
    )
    separator: str = _f("\n\n", "between experience and question (prefix/suffix)")
    default_experience: str = _f(
        "", "experience for examples whose experience field is missing or empty"
    )
    chat_template_kwargs: dict = _f(
        {}, "extra chat template arguments, passed to both views (e.g. {reasoning: high})"
    )
    thinking: Literal["none", "true", "false", "mixed"] = _f(
        "none",
        "enable_thinking for both views: none (not passed) | true | false | mixed (drawn per "
        "example with thinking_prob, recorded in the row)",
    )
    thinking_prob: float = _f(0.5, "mixed mode: probability of thinking on")


@dataclass(frozen=True)
class SamplingConfig:
    n: int = _f(1, "generate: responses per example")
    temperature: float = _f(1.0, "generate: sampling temperature (0: greedy)")
    top_p: float = _f(1.0, "generate: nucleus sampling")
    top_k: int = _f(0, "generate: top-k sampling (0: off); unrelated to the stored k")
    max_tokens: int = _f(
        0,
        "generate: response length limit; 0: the model's (generation_config.json "
        "max_new_tokens, else max_length, else up to the end of the context window)",
    )
    seed: int = _f(0, "per-example seeds derive from (seed, example index)")
    per_request_seed: Literal["auto", "true", "false"] = _f(
        "auto",
        "vllm: seed each request (samples independent of batching and resume): true | false "
        "| auto (= false on vLLM's CPU backend, whose seeded sampling crashes once a prompt "
        "is prefilled in chunks: 'CPU Generator does not use offset'; the engine is then "
        "seeded once with `seed`)",
    )


@dataclass(frozen=True)
class ScoreConfig:
    append_eos: bool = _f(
        True, "score: end each response with the EOS token, so the student learns to stop"
    )
    response_ids_field: str = _f(
        "",
        "score: field holding the response as token ids, scored exactly as given (e.g. a "
        "student's samples: no re-tokenization of their text); empty: tokenize the text",
    )


@dataclass(frozen=True)
class RolloutConfig:
    keep: Literal["all", "success"] = _f(
        "all",
        "rollout: the episodes committed as rows: all | success (the usual agent-SFT choice); "
        "the others are listed in the folder's episodes files, not written as rows",
    )
    n: int = _f(1, "rollout: episodes per seed (samples 0..n-1, each its own sampling seeds)")
    batch_size: int = _f(16, "rollout: episodes played at once (one engine call per step)")
    max_tokens: int = _f(32, "rollout: the length limit of one reply (an action)")
    experience: str = _f(
        "",
        "rollout: experience file (JSON {text, source}, built from the train fold: "
        "envs.experience) put in the teacher's view; empty: none",
    )


@dataclass(frozen=True)
class HFConfig:
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "transformers backend: float32 | bfloat16 | float16"
    )
    device: str = _f("cpu", "transformers backend: torch device")
    batch_size: int = _f(8, "transformers backend: prompts per forward/generate call")


@dataclass(frozen=True)
class PrecomputeConfig:
    teacher: str = _f("", "teacher model folder (required)")
    student: str = _f(
        "",
        "student model/tokenizer folder: a tokenizer other than the teacher's gets "
        "teacher-vocabulary shards, which training aligns (empty: ordinary shards)",
    )
    out: str = _f("out/shards", "shard folder (shared by all workers)")
    mode: Literal["generate", "score", "rollout"] = _f(
        "generate",
        "generate | score | rollout (the teacher plays the `env` episodes: docs/agents.md)",
    )
    generator_view: Literal["teacher", "student"] = _f(
        "teacher",
        "generate: the view the model generates from: teacher (Q+E) | student (Q, e.g. a "
        "student checkpoint as `teacher=` sampling its own responses for on-policy rounds)",
    )
    source: Literal["auto", "teacher", "dataset", "student"] = _f(
        "auto",
        "rows' source column: auto (teacher when generating, dataset when scoring) | teacher "
        "| dataset | student (responses sampled from the student, e.g. on-policy rounds)",
    )
    tags: dict = _f(
        {}, "free-form values recorded in the shards' metadata (extra.tags), e.g. the round"
    )
    backend: Literal["vllm", "hf"] = _f(
        "vllm", "vllm | hf (transformers; slow, for machines without vLLM)"
    )
    k: int = _f(64, "top-k logprobs stored per response token")
    commit_every: int = _f(32, "examples per committed file: a crash never loses committed rows")
    engine_window: int = _f(
        0,
        "examples per engine call, committed every commit_every once the call returns (a "
        "crash loses at most one window of teacher work); 0: auto (4096 with vLLM, which "
        "batches best with many prompts at once; commit_every with hf)",
    )
    skip_invalid: bool = _f(
        False, "write invalid input rows to rejects-w<I>-<n>.jsonl instead of stopping"
    )
    num_workers: int = _f(
        0,
        "workers the data is split across, all writing into `out`; 0: auto (one per GPU group "
        "of tensor x pipeline parallel size, on this machine or the Ray cluster; on a CPU: 2 vLLM "
        "workers, at most one per core)",
    )
    worker_index: int = _f(
        -1,
        "-1: this launch runs every worker; I: run only worker I of num_workers (default from "
        "SLURM_ARRAY_TASK_ID)",
    )
    ray: bool = _f(
        False, "run the workers as Ray tasks on the cluster at RAY_ADDRESS (else a local one)"
    )
    max_retries: int = _f(
        3, "a worker process that dies is restarted this many times; it resumes from the manifest"
    )
    progress: bool = _f(True, "show a progress bar")
    data: DataConfig = field(default_factory=DataConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    hf: HFConfig = field(default_factory=HFConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: dict = _f(
        {},
        "vllm.LLM engine arguments, checked against vllm.EngineArgs "
        "(e.g. engine.tensor_parallel_size=2 engine.gpu_memory_utilization=0.9)",
    )


# Fields that say how this process runs, not what the shards contain: they stay out of
# ShardMetadata.extra, so that workers and resumed runs agree on the folder's metadata.
RUN_FIELDS = (
    "out",
    "skip_invalid",
    "num_workers",
    "worker_index",
    "ray",
    "max_retries",
    "progress",
    "commit_every",
    "engine_window",
)


def check_engine_args(engine: dict, names: set[str] | None = None) -> None:
    """The engine section: no argument precompute owns, none that vLLM lacks
    (vllm_engine.engine_args checks the names against the installed vLLM)."""
    reserved = sorted(set(engine) & set(ENGINE_RESERVED))
    if reserved:
        raise ConfigError(
            f"engine.{reserved[0]} is set by precompute (teacher= selects the model; "
            "logprobs are always raw_logprobs)"
        )
    try:
        vllm_check_engine_args(engine, names)
    except EngineArgsError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: PrecomputeConfig) -> PrecomputeConfig:
    checks = [
        (cfg.k >= 1, "k must be >= 1"),
        (cfg.commit_every >= 1, "commit_every must be >= 1"),
        (cfg.engine_window >= 0, "engine_window must be >= 0 (0: auto)"),
        (cfg.num_workers >= 0, "num_workers must be >= 0 (0: auto)"),
        (
            cfg.worker_index == -1 or 0 <= cfg.worker_index < cfg.num_workers,
            f"worker_index must be -1 (all) or in [0, num_workers={cfg.num_workers}), got "
            f"{cfg.worker_index}",
        ),
        (
            not (cfg.ray and cfg.worker_index >= 0),
            "ray runs every worker of the split: do not set worker_index with ray",
        ),
        (cfg.max_retries >= 0, "max_retries must be >= 0"),
        (
            "{experience}" in cfg.view.experience_template,
            "view.experience_template needs {experience}",
        ),
        (0.0 <= cfg.view.thinking_prob <= 1.0, "view.thinking_prob must be in [0, 1]"),
        (
            "enable_thinking" not in cfg.view.chat_template_kwargs,
            "use view.thinking, not view.chat_template_kwargs.enable_thinking",
        ),
        (cfg.sampling.n >= 1, "sampling.n must be >= 1"),
        (cfg.sampling.temperature >= 0, "sampling.temperature must be >= 0"),
        (0 < cfg.sampling.top_p <= 1, "sampling.top_p must be in (0, 1]"),
        (cfg.sampling.top_k >= 0, "sampling.top_k must be >= 0"),
        (cfg.sampling.max_tokens >= 0, "sampling.max_tokens must be >= 0 (0: the model's)"),
        (cfg.data.limit >= 0, "data.limit must be >= 0"),
        (cfg.hf.batch_size >= 1, "hf.batch_size must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.mode == "score" and cfg.sampling.n != 1:
        raise ConfigError("score mode scores one given response per example: sampling.n=1")
    if cfg.mode == "rollout":
        validate_rollout(cfg)
    if cfg.backend == "vllm":
        check_engine_args(cfg.engine)
    return cfg


def validate_rollout(cfg: PrecomputeConfig) -> None:
    r = cfg.rollout
    checks = [
        (r.n >= 1, "rollout.n must be >= 1"),
        (r.batch_size >= 1, "rollout.batch_size must be >= 1"),
        (r.max_tokens >= 1, "rollout.max_tokens must be >= 1"),
        (cfg.sampling.n == 1, "rollout: episodes per seed are rollout.n, not sampling.n"),
        (
            cfg.num_workers <= 1 and cfg.worker_index <= 0 and not cfg.ray,
            "rollout runs as one worker: num_workers=1 (or 0), no worker_index, no ray",
        ),
        (
            cfg.view.thinking != "mixed",
            "rollout: view.thinking=mixed is not supported (one episode, one template mode)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def load_config(
    path: str | Path | None, overrides: list[str] = (), *, check: bool = True
) -> PrecomputeConfig:
    """The config of YAML `path` with `overrides`; check=False skips validate (and its
    vLLM import: --help lists the values without loading vLLM)."""
    data = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        data = apply_overrides(data, list(overrides))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data["engine"] = dict(data.get("engine") or {})
    try:
        cfg = build(PrecomputeConfig, data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return validate(cfg) if check else cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def content_dict(cfg: PrecomputeConfig) -> dict:
    """The config without the per-process run fields: what ShardMetadata.extra records."""
    d = to_dict(cfg)
    for name in RUN_FIELDS:
        d.pop(name)
    # The rollout sections say nothing about the other modes' shards: left out, their
    # folders made before rollouts existed keep resuming (rollout.py records its own).
    d.pop("env"), d.pop("rollout")
    d["data"].pop("limit")
    for name in ("meta_field", "sample_index_field"):
        if not d["data"][name]:
            d["data"].pop(name)  # left out when unused: older folders keep resuming
    if d["data"]["format"] == "auto":
        # What auto finds follows from the data (fingerprinted) and the fields (recorded);
        # left out, folders made before data.format existed keep resuming.
        d["data"].pop("format")
    return d


def help_lines(
    cls=PrecomputeConfig, prefix: str = "", effective=None, source: str = ""
) -> list[str]:
    """`key=value` and its help for every field, sections flattened with dots.

    value is the one in effect: `effective`'s (the config file `source` loaded) where given,
    marked with the file and the built-in default where the file changes it; else the
    built-in default."""
    out = []
    inst = cls()
    for f in dataclasses.fields(cls):
        default = getattr(inst, f.name)
        value = default if effective is None else getattr(effective, f.name)
        if dataclasses.is_dataclass(default):
            out.extend(help_lines(type(default), f"{prefix}{f.name}.", value, source))
            continue
        where = f"  [{source}; built-in {default!r}]" if value != default else ""
        out.append(f"  {prefix}{f.name}={value!r}{where}\n      {f.metadata.get('help', '')}")
    return out

"""Typed training configuration: one frozen dataclass per component, YAML per method.

`load_config("configs/train/skd.yaml", ["loss.beta=0.5", "max_steps=100"])` reads the YAML,
applies `key=value` overrides (dotted keys reach into sections; values are parsed as YAML
scalars and checked against the field's type; a `Literal` field takes one of its values) and
refuses unknown keys, so a typo fails before a run starts instead of being silently ignored.
Each dataclass checks its own ranges in `__post_init__`; `TrainConfig` adds the checks that
span sections.

The `loss:` section is `train.losses.KDSpec` itself (plus `chunk_tokens`): the YAML keys are
the spec's field names, so a loss knob has one name from the YAML to the loss code. The
recipes of configs/train/ are values: seqkd is `alpha: 0`, skd `divergence: forward_kl` with
`alpha < 1`, jsd `divergence: jsd`, dualkl `divergence: dual_kl`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from runtime.typed_config import apply_overrides, build, help_lines, option
from train.logger import tracker_names
from train.losses import KDSpec

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Keys of older configs, and what replaced them (named in the unknown-key error).
RENAMED = {
    "loss.method": "loss.divergence: forward_kl | reverse_kl | jsd | dual_kl "
    "(seqkd: loss.alpha=0; skd: forward_kl with loss.alpha < 1; dualkl: dual_kl)",
    "loss.direction": "loss.divergence: forward_kl | reverse_kl",
    "loss.reverse": "loss.reverse_kl_estimator",
    "loss.forward": "loss.forward_kl_support",
}


class ConfigError(ValueError):
    """A config that cannot work (a bad value, a run folder with other settings, shards that
    do not fit the student): `python -m train` prints it as one line and exits with 2."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = option("models/smollm2-student", "the student: a model folder or hub name")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "weights and autocast; auto: bf16 autocast on a capable GPU, else float32"
    )
    lora: bool = option(False, "train a LoRA adapter instead of every weight")
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: int = option(32, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_target_modules: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "module names that get a LoRA adapter",
    )
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward: less memory, same numbers"
    )
    quantize: Literal["none", "4bit", "8bit"] = option(
        "none",
        "QLoRA: LoRA adapters on a frozen bitsandbytes base, nf4 4-bit (CPU or GPU) or 8-bit (GPU)",
    )


@dataclass(frozen=True)
class ShardSource:
    """One shard folder of the training data and its share of the trained tokens."""

    path: str = field(metadata={"help": "a shard folder (local or an fsspec URL)"})
    weight: float = option(1.0, "share of the trained tokens, relative to the other folders")


@dataclass(frozen=True)
class DataConfig:
    # One folder, or a weighted mixture (train/mixture.py). YAML: `shards: out/shards`, or
    # `shards: [{path: a, weight: 0.7}, {path: b, weight: 0.3}]`; key=value:
    # `data.shards=a:0.7,b:0.3` (a folder without `:weight` weighs 1).
    shards: tuple[ShardSource, ...] = option(
        (ShardSource("out/shards"),),
        "training shards: one folder, or a weighted mixture, key=value a:0.7,b:0.3",
    )
    eval_shards: str = option("", "a held-out shard folder for periodic evaluation loss")
    batch_tokens: int = option(4096, "padded tokens per micro-batch (length-aware batching)")
    max_rows: int = option(64, "rows per micro-batch at most")
    max_length: int = option(
        1024, "tokens of a row's conversation (prompt + response) at most (data.overlong)"
    )
    # Default skip, not error: one long row should not stop a run hours in, and skipping
    # keeps every trained row whole; the first skip prints a line and the counts go to the
    # logs, so nothing is dropped silently. truncate is the old behaviour, now asked for.
    # drop_turns (train/spans.py) removes token ranges of the stored conversation: exact
    # for ChatML-style templates, where each message renders the same whatever precedes it;
    # a template that renders a message differently once earlier turns are gone (Qwen3's
    # <think> handling, a system message repeated per turn) trains on a rendering it would
    # not produce.
    overlong: Literal["skip", "truncate", "drop_turns", "error"] = option(
        "skip",
        "a row longer than max_length: skip it; truncate it (prompt kept from its end, "
        "conversation cut on the right, span tokens past the cut not trained); drop_turns: "
        "remove whole earliest turns (an assistant message and the messages after it up to "
        "the next one; system messages and the first user message kept) until it fits, their "
        "spans not trained, a row that cannot fit (or without recorded turns) skipped; the "
        "removal is of token ranges, exact for ChatML-style templates that render each "
        "message independently; or stop with an error naming it. Counted in metrics.jsonl "
        "(overlong_rows, overlong_tokens: the rows' tokens skipped, cut or dropped; "
        "drop_turns also overlong_skipped_rows)",
    )
    # Agent rollouts (precompute mode rollout) record each episode's outcome in the row's
    # meta; SeqKD trains on the successful ones, SKD on all, from one teacher run.
    keep: Literal["all", "success"] = option(
        "all",
        "rows to train on: all, or success: only rollout episodes the teacher solved "
        "(meta.episode.success; a row without it is an error)",
    )
    sort_window: int = option(256, "rows sorted by length together before batching")
    window_blocks: int = option(4, "shard reader shuffle window, in record batches")
    num_workers: int = option(0, "DataLoader worker processes per rank")
    verify: Literal["full", "size", "none"] = option(
        "full", "shard checks: full checksums, file sizes only, or none"
    )

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("shards: at least one shard folder")
        if not all(s.weight > 0 for s in self.shards):
            raise ValueError("shards: every weight must be > 0")
        if len({s.path for s in self.shards}) != len(self.shards):
            raise ValueError("shards: a folder is listed twice")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass(frozen=True)
class LossConfig(KDSpec):
    """The loss (every field of `KDSpec`, documented there) and how it is chunked."""

    chunk_tokens: int = option(1024, "tokens per loss chunk: bounds the logits held in memory")
    # Teacher-vocabulary shards only (docs/cross-tokenizer.md "Losses"): 1.0 is the ULD
    # paper's plain sum L = CE + lambda ULD at lambda = 1, next to the KD terms' own weights.
    uld_weight: float = option(
        1.0,
        "teacher-vocabulary shards: weight of the ULD term at the first token of each merged "
        "block (tokens that do not map one to one); 0: off",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.uld_weight < 0:
            raise ValueError(f"uld_weight must be >= 0, got {self.uld_weight}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(5e-5, "AdamW peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    warmup_steps: int = option(10, "linear warm-up steps of the schedule")
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "learning rate schedule after warm-up, spanning max_steps"
    )
    max_grad_norm: float = option(1.0, "clip the step's gradient to this global norm")


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation (GKD): live student samples scored by a teacher server.

    Active when teacher_url is set. Each micro-batch is, with probability lmbda, the
    student's samples on the prompts of a shard batch (scored by the teacher on the teacher
    view), else the shard batch itself (the teacher's or the dataset's responses).
    """

    teacher_url: str = option(
        "", "teacher server, e.g. http://localhost:8000; empty: on-policy off"
    )
    lmbda: float = option(1.0, "probability that a micro-batch is on-policy (student samples)")
    temperature: float = option(1.0, "student sampling temperature")
    top_p: float = option(1.0, "student sampling nucleus")
    max_new_tokens: int = option(128, "tokens per student sample at most")
    n_samples: int = option(1, "student samples per prompt")
    max_prompts: int = option(8, "prompts taken from a shard batch for an on-policy batch")
    k: int = option(0, "teacher top-k per token; 0: the shards' k")
    timeout_s: float = option(120.0, "teacher request timeout")
    retries: int = option(3, "re-asks after an answer that does not match the request")
    backoff_s: float = option(0.5, "first retry delay; doubles up to max_backoff_s")
    max_backoff_s: float = option(10.0, "longest retry delay")
    give_up_after_s: float = option(
        300.0, "a teacher server away this long: save a checkpoint and stop"
    )
    concurrency: int = option(8, "teacher requests in flight")
    write_shards: str = option("", "also write the samples with their teacher scores here")
    # Prompts from a data file (the formats of datafiles/: question, messages, prompt) instead
    # of the shard batches' (train/prompts.py); data.shards is then not read.
    prompts: str = option("", "on-policy prompts from a data file instead of the shards")
    prompts_split: str = option("train", "split of a DatasetDict folder of prompts")
    experience_position: Literal["system", "prefix", "suffix"] = option(
        "system", "where the teacher view adds a prompt row's experience"
    )
    # vllm: a vLLM engine for the student in this process, its weights pushed from the
    # trainer every sync_every optimizer steps; hf: transformers generate.
    sampler: Literal["hf", "vllm"] = option(
        "hf", "student sampling: hf (transformers generate) or vllm (an engine in-process)"
    )
    sync_every: int = option(1, "vllm sampler: push the weights every this many steps")
    gpu_memory_utilization: float = option(
        0.3, "vllm sampler on a GPU: share of the device for the student engine"
    )
    cpu_kv_cache_gib: float = option(
        1.0, "vllm sampler on the CPU: the engine's KV cache (VLLM_CPU_KVCACHE_SPACE wins)"
    )
    # A teacher on another machine (docs/onpolicy.md): the key itself never goes into a
    # config or a log, only the name of the variable that holds it.
    teacher_api_key_env: str = option(
        "", "NAME of the environment variable holding the teacher server's API key"
    )
    teacher_ca_file: str = option("", "CA bundle for an https teacher with a private CA")
    teacher_model: str = option(
        "", "model name a remote teacher must report; empty: the shards' teacher"
    )
    # A teacher of another tokenizer (train/onpolicy_crosstok.py): found here when the served
    # model's folder is on this machine, or in a teacher-vocabulary folder; else name it.
    teacher_tokenizer: str = option(
        "",
        "the teacher server's tokenizer folder (a teacher of another tokenizer); empty: the "
        "served model's folder when local, else a teacher-vocabulary folder's",
    )
    # Live episodes (train/onpolicy_env.py): an on-policy micro-batch is the student's
    # episodes in a text game, each scored whole by the teacher in its view.
    env_config: str = option(
        "", "live episodes: YAML of envs.config.EnvConfig fields (train fold); empty: prompts"
    )
    experience: str = option("", "live episodes: the teacher's experience file; empty: none")
    episodes: int = option(4, "live episodes: episodes played per on-policy micro-batch")

    def __post_init__(self) -> None:
        checks = [
            (self.sync_every >= 1, "sync_every must be >= 1"),
            (0.0 < self.gpu_memory_utilization < 1.0, "gpu_memory_utilization must be in (0, 1)"),
            (self.cpu_kv_cache_gib > 0, "cpu_kv_cache_gib must be > 0"),
            (0.0 <= self.lmbda <= 1.0, f"lmbda must be in [0, 1], got {self.lmbda}"),
            (self.temperature > 0, "temperature must be > 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.max_new_tokens > 0, "max_new_tokens must be > 0"),
            (self.n_samples > 0 and self.max_prompts > 0, "n_samples, max_prompts must be > 0"),
            (self.k >= 0 and self.concurrency > 0, "k must be >= 0 and concurrency > 0"),
            (self.episodes >= 1, "episodes must be >= 1"),
            (
                self.env_config or not self.experience,
                "experience goes with env_config (live episodes)",
            ),
            (
                not (self.env_config and (self.prompts or self.write_shards)),
                "env_config (live episodes) does not go with prompts or write_shards",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.teacher_api_key_env and not ENV_NAME.fullmatch(self.teacher_api_key_env):
            # Not echoed: a key pasted here by mistake must not reach the terminal or a log.
            raise ValueError(
                "onpolicy.teacher_api_key_env must be the name of an environment variable "
                "(letters, digits, _) that holds the key, not the key itself"
            )


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = option(ModelConfig(), "the student")
    data: DataConfig = option(DataConfig(), "the shards and batching")
    loss: LossConfig = option(LossConfig(), "the distillation loss")
    optim: OptimConfig = option(OptimConfig(), "optimizer and schedule")
    onpolicy: OnPolicyConfig = option(OnPolicyConfig(), "on-policy distillation")
    out_dir: str = option("runs/skd", "the run folder: checkpoints, metrics, config")
    max_steps: int = option(
        100, "optimizer steps; the schedule spans them; with num_epochs the first reached ends"
    )
    # An epoch is one pass over the rows of data.shards (of the first folder of a mixture,
    # the others cycle at their weights); the run ends with the step that trains the last
    # rows of epoch num_epochs - 1 (train/__main__.py epoch_cut). The schedule still spans
    # max_steps: set it to about the epochs' steps (the end line says how many they took).
    num_epochs: int = option(
        0, "passes over the shard rows (a mixture: over its first folder); 0: max_steps only"
    )
    grad_accum: int = option(1, "micro-batches per optimizer step and rank")
    seed: int = option(0, "data order, mixture draws and initial RNG")
    log_every: int = option(1, "write metrics every this many steps")
    save_every: int = option(50, "save a checkpoint every this many steps (and at the end)")
    save_total_limit: int = option(
        0, "keep this many newest checkpoints, older ones deleted once a newer is complete; 0: all"
    )
    eval_every: int = option(0, "evaluation loss on data.eval_shards every N steps; 0: none")
    eval_batches: int = option(8, "batches of data.eval_shards per evaluation")
    resume: Literal["auto", "true", "false"] = option(
        "auto",
        "auto (or true): continue from out_dir's latest checkpoint if it has one, refusing a "
        "folder written with other settings; false: start fresh, refusing a folder with "
        "checkpoints",
    )
    stop_at: int = option(
        0, "end this job after this step (saving), e.g. on time-limited clusters; resume continues"
    )
    deepspeed: str = option("", "a DeepSpeed config (configs/deepspeed/*.json); empty: DDP")
    log_with: str = option(
        "", "extra trackers via accelerate, e.g. wandb,mlflow (metrics.jsonl always)"
    )

    def __post_init__(self) -> None:
        if not (self.max_steps > 0 and self.grad_accum > 0):
            raise ValueError("max_steps and grad_accum must be > 0")
        if self.num_epochs < 0 or self.save_total_limit < 0:
            raise ValueError("num_epochs and save_total_limit must be >= 0")
        if self.onpolicy.teacher_url and self.loss.alpha == 0:
            raise ValueError(
                "on-policy distillation needs a KD loss (loss.alpha > 0), not seqkd (alpha 0)"
            )
        if self.onpolicy.prompts and not self.onpolicy.teacher_url:
            raise ValueError("onpolicy.prompts: on-policy prompts need onpolicy.teacher_url")
        if self.onpolicy.prompts and not self.onpolicy.k:
            raise ValueError(
                "onpolicy.prompts: set onpolicy.k, the teacher's top-k per token (there are no "
                "shards to take it from)"
            )
        if self.onpolicy.prompts and self.onpolicy.lmbda < 1.0:
            raise ValueError(
                "onpolicy.prompts: with prompts from a data file every micro-batch is the "
                "student's samples (there are no shard responses to mix in): onpolicy.lmbda=1"
            )
        if len(self.data.shards) > 1 and self.onpolicy.teacher_url and not self.onpolicy.prompts:
            raise ValueError(
                "on-policy distillation takes its prompts from one shard folder, not a mixture"
            )
        if self.num_epochs and self.onpolicy.teacher_url:
            raise ValueError(
                "num_epochs counts passes over shard rows; on-policy batches are samples: "
                "use max_steps"
            )
        op = self.onpolicy
        if op.teacher_url and op.sampler == "vllm" and self.model.quantize != "none":
            # The engine's in-place reload takes checkpoint-format weights, not bitsandbytes'.
            raise ValueError(
                f"onpolicy.sampler=vllm cannot take a quantized student "
                f"(model.quantize={self.model.quantize}): use onpolicy.sampler=hf, "
                "or model.quantize=none (with model.lora=true for adapters)"
            )
        tracker_names(self.log_with)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The YAML at `path` with `key=value` overrides; any problem is a one-line ConfigError."""
    try:
        data = {}
        if path:
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
        data = apply_overrides(data, list(overrides))
        if isinstance(data.get("data"), dict) and "shards" in data["data"]:
            data["data"]["shards"] = shard_sources(data["data"]["shards"])
        return build(TrainConfig, data, renamed=RENAMED)
    except ConfigError:
        raise
    except (ValueError, OSError, yaml.YAMLError) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def config_help() -> str:
    """Every config key with its type, default and meaning, from the dataclasses' fields."""
    return "\n".join(help_lines(TrainConfig))


def shard_sources(value) -> list:
    """`data.shards` in any of its spellings -> a list of {path, weight} mappings.

    "a" and ["a", "b"] weigh 1 each; "a:0.7,b:0.3" is the key=value form. A `:suffix`
    counts as the weight only when it is a number, so s3://bucket/x stays one path.
    """
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"data.shards: expected a folder or a list of folders, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, str):
            path, _, weight = item.rpartition(":")
            try:
                item = {"path": path, "weight": float(weight)} if path else {"path": item}
            except ValueError:
                item = {"path": item}
        out.append(item)
    return out


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), for YAML/JSON and TensorBoard."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from runtime.typed_config import apply_overrides, build
from train.losses import KDSpec

# Keys of older configs, and what replaced them (named in the unknown-key error).
RENAMED = {
    "loss.method": "loss.divergence: forward_kl | reverse_kl | jsd | dual_kl "
    "(seqkd: loss.alpha=0; skd: forward_kl with loss.alpha < 1; dualkl: dual_kl)",
    "loss.direction": "loss.divergence: forward_kl | reverse_kl",
    "loss.reverse": "loss.reverse_kl_estimator",
    "loss.forward": "loss.forward_kl_support",
}


@dataclass(frozen=True)
class ModelConfig:
    path: str = "models/smollm2-student"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on a capable GPU
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    gradient_checkpointing: bool = False
    quantize: Literal["none", "4bit", "8bit"] = "none"  # QLoRA; needs CUDA and bitsandbytes


@dataclass(frozen=True)
class ShardSource:
    """One shard folder of the training data and its share of the trained tokens."""

    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    # One folder, or a weighted mixture (train/mixture.py). YAML: `shards: out/shards`, or
    # `shards: [{path: a, weight: 0.7}, {path: b, weight: 0.3}]`; key=value:
    # `data.shards=a:0.7,b:0.3` (a folder without `:weight` weighs 1).
    shards: tuple[ShardSource, ...] = (ShardSource("out/shards"),)
    eval_shards: str = ""  # a held-out shard folder for periodic evaluation loss
    batch_tokens: int = 4096  # padded tokens per micro-batch (length-aware batching)
    max_rows: int = 64  # rows per micro-batch at most
    max_length: int = 1024  # prompt + response tokens; longer rows are truncated on the right
    sort_window: int = 256  # rows sorted by length together before batching
    window_blocks: int = 4  # shard reader shuffle window, in record batches
    num_workers: int = 0  # DataLoader workers
    verify: Literal["full", "size", "none"] = "full"  # shard checksums

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("shards: at least one shard folder")
        if not all(s.weight > 0 for s in self.shards):
            raise ValueError("shards: every weight must be > 0")
        if len({s.path for s in self.shards}) != len(self.shards):
            raise ValueError("shards: a folder is listed twice")


@dataclass(frozen=True)
class LossConfig(KDSpec):
    """The loss (every field of `KDSpec`, documented there) and how it is chunked."""

    chunk_tokens: int = 1024  # tokens per loss chunk: bounds the logits held in memory

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation (GKD): live student samples scored by a teacher server.

    Active when teacher_url is set. Each micro-batch is, with probability lmbda, the
    student's samples on the prompts of a shard batch (scored by the teacher on the teacher
    view), else the shard batch itself (the teacher's or the dataset's responses).
    """

    teacher_url: str = ""  # e.g. http://localhost:8000 (python -m vllm...api_server); "" = off
    lmbda: float = 1.0  # probability that a micro-batch is on-policy (student samples)
    temperature: float = 1.0  # student sampling
    top_p: float = 1.0
    max_new_tokens: int = 128
    n_samples: int = 1  # samples per prompt
    max_prompts: int = 8  # prompts taken from a shard batch for an on-policy batch
    k: int = 0  # teacher top-k per token; 0: the shards' k
    timeout_s: float = 120.0  # per request
    retries: int = 3  # re-asks after an answer that does not match the request
    backoff_s: float = 0.5  # first retry delay; doubles up to max_backoff_s
    max_backoff_s: float = 10.0
    give_up_after_s: float = 300.0  # a server away this long: save a checkpoint and stop
    concurrency: int = 8  # teacher requests in flight
    write_shards: str = ""  # also write the samples with their teacher scores here
    # Prompts from a data file (the formats of datafiles/: question, messages, prompt) instead
    # of the shard batches' (train/prompts.py); data.shards is then not read.
    prompts: str = ""
    prompts_split: str = "train"  # split of a DatasetDict folder
    # Where the teacher view adds a prompt row's experience (as precompute's view does).
    experience_position: Literal["system", "prefix", "suffix"] = "system"
    # Student sampling: vllm = a vLLM engine for the student in this process, its weights
    # pushed from the trainer every sync_every optimizer steps; hf = transformers generate.
    sampler: Literal["hf", "vllm"] = "hf"
    sync_every: int = 1
    gpu_memory_utilization: float = 0.3  # GPU: share of the device for the student engine
    cpu_kv_cache_gib: float = 1.0  # CPU: the engine's KV cache (VLLM_CPU_KVCACHE_SPACE wins)

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
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    out_dir: str = "runs/skd"
    max_steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 1
    save_every: int = 50
    eval_every: int = 0  # 0: no periodic evaluation
    eval_batches: int = 8
    resume: bool = False
    stop_at: int = 0  # end this job after this step (saving), e.g. on time-limited clusters;
    # the schedule still spans max_steps, and resume=true continues
    deepspeed: str = ""  # path of a DeepSpeed config (configs/deepspeed/*.json) or empty
    log_with: str = ""  # extra trackers via accelerate, e.g. "wandb,mlflow" (train/logger.py)

    def __post_init__(self) -> None:
        if not (self.max_steps > 0 and self.grad_accum > 0):
            raise ValueError("max_steps and grad_accum must be > 0")
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
        from train.logger import tracker_names  # train.logger imports this module

        tracker_names(self.log_with)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    if isinstance(data.get("data"), dict) and "shards" in data["data"]:
        data["data"]["shards"] = shard_sources(data["data"]["shards"])
    return build(TrainConfig, data, renamed=RENAMED)


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

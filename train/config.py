"""Typed training configuration: one frozen dataclass per component, YAML per method.

`load_config("configs/train/skd.yaml", ["loss.beta=0.5", "max_steps=100"])` reads the YAML,
applies `key=value` overrides (dotted keys reach into sections; values are parsed as YAML
scalars and checked against the field's type) and refuses unknown keys, so a typo fails
before a run starts instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shards.typed_config import apply_overrides, build

METHODS = ("seqkd", "skd", "jsd", "dualkl")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "models/smollm2-student"
    dtype: str = "auto"  # auto: bfloat16 on a GPU that supports it, else float32
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
    quantize: str = "none"  # none | 4bit | 8bit (QLoRA; needs CUDA and bitsandbytes)


@dataclass(frozen=True)
class DataConfig:
    shards: str = "out/shards"
    eval_shards: str = ""  # a held-out shard folder for periodic evaluation loss
    batch_tokens: int = 4096  # padded tokens per micro-batch (length-aware batching)
    max_rows: int = 64  # rows per micro-batch at most
    max_length: int = 1024  # prompt + response tokens; longer rows are truncated on the right
    sort_window: int = 256  # rows sorted by length together before batching
    window_blocks: int = 4  # shard reader shuffle window, in record batches
    num_workers: int = 0  # DataLoader workers
    verify: str = "full"  # full | size | none (shard checksums)


@dataclass(frozen=True)
class LossConfig:
    method: str = "skd"  # seqkd | skd | jsd | dualkl
    alpha: float = 1.0  # SKD: alpha * KD + (1 - alpha) * CE; alpha = 1 is pure KD
    direction: str = "forward"  # SKD divergence: forward KL(teacher||student) | reverse
    beta: float = 0.5  # JSD(beta): 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0
    tail: str = "tail_bucket"  # tail_bucket | renormalize
    sft_alpha: float = 0.0  # weight of an extra SFT (CE) term added to any KD loss
    gate: str = "soft"  # dual-KL gate: soft | hard
    gate_alpha: float = 10.0
    gate_tau: float = 0.5
    reverse: str = "exact"  # dual-KL reverse KL: exact | mc (sampled token)
    forward: str = "topk"  # dual-KL forward KL: topk | argmax
    chunk_tokens: int = 1024  # tokens per loss chunk: bounds the logits held in memory


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
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
    # Student sampling: vllm = a vLLM engine for the student in this process, its weights
    # pushed from the trainer every sync_every optimizer steps; hf = transformers generate.
    sampler: str = "hf"  # vllm | hf
    sync_every: int = 1
    gpu_memory_utilization: float = 0.3  # GPU: share of the device for the student engine
    cpu_kv_cache_gib: float = 1.0  # CPU: the engine's KV cache (VLLM_CPU_KVCACHE_SPACE wins)

    def __post_init__(self):
        if self.sampler not in ("vllm", "hf"):
            raise ValueError(f"onpolicy.sampler must be vllm or hf, got {self.sampler!r}")
        if self.sync_every < 1:
            raise ValueError("onpolicy.sync_every must be >= 1")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ValueError("onpolicy.gpu_memory_utilization must be in (0, 1)")
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError("onpolicy.cpu_kv_cache_gib must be > 0")


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


def validate(cfg: TrainConfig) -> TrainConfig:
    checks = [
        (cfg.loss.method in METHODS, f"loss.method must be one of {METHODS}"),
        (cfg.loss.direction in ("forward", "reverse"), "loss.direction: forward | reverse"),
        (cfg.loss.tail in ("tail_bucket", "renormalize"), "loss.tail: tail_bucket | renormalize"),
        (0.0 <= cfg.loss.beta <= 1.0, "loss.beta must be in [0, 1]"),
        (0.0 <= cfg.loss.alpha <= 1.0, "loss.alpha must be in [0, 1]"),
        (cfg.loss.temperature > 0, "loss.temperature must be > 0"),
        (cfg.loss.gate in ("soft", "hard"), "loss.gate: soft | hard"),
        (cfg.loss.reverse in ("exact", "mc"), "loss.reverse: exact | mc"),
        (cfg.loss.forward in ("topk", "argmax"), "loss.forward: topk | argmax"),
        (cfg.optim.schedule in ("cosine", "linear", "constant"), "optim.schedule"),
        (cfg.model.quantize in ("none", "4bit", "8bit"), "model.quantize: none | 4bit | 8bit"),
        (cfg.data.verify in ("full", "size", "none"), "data.verify: full | size | none"),
        (cfg.max_steps > 0 and cfg.grad_accum > 0, "max_steps and grad_accum must be > 0"),
        (0.0 <= cfg.onpolicy.lmbda <= 1.0, "onpolicy.lmbda must be in [0, 1]"),
        (cfg.onpolicy.temperature > 0, "onpolicy.temperature must be > 0"),
        (0.0 < cfg.onpolicy.top_p <= 1.0, "onpolicy.top_p must be in (0, 1]"),
        (cfg.onpolicy.max_new_tokens > 0, "onpolicy.max_new_tokens must be > 0"),
        (cfg.onpolicy.n_samples > 0 and cfg.onpolicy.max_prompts > 0, "onpolicy.n_samples"),
        (cfg.onpolicy.k >= 0 and cfg.onpolicy.concurrency > 0, "onpolicy.k, concurrency"),
        (
            not cfg.onpolicy.teacher_url or cfg.loss.method != "seqkd",
            "on-policy distillation needs a KD loss (skd, jsd, dualkl), not seqkd",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    return validate(build(TrainConfig, apply_overrides(data, list(overrides))))


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

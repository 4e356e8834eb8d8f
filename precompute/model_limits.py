"""The teacher's own limits, read from its folder, for what the config leaves unset.

A config names no response length or context by default, so that a user's teacher runs with
its own limits, not the CPU demo's (96 tokens, 2048 context):

- the context window (prompt + response tokens): `engine.max_model_len` if set, else the
  model's `max_position_embeddings` (config.json), which is what vLLM uses too;
- the response limit: `sampling.max_tokens` if set (> 0), else the model's generation config
  (generation_config.json `max_new_tokens`, else `max_length`, which transformers applies to
  prompt + response and which bounds the response here), else the context window: the
  response may run to its end (the engine caps it at the context minus the prompt).

Only local files are read (transformers' AutoConfig / GenerationConfig, local_files_only).
A response cut at the limit is recorded per row (meta.finish_reason "length") and counted in
the run's summary and in `python -m tools.shards stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

from precompute.config import ConfigError


@dataclass(frozen=True)
class ModelLimits:
    context: int | None  # prompt + response tokens; None: neither the config nor the model says
    context_from: str
    max_tokens: int  # response tokens
    max_tokens_from: str

    def text(self) -> str:
        ctx = "unknown" if self.context is None else str(self.context)
        return (
            f"max_tokens {self.max_tokens} ({self.max_tokens_from}), "
            f"context {ctx} ({self.context_from})"
        )


def model_context(path: str) -> int | None:
    """config.json's max_position_embeddings (the text model's, for multimodal configs)."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(path, local_files_only=True)
    conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    value = getattr(conf, "max_position_embeddings", None)
    return int(value) if value else None


def generation_limits(path: str) -> dict[str, int]:
    """The length limits generation_config.json sets explicitly (transformers fills in
    max_length=20 when the file says nothing: only values that differ from its defaults
    count)."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # no generation_config.json
        return {}
    set_ = gen.to_diff_dict()
    return {k: int(set_[k]) for k in ("max_new_tokens", "max_length") if set_.get(k)}


def resolve_limits(teacher: str, max_model_len: int | None, max_tokens: int) -> ModelLimits:
    """The context and response limits of a run: explicit settings first, then the model's."""
    if max_model_len:
        context, context_from = int(max_model_len), "engine.max_model_len"
    else:
        context = model_context(teacher)
        context_from = "config.json max_position_embeddings" if context else "not in config.json"
    if max_tokens > 0:
        return ModelLimits(context, context_from, max_tokens, "sampling.max_tokens")
    gen = generation_limits(teacher)
    for key in ("max_new_tokens", "max_length"):
        if key in gen:
            return ModelLimits(context, context_from, gen[key], f"generation_config.json {key}")
    if context is None:
        raise ConfigError(
            f"teacher={teacher}: neither its config.json (max_position_embeddings) nor its "
            "generation_config.json (max_new_tokens, max_length) gives a length limit: set "
            "sampling.max_tokens (and engine.max_model_len)"
        )
    return ModelLimits(context, context_from, context, "the context window")

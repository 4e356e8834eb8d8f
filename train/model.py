"""The student: a transformers causal LM, optionally with LoRA, wrapped with its loss.

`DistillModule.forward` runs the student's decoder and the chunked loss in one module, so the
whole step happens inside the forward of whatever wraps it (DDP, DeepSpeed): gradient sync
and ZeRO-3 parameter gathering see every parameter used, the output head included.
"""

from __future__ import annotations

import torch
from torch import nn

from train.batches import Batch
from train.chunked import LinearHead
from train.config import ModelConfig
from train.losses import KDSpec, LossOutput, TeacherSignal, kd_loss


def resolve_dtype(name: str) -> torch.dtype:
    """Weights' dtype for training: float32 master weights unless asked otherwise.

    "auto" keeps float32 weights everywhere; on a bf16-capable GPU the trainer adds bf16
    autocast (mixed precision) on top, which is what `mixed_precision` reports.
    """
    table = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"model.dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def mixed_precision(name: str) -> str:
    """Accelerate's mixed_precision for model.dtype: bf16 on capable GPUs under "auto"."""
    if name == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def load_student(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    kwargs = {"dtype": resolve_dtype(cfg.dtype)}
    if cfg.quantize != "none":
        if not torch.cuda.is_available():
            raise ValueError("model.quantize (QLoRA) needs a CUDA GPU and bitsandbytes")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.quantize == "4bit",
            load_in_8bit=cfg.quantize == "8bit",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    model.config.use_cache = False  # training: no KV cache
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing)
    if cfg.lora or cfg.quantize != "none":
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [m for m in cfg.lora_target_modules if m in present]
        if not targets:
            raise ValueError(
                f"none of model.lora_target_modules {cfg.lora_target_modules} is in the model"
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


class DistillModule(nn.Module):
    """Student forward + loss. Returns the loss SUM over the batch's trained tokens."""

    def __init__(self, lm: nn.Module, spec: KDSpec, chunk_tokens: int):
        super().__init__()
        self.lm = lm
        self.spec = spec
        self.chunk_tokens = chunk_tokens

    @property
    def head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, batch: Batch) -> LossOutput:
        decoder = self.lm.get_decoder()
        hidden_BLH = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        hidden_NH = hidden_BLH.flatten(0, 1)[batch.positions]
        head = self.head
        teacher = TeacherSignal(
            ids=batch.topk_ids,
            logprobs=batch.topk_logprobs,
            tail_logprob=batch.tail_logprob,
            token_logprob=batch.token_logprob,
        )
        return kd_loss(
            LinearHead(hidden_NH, head.weight, getattr(head, "bias", None)),
            teacher if self.spec.alpha > 0 else None,  # SeqKD: CE only, skip the KD work
            spec=self.spec,
            targets=batch.targets,
            chunk_tokens=self.chunk_tokens,
        )

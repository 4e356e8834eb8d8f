"""The student: a transformers causal LM, optionally with LoRA (or QLoRA: LoRA on a 4-bit or 8-bit
bitsandbytes base), wrapped with its loss.

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
from train.crosstok_loss import crosstok_loss
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


def quantization_config(quantize: str, dtype: str, device: torch.device):
    """bitsandbytes settings for model.quantize: nf4 (QLoRA) or LLM.int8.

    The 4-bit compute dtype is what the dequantized weights multiply in: float32 on the CPU
    (bitsandbytes' CPU kernels; bf16 there is slow and lossy), bf16 on a GPU unless model.dtype
    says float32.
    """
    from transformers import BitsAndBytesConfig  # heavy: see load_student

    if device.type == "cpu" and quantize == "8bit":
        # Linear8bitLt runs a CPU forward, but its weights cannot be loaded back into a CPU
        # layer ("Please call module.cuda()"), so no checkpoint could ever be resumed.
        raise ValueError("model.quantize=8bit needs a CUDA GPU; on the CPU use model.quantize=4bit")
    on_gpu = device.type == "cuda"
    compute = torch.bfloat16 if on_gpu and dtype in ("auto", "bfloat16") else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=quantize == "4bit",
        load_in_8bit=quantize == "8bit",
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
    )


def load_student(cfg: ModelConfig, device: torch.device | str = "cpu"):
    """(model, tokenizer) of model.path, with LoRA adapters when model.lora or model.quantize.

    device: where a quantized model is loaded (bitsandbytes quantizes while loading); a
    full-precision model is moved by accelerate's prepare instead.
    """
    # transformers' model classes and peft take seconds to import (peft pulls in bitsandbytes):
    # loaded with the model, so that `python -m train --help` and config checks stay fast.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    kwargs = {"dtype": resolve_dtype(cfg.dtype)}
    if cfg.quantize != "none":
        kwargs["quantization_config"] = quantization_config(cfg.quantize, cfg.dtype, device)
        kwargs["device_map"] = {"": device}
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
    if cfg.quantize != "none":
        train_quantized_layers(model)
    return model, tokenizer


def train_quantized_layers(model: nn.Module) -> None:
    """Keep the frozen quantized layers as loaded, and out of the model's state dict.

    bitsandbytes repacks a 4-bit layer for its bf16 CPU kernels the first time it runs in
    eval mode without gradients (evaluation, HF sampling), rounding its scales to bf16 for
    good: training would go on with other base weights than a resumed run quantizes, and
    than tools.eval dequantizes. Turned off, every pass computes with the loaded weights.

    The quantized weights leave the state dict, so that a checkpoint (accelerate.save_state)
    holds the adapters and the other weights only, and their absence is accepted when a
    state dict is loaded back: they are not trained, and quantizing model.path again gives
    them back bit for bit, which is what a resumed run does. bitsandbytes could not load its
    own state back anyway (4-bit: unexpected quant-state keys; 8-bit on the CPU: refused).
    """
    import bitsandbytes as bnb  # optional: quantized (QLoRA) runs only

    def drop(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix) :]
            if name in ("weight", "SCB", "weight_format") or name.startswith("weight."):
                del state_dict[key]

    def keep_own(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        state_dict[prefix + "weight"] = module.weight  # loads as a copy onto itself

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module.register_state_dict_post_hook(drop)
            module.register_load_state_dict_pre_hook(keep_own)


class DistillModule(nn.Module):
    """Student forward + loss. Returns the loss SUM over the batch's trained tokens."""

    def __init__(self, lm: nn.Module, spec: KDSpec, chunk_tokens: int, uld_weight: float = 1.0):
        super().__init__()
        self.lm = lm
        self.spec = spec
        self.chunk_tokens = chunk_tokens
        self.uld_weight = uld_weight  # teacher-vocabulary batches only (train/crosstok_loss.py)
        # A mixture with teacher-vocabulary folders (train/setup.py sets it): ordinary batches
        # log crosstok_loss's stats too, all one-to-one, no ULD.
        self.crosstok_stats = False

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
        student = LinearHead(hidden_NH, head.weight, getattr(head, "bias", None))
        if batch.ct_kind is not None:  # teacher-vocabulary shards
            return crosstok_loss(
                student,
                batch.targets,
                batch.ct_kind,
                batch.topk_ids,
                batch.topk_logprobs,
                batch.tail_logprob,
                batch.token_logprob,
                batch.ct_block_logprob,
                spec=self.spec,
                uld_weight=self.uld_weight,
                chunk_tokens=self.chunk_tokens,
            )
        teacher = TeacherSignal(
            ids=batch.topk_ids,
            logprobs=batch.topk_logprobs,
            tail_logprob=batch.tail_logprob,
            token_logprob=batch.token_logprob,
        )
        out = kd_loss(
            student,
            teacher if self.spec.alpha > 0 else None,  # SeqKD: CE only, skip the KD work
            spec=self.spec,
            targets=batch.targets,
            chunk_tokens=self.chunk_tokens,
        )
        if self.crosstok_stats:
            tokens = out.stats["tokens"]
            out.stats.update(uld=torch.zeros_like(tokens), one_to_one=tokens.clone())
        return out

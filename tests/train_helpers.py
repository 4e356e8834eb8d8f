"""Shards from a real (tiny) teacher for trainer tests: transformers teacher forcing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shards.fingerprint import tokenizer_fingerprint, weights_fingerprint
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from train.__main__ import main as train_main

# Small batches and a quick schedule: the tiny model learns something in a few steps.
TINY_RUN = ("data.batch_tokens=256", "data.sort_window=8", "optim.warmup_steps=0", "optim.lr=3e-3")


class ShardStub:
    """The part of a shard source OnPolicyBatches uses: batches with a cursor, metrics."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def pop_metrics(self):
        return {}


def train_tiny(config: str, out: Path, model, shards, *extra: str) -> list[dict]:
    """`python -m train CONFIG` on the tiny model and shards with TINY_RUN, then `extra`;
    returns the run's metrics.jsonl records."""
    train_main(
        [config, f"model.path={model}", f"data.shards={shards}", f"out_dir={out}", *TINY_RUN]
        + list(extra)
    )
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def tiny_teacher(model_dir: Path, k: int):
    """(tokenizer, float32 model in eval mode, the ShardMetadata of its top-k shards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    meta = ShardMetadata(
        k=k,
        vocab_size=model.config.vocab_size,
        teacher=str(model_dir),
        teacher_fingerprint=weights_fingerprint(model_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    return tok, model, meta


def write_teacher_shards(
    folder: Path, model_dir: Path, *, examples: int = 48, k: int = 16, new_tokens: int = 16
) -> Path:
    """Sampled responses of the tiny model to templated questions, with its own top-k."""
    tok, model, meta = tiny_teacher(model_dir, k)
    torch.manual_seed(0)
    with ShardWriter(folder, meta, batch_tokens=256) as writer:
        for i in range(examples):
            chat = [{"role": "user", "content": f"What is {i} plus {2 * i + 1}?"}]
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            prompt = tok(text, add_special_tokens=False).input_ids
            with torch.no_grad():
                seq = model.generate(
                    torch.tensor([prompt]),
                    do_sample=True,
                    max_new_tokens=new_tokens,
                    pad_token_id=tok.pad_token_id,
                )[0]
                logprobs = torch.log_softmax(model(seq[None]).logits[0].float(), -1)
            response = seq[len(prompt) :]
            lp = logprobs[len(prompt) - 1 : len(seq) - 1]
            values, ids = lp.topk(k, -1)
            writer.add(
                ShardRow(
                    id=f"ex{i}",
                    prompt_ids=prompt,
                    teacher_prompt_ids=prompt,
                    response_ids=response.numpy(),
                    topk_ids=ids.numpy(),
                    topk_logprobs=values.numpy(),
                    token_logprobs=lp.gather(1, response[:, None])[:, 0].numpy(),
                )
            )
    return folder

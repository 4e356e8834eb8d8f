"""Build a tiny random-weight Qwen3 model with a locally trained BPE tokenizer.

Tests and the demo need a real Hugging Face model folder that both transformers and
vLLM (CPU) can load, but this project has no model hub.  This module makes one from
scratch in a few seconds: a byte-level BPE tokenizer trained on a small built-in
corpus, and a Qwen3ForCausalLM with seeded random weights.

    python -m tools.tiny_model OUT_DIR [--seed 0] [--vocab-size 512] ...

`tiny_model_dir()` returns a cached build (keyed by its parameters) for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump whenever the output of build_tiny_model changes for the same parameters, so
# that cached builds made by an older version are not reused.
TINY_MODEL_VERSION = 1

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]

# ChatML, as used by Qwen and SmolLM2, without an implicit system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# vLLM's CPU attention backend only has kernels for these head sizes
# (vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# The byte-level alphabet (256) plus the special tokens must fit, with room for merges.
_MIN_VOCAB = 320

_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog.
Paris is the capital of France. Berlin is the capital of Germany.
Rome is the capital of Italy, and Madrid is the capital of Spain.
The sun rises in the east and sets in the west.
Water boils at one hundred degrees Celsius at sea level.
A teacher model writes its answers once; a student model learns from them.
Knowledge distillation trains a small model to match the output of a large model.
The student reads the top tokens and their probabilities from the shards.
What is the answer? Let us think step by step.
Alice has three apples. Bob gives her five more. How many apples does she have now?
She has eight apples, because three plus five is eight.
A train travels sixty miles in one hour. How far does it travel in four hours?
It travels two hundred and forty miles.
Tom reads twelve pages a day. After seven days he has read eighty-four pages.
The sum of the angles of a triangle is one hundred and eighty degrees.
A square has four equal sides and four right angles.
If x + 3 = 10, then x = 7. If 2y = 18, then y = 9.
The area of a rectangle is its length times its width.
Half of forty is twenty, and a quarter of forty is ten.
Prime numbers: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47.
Please answer the question in one short sentence.
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: What is seven times six?
Assistant: Seven times six is forty-two.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
The cat sat on the mat while the dog slept by the door.
Reading every day makes it easier to learn new words and ideas.
Numbers can be written with digits or with words: 12 is twelve, 100 is one hundred.
"""


def _build_corpus() -> list[str]:
    """The tokenizer training corpus: fixed prose plus generated arithmetic lines.

    Everything is generated deterministically (no randomness, no downloads) so that
    the trained tokenizer is identical on every machine.
    """
    lines = [line for line in _CORPUS_TEXT.splitlines() if line.strip()]
    for a in range(0, 25):
        for b in range(0, 25, 3):
            lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}.")
    for a in range(10, 100, 7):
        lines.append(f"What is {a} minus {a // 3}? The answer is {a - a // 3}.")
    return lines


def train_tokenizer(vocab_size: int = 512, model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer on the built-in corpus.

    Byte-level BPE never needs an unknown token, so any text round-trips exactly.
    Returns a transformers PreTrainedTokenizerFast with eos/pad tokens and a ChatML
    chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Keeps character offsets correct (offset mapping) without touching the ids.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_build_corpus(), trainer=trainer)
    if backend.get_vocab_size() > vocab_size:
        raise RuntimeError(
            f"trained tokenizer has {backend.get_vocab_size()} tokens, more than {vocab_size}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _check_params(vocab_size: int, hidden: int, heads: int, kv_heads: int, head_dim: int):
    if vocab_size % 64 or vocab_size < _MIN_VOCAB:
        # A multiple of 64 keeps embedding shapes friendly to vLLM's vocab padding.
        raise ValueError(
            f"vocab_size must be a multiple of 64 and >= {_MIN_VOCAB}, got {vocab_size}"
        )
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"head_dim {head_dim} is not supported by vLLM on CPU: {VLLM_CPU_HEAD_SIZES}"
        )
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if hidden <= 0:
        raise ValueError(f"hidden must be positive, got {hidden}")


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    intermediate: int = 128,
    max_position_embeddings: int = 2048,
    init_std: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen3ForCausalLM and its tokenizer to `out_dir`.

    head_dim is independent of hidden/heads in Qwen3; its default (32) is the smallest
    size vLLM's CPU backend supports.  init_std is much larger than the usual 0.02 so
    next-token distributions are peaked rather than nearly uniform: near-ties would
    make top-k sets differ between implementations (vLLM vs transformers) by float
    noise alone.  The same parameters always give byte-identical weights.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    _check_params(vocab_size, hidden, heads, kv_heads, head_dim)
    out = Path(out_dir)
    tokenizer = train_tokenizer(vocab_size, model_max_length=max_position_embeddings)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=init_std,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config).to(torch.float32)

    # Initialise every matrix ourselves from one seeded generator, in name order, so
    # the weights do not depend on transformers' init code or the global RNG state.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * init_std)
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None
    )

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


_BUILD_SIGNATURE = inspect.signature(build_tiny_model)


def default_cache_dir() -> Path:
    """Root of kdshards' build cache ($KDSHARDS_CACHE_DIR, else the XDG cache dir)."""
    if env := os.environ.get("KDSHARDS_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "kdshards"


def tiny_model_dir(cache_dir: str | os.PathLike | None = None, **params) -> Path:
    """Return a folder with `build_tiny_model(**params)`, building it once per cache.

    The build goes to a temporary sibling folder and is renamed into place only when
    complete, so an interrupted build is never mistaken for a finished one, and
    concurrent callers (e.g. parallel test processes) end up sharing one copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tiny-models"
    # Fill in defaults so that e.g. tiny_model_dir() and tiny_model_dir(seed=0) share
    # one build; unknown parameter names fail here with a TypeError.
    bound = _BUILD_SIGNATURE.bind("out_dir", **params)
    bound.apply_defaults()
    key_params = {k: v for k, v in bound.arguments.items() if k != "out_dir"}
    key_src = json.dumps({"version": TINY_MODEL_VERSION, **key_params}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    final = root / f"qwen3-tiny-{key}"
    marker = final / "tiny_model.json"
    if marker.is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        build_tiny_model(tmp, **params)
        (tmp / "tiny_model.json").write_text(key_src + "\n")
        if final.exists() and not marker.is_file():
            # Not made by a finished build (the marker is written before the rename),
            # e.g. copied by hand: replace it rather than return a half-made folder.
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            # Another process renamed its copy first; use that one.
            if not marker.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    args = parser.parse_args(argv)
    # stdout carries only the output path (scripts capture it).  Libraries imported
    # during the build print to stdout: DeepSpeed, pulled in through accelerate, logs
    # "Setting accelerator to CPU" there on machines without a GPU.
    with contextlib.redirect_stdout(sys.stderr):
        out = build_tiny_model(
            args.out_dir,
            vocab_size=args.vocab_size,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            seed=args.seed,
        )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

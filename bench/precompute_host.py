"""The host side of precompute per token, without a model: vLLM's logprobs to shards on disk.

    python -m bench.precompute_host [--k 20 64 128] [--levels 1 3 6 9 12]
        [--examples 480] [--out bench/results/precompute_host.json]

The engine's output is replayed, not generated. Distributions: SmolLM2-135M-Instruct's
float32 top-128 at every token of 480 gsm_symbolic worked solutions (bench.shards' teacher
forcing, cached in bench/cache/). For k in --k each token becomes what vLLM's sampler hands
its output processor at each decoding step, the chosen token then the top k (ids, logprobs,
the chosen token's rank), and vLLM's own `LogprobsProcessor` turns that into the request's
logprobs, one step at a time, in each of precompute's layouts: per-position dicts of Logprob
objects ("dicts", vLLM's default), `FlatLogprobs` ("flat",
`SamplingParams(flat_logprobs=True)`) and the engine's own arrays ("arrays", the default:
vllm_engine/arrays.py). Stages, each timed on one core (torch and Arrow limited to one
thread), CPU time of the process, best of --repeats, in µs per response token:

* vllm: vLLM's output processor building the logprobs (in the process that calls
  `LLM.generate`; with "arrays", our hook in place of vLLM's list building);
* convert: those logprobs to (T, k) arrays: `precompute.backend.topk_from_entries` (a loop
  and a sort per token), `topk_from_flat_logprobs` and `topk_from_logprob_arrays` (array
  operations over the 32 requests of an engine call, precompute's commit_every); all are
  checked equal;
* encode: `shards.codec.encode_tokens` on the writer's 16,384-token batches;
* compress: zstd at the writer's level on the encoded columns (what Arrow IPC compresses);
* write: the rest of `ShardWriter` (row checks, Arrow batches, file, fsync, sha256,
  manifest): a whole `ShardWriter` run minus encode and compress.

Host tokens/s per core = 1e6 / (convert + writer) µs, and with vLLM's share added. The
writer runs again at each zstd level of --levels (size and speed). Writes JSON and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import checkout_relative

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "precompute_host.json"
KS = (20, 64, 128)
LEVELS = (1, 3, 6, 9, 12)
DEFAULT_LEVEL = 12
# Examples per engine call, as precompute's commit_every (default 32): also bounds the memory
# that the dict path holds.
CHUNK_EXAMPLES = 32
# CPU time of this process, not wall time: per-core cost is the figure, and on a shared
# machine wall time would also count the other jobs' turns on the core.
clock = time.process_time
TARGET_K = 64
LAYOUTS = ("dicts", "flat", "arrays")  # vllm_engine.teacher.LAYOUTS, the old one first
DEFAULT = "arrays"
TARGETS = {"convert_tokens_per_s": 400e3, "host_tokens_per_s": 150e3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def engine_outputs(data: dict, k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per example what vLLM's sampler gives its output processor (vllm.v1.outputs.LogprobsLists
    fields): ids (T, k + 1) int32 and logprobs (T, k + 1) float32, the chosen token first, then
    the top k; the chosen token's rank (T,), the count of logprobs >= its own."""
    roff = data["response_off"]
    out = []
    for i in range(len(roff) - 1):
        a, b = int(roff[i]), int(roff[i + 1])
        resp = data["response"][a:b].astype(np.int32)
        tok_lp = data["token_logprob"][a:b].astype(np.float32)
        top_ids, top_lps = data["ids"][a:b], data["logprobs"][a:b]
        ids = np.concatenate([resp[:, None], top_ids[:, :k]], axis=1)
        lps = np.concatenate([tok_lp[:, None], top_lps[:, :k]], axis=1)
        # Outside the stored top 128 the true rank is unknown; nothing reads it but vLLM's
        # containers, which store it as is.
        ranks = (top_lps >= tok_lp[:, None]).sum(axis=1)
        out.append((ids, lps, np.where(ranks == top_lps.shape[1], 10_000, ranks)))
    return out


def steps(outputs) -> list:
    """Per example, what vLLM's output processor gets at each decoding step: one position's
    LogprobsLists (made here, outside the timings: the engine's side, the same for every
    layout)."""
    from vllm.v1.outputs import LogprobsLists

    return [
        [LogprobsLists(ids[t : t + 1], lps[t : t + 1], ranks[t : t + 1]) for t in range(len(ids))]
        for ids, lps, ranks in outputs
    ]


def pythonize(step_lists, k: int, layout: str) -> list:
    """vLLM's output processor: the engine's arrays to each request's logprobs container,
    one decoding step at a time, as vLLM calls it (with "arrays", as precompute installs
    it: vllm_engine/arrays.py)."""
    from vllm.logprobs import create_sample_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from vllm_engine.arrays import LogprobArrays, install

    if not install():
        raise RuntimeError("this vLLM lacks the internals vllm_engine/arrays.py needs")
    containers = []
    for example in step_lists:
        proc = LogprobsProcessor(
            tokenizer=None,  # detokenize=False, as precompute asks
            logprobs=(
                LogprobArrays(k + 1)
                if layout == "arrays"
                else create_sample_logprobs(layout == "flat")
            ),
            prompt_logprobs=None,
            cumulative_logprob=0.0,
            num_logprobs=k,
            num_prompt_logprobs=None,
        )
        for step in example:
            proc._update_sample_logprobs(step)
        containers.append(proc.logprobs)
    return containers


def convert(containers, outputs, k: int, layout: str) -> list:
    from precompute.backend import (
        topk_from_entries,
        topk_from_flat_logprobs,
        topk_from_logprob_arrays,
    )

    tokens = [o[0][:, 0].tolist() for o in outputs]
    requests = [(c, t, 0) for c, t in zip(containers, tokens, strict=True)]
    if layout == "arrays":  # one engine call's outputs at once, as VLLMBackend does
        return topk_from_logprob_arrays(requests, k)
    if layout == "flat":
        return topk_from_flat_logprobs(requests, k)
    return [topk_from_entries(c, t, k) for c, t in zip(containers, tokens, strict=True)]


def vllm_and_convert(outputs, k: int, layout: str, repeats: int) -> tuple[float, float, list]:
    """(vLLM seconds, conversion seconds, Scored per example), each the best of `repeats`."""
    t_vllm, t_conv, scored = 0.0, 0.0, []
    for lo in range(0, len(outputs), CHUNK_EXAMPLES):
        chunk = outputs[lo : lo + CHUNK_EXAMPLES]
        step_lists = steps(chunk)
        best_v = best_c = float("inf")
        for _ in range(repeats):
            gc.collect()
            t0 = clock()
            containers = pythonize(step_lists, k, layout)
            t1 = clock()
            result = convert(containers, chunk, k, layout)
            t2 = clock()
            best_v, best_c = min(best_v, t1 - t0), min(best_c, t2 - t1)
            del containers
        t_vllm += best_v
        t_conv += best_c
        scored.extend(result)
    return t_vllm, t_conv, scored


def metadata(data: dict, k: int):
    from bench.shards import _metadata

    return dataclasses.replace(_metadata(data, k), extra={"bench": "bench.precompute_host"})


def rows(data: dict, scored: list):
    from shards.writer import ShardRow

    poff = data["prompt_off"]
    for i, s in enumerate(scored):
        prompt = data["prompt"][poff[i] : poff[i + 1]]
        yield ShardRow(
            id=f"ex-{i:05d}",
            prompt_ids=prompt,
            teacher_prompt_ids=prompt,
            response_ids=s.token_ids,
            topk_ids=s.topk_ids,
            topk_logprobs=s.topk_logprobs,
            token_logprobs=s.token_logprobs,
        )


def write_seconds(data: dict, scored: list, md, level: int, repeats: int):
    """(best seconds of a whole ShardWriter run, bytes on disk, the files' bytes)."""
    from shards.writer import ShardWriter

    best, size, blobs = float("inf"), 0, None
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp(prefix="kd-host-"))
        try:
            all_rows = list(rows(data, scored))
            gc.collect()
            t0 = clock()
            with ShardWriter(folder, md, compression_level=level) as w:
                for r in all_rows:
                    w.add(r)
            best = min(best, clock() - t0)
            files = sorted(folder.glob("part-*.arrow"))
            size = sum(f.stat().st_size for f in files)
            blobs = [f.read_bytes() for f in files]
        finally:
            shutil.rmtree(folder)
    return best, size, blobs


def encode_and_compress_seconds(scored: list, k: int, vocab: int, level: int, repeats: int):
    """(encode seconds, compress seconds) over the writer's batches of 16,384 tokens."""
    import pyarrow as pa

    from shards import codec

    batches, cur, n = [], [], 0
    for s in scored:
        cur.append(s)
        n += len(s.token_ids)
        if n >= 16384:
            batches.append(cur)
            cur, n = [], 0
    if cur:
        batches.append(cur)
    order = codec.build_rank_order(
        np.concatenate([s.topk_ids.ravel() for s in batches[0]]).astype(np.int64), vocab
    )
    rank_of = codec.invert_order(order)
    book = codec.Codebook.for_k(k)
    zstd = pa.Codec("zstd", compression_level=level)
    args = [
        (
            np.concatenate([s.topk_ids for s in b]),
            np.concatenate([s.topk_logprobs for s in b]),
            np.concatenate([s.token_ids for s in b]),
            np.concatenate([s.token_logprobs for s in b]),
        )
        for b in batches
    ]
    best_e = best_c = float("inf")
    for _ in range(repeats):
        t0 = clock()
        cols = [codec.encode_tokens(*a, rank_of, book) for a in args]
        t1 = clock()
        for c in cols:
            for v in c.values():
                zstd.compress(pa.py_buffer(np.ascontiguousarray(v)))
        t2 = clock()
        best_e, best_c = min(best_e, t1 - t0), min(best_c, t2 - t1)
    return best_e, best_c


def bench_k(data: dict, k: int, levels: list[int], repeats: int) -> dict:
    outputs = engine_outputs(data, k)
    tokens = sum(len(o[0]) for o in outputs)
    log(f"k={k}: {len(outputs)} examples, {tokens} tokens")
    res: dict = {"k": k, "tokens": tokens}
    scored = {}
    for layout in LAYOUTS:
        v, c, scored[layout] = vllm_and_convert(outputs, k, layout, repeats)
        res[layout] = {"vllm_s": v, "convert_s": c}
        log(f"  {layout}: vLLM {v:.2f} s, convert {c:.2f} s")
    for layout in LAYOUTS[1:]:
        for a, b in zip(scored["dicts"], scored[layout], strict=True):
            for name in ("token_ids", "topk_ids", "topk_logprobs", "token_logprobs"):
                if not np.array_equal(getattr(a, name), getattr(b, name)):
                    raise AssertionError(f"k={k}: {layout} and dicts differ in {name}")
    enc, comp = encode_and_compress_seconds(
        scored[DEFAULT], k, int(data["vocab_size"]), DEFAULT_LEVEL, repeats
    )
    res["encode_s"], res["compress_s"] = enc, comp
    md = metadata(data, k)  # one created_at: the paths' files can be compared bytewise
    blobs = {}
    for layout in LAYOUTS:
        w, size, blobs[layout] = write_seconds(data, scored[layout], md, DEFAULT_LEVEL, repeats)
        res[layout]["write_s"] = w
    res["identical_files"] = all(blobs[x] == blobs["dicts"] for x in LAYOUTS)
    res["bytes_per_token"] = size / tokens
    res["levels"] = {}
    for level in levels:
        w, size, _ = write_seconds(data, scored[DEFAULT], md, level, repeats)
        res["levels"][level] = {"write_s": w, "bytes_per_token": size / tokens}
        log(f"  zstd {level}: write {tokens / w / 1e3:.0f}k tok/s, {size / tokens:.1f} B/token")
    return res


def us(seconds: float, tokens: int) -> float:
    return seconds / tokens * 1e6


def report(results: list[dict]) -> str:
    lines = [
        "| k | path | vLLM µs | convert µs | encode µs | compress µs | write µs "
        "| convert tok/s | host tok/s | host+vLLM tok/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        n = r["tokens"]
        for path in LAYOUTS:
            p = r[path]
            rest = p["write_s"] - r["encode_s"] - r["compress_s"]
            host = p["convert_s"] + p["write_s"]
            lines.append(
                f"| {r['k']} | {path}{' (default)' if path == DEFAULT else ''} "
                f"| {us(p['vllm_s'], n):.2f} | {us(p['convert_s'], n):.2f} "
                f"| {us(r['encode_s'], n):.2f} | {us(r['compress_s'], n):.2f} "
                f"| {us(rest, n):.2f} | {n / p['convert_s'] / 1e3:,.0f}k "
                f"| {n / host / 1e3:,.0f}k | {n / (host + p['vllm_s']) / 1e3:,.0f}k |"
            )
    lines += ["", f"{DEFAULT}, by zstd level (bytes/token; host tok/s = convert + writer):", ""]
    levels = list(results[0]["levels"])
    lines.append("| k | " + " | ".join(f"level {lv}" for lv in levels) + " |")
    lines.append("| ---: |" + " ---: |" * len(levels))
    for r in results:
        n, conv = r["tokens"], r[DEFAULT]["convert_s"]
        cells = [
            f"{v['bytes_per_token']:.1f} B, {n / (conv + v['write_s']) / 1e3:.0f}k"
            for v in r["levels"].values()
        ]
        lines.append(f"| {r['k']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=list(KS))
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    p.add_argument("--examples", type=int, default=480, help="gsm_symbolic examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=None, help="model folder (default: as bench.shards)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    from bench.shards import _single_core, teacher_data

    _single_core()
    data = teacher_data(args.examples, args.seed, 8, args.teacher)
    warm = engine_outputs({**data, "response_off": data["response_off"][:2]}, 8)
    for layout in LAYOUTS:  # imports and first calls stay out of the timings
        convert(pythonize(steps(warm), 8, layout), warm, 8, layout)
    results = [bench_k(data, k, args.levels, args.repeats) for k in args.k]
    table = report(results)
    print(table)
    summary = {}
    for r in results:
        if r["k"] == TARGET_K:
            n, f = r["tokens"], r[DEFAULT]
            summary = {
                "layout": DEFAULT,
                "convert_tokens_per_s": n / f["convert_s"],
                "host_tokens_per_s": n / (f["convert_s"] + f["write_s"]),
                "host_and_vllm_tokens_per_s": n / (f["vllm_s"] + f["convert_s"] + f["write_s"]),
                "targets": TARGETS,
            }
    out = {
        "command": "python -m bench.precompute_host " + " ".join(argv or sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "teacher": data["teacher"],
        "results": results,
        "summary_k64": summary,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(checkout_relative(out), indent=1) + "\n")
    log(f"wrote {args.out}")
    if any(not r["identical_files"] for r in results):
        log("the layouts wrote different files")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

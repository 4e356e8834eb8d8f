"""Peak memory and time of forward + backward: chunked top-k KD losses vs the dense way.

    python -m bench.loss_memory --device cpu
    python -m bench.loss_memory --device cuda --V 151936 --tokens 8192 --hidden 1024 \
        --k 64 --chunk 1024

Variants, each on the same random student head (hidden (N, H), weight (V, H)) and teacher
top-k, computing the same loss with the same per-token divergence code (train/losses.py):

* ``dense``: the straightforward implementation: logits = hidden @ W.T for all N tokens,
  float32 log_softmax, gather the top-k, a masked logsumexp for the tail; autograd keeps it
  all for backward.
* ``checkpoint``: the dense computation per chunk of tokens under
  `torch.utils.checkpoint` (recomputes each chunk's logits in backward: one more matmul).
* ``chunked``: `train.losses.kd_loss` on a `LinearHead`: the fused custom autograd
  Function that computes the chunk's gradients in forward (train/chunked.py).

Each variant runs in its own subprocess. Memory is the peak increase over the inputs (and
the weights): on CUDA from `torch.cuda.max_memory_allocated`, on CPU from the kernel's
peak-RSS counter (VmHWM, reset through /proc/self/clear_refs; a sampling thread if that is
refused). The gradients w.r.t. hidden and W are outputs of every variant and are counted.
Prints a Markdown table and writes JSON (default bench/results/loss_memory.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import checkout_relative

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "loss_memory.json"
VARIANTS = ("dense", "checkpoint", "chunked")
LOSSES = {
    "fkl": dict(divergence="forward_kl", tail="tail_bucket"),
    "jsd": dict(divergence="jsd", beta=0.5, tail="tail_bucket"),
}
SIZES = {  # device -> defaults (the CPU ones finish in well under 2 minutes on 2 cores)
    "cuda": dict(V=151936, tokens=8192, hidden=1024, k=64, chunk=1024, dtype="bf16", reps=5),
    "cpu": dict(V=32768, tokens=1024, hidden=256, k=64, chunk=256, dtype="f32", reps=2),
}
MIB = 2**20


# ---- the measured process ----------------------------------------------------------------------


class _CpuPeak:
    """Peak RSS increase of this process over a `with` block."""

    def __enter__(self):
        self.base = self._rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.thread = None
        except OSError:
            self.peak, self.stop = self.base, threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread is None:
            self.peak = self._status("VmHWM")
        else:
            self.stop.set()
            self.thread.join()
        self.increase = self.peak - self.base

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    @classmethod
    def _rss(cls) -> int:
        return cls._status("VmRSS")


def _inputs(args, torch, device, dtype):
    g = torch.Generator().manual_seed(0)
    n, v, h, k = args.tokens, args.V, args.hidden, args.k
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))).to(device, dtype)
    weight.requires_grad_()
    # distinct ids per row: base + j * stride (mod V), stride <= V // k
    base = torch.randint(0, v, (n, 1), generator=g)
    stride = torch.randint(1, max(2, v // k + 1), (n, 1), generator=g)
    ids = (base + torch.arange(k) * stride) % v
    tail_mass = 0.01 + 0.2 * torch.rand(n, generator=g)
    logprobs = (3.0 * torch.randn(n, k, generator=g)).log_softmax(1) + torch.log1p(-tail_mass)[
        :, None
    ]
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = dict(
        ids=ids.to(device),
        logprobs=logprobs.to(device),
        tail_logprob=tail_mass.log().to(device),
        token_logprob=logprobs[:, 0].to(device),
    )
    return hidden, weight, teacher, targets.to(device)


def _worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from train.chunked import LinearHead, student_logprobs
    from train.losses import KDSpec, TeacherSignal, kd_loss, token_loss_fn

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    spec = KDSpec(**LOSSES[args.loss])
    hidden, weight, t, targets = _inputs(args, torch, device, dtype)
    teacher = TeacherSignal(**t)
    loss_fn = token_loss_fn(spec)

    def dense_part(h, w, ids, t_lp, t_tail):
        s = student_logprobs(F.linear(h, w), ids)
        return loss_fn(s, t_lp, t_tail)[0].sum()

    def step():
        if args.variant == "chunked":
            loss = kd_loss(LinearHead(hidden, weight), teacher, spec=spec, chunk_tokens=args.chunk)
            loss = loss.loss
        elif args.variant == "dense":
            loss = dense_part(hidden, weight, t["ids"], t["logprobs"], t["tail_logprob"])
        else:
            loss = 0.0
            for s in range(0, args.tokens, args.chunk):
                sl = slice(s, s + args.chunk)
                loss = loss + checkpoint(
                    dense_part,
                    hidden[sl],
                    weight,
                    t["ids"][sl],
                    t["logprobs"][sl],
                    t["tail_logprob"][sl],
                    use_reentrant=False,
                )
        gh, gw = torch.autograd.grad(loss, [hidden, weight])
        return loss.detach(), gh, gw

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # one warm-up run (allocator, kernels), then timed runs; memory measured on the first
    out = step()
    del out
    sync()
    times, result = [], {}
    for rep in range(args.reps):
        if device.type == "cuda" and rep == 0:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        meter = _CpuPeak() if device.type == "cpu" and rep == 0 else None
        if meter:
            meter.__enter__()
        t0 = time.perf_counter()
        loss, gh, gw = step()
        sync()
        times.append(time.perf_counter() - t0)
        if meter:
            meter.__exit__(None, None, None)
            result["peak_bytes"] = int(meter.increase)
        if device.type == "cuda" and rep == 0:
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        if rep == 0:
            result["loss_per_token"] = float(loss) / args.tokens
            result["grad_hidden_norm"] = float(gh.float().norm())
            result["grad_weight_norm"] = float(gw.float().norm())
        del loss, gh, gw
    result["time_s"] = statistics.median(times)
    result["times_s"] = times
    return result


# ---- the driver --------------------------------------------------------------------------------


def _run_variant(args, loss: str, variant: str) -> dict:
    cmd = [sys.executable, "-m", "bench.loss_memory", "--worker"]
    for key in ("device", "V", "tokens", "hidden", "k", "chunk", "dtype", "reps", "threads"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key}", str(value)]
    cmd += ["--loss", loss, "--variant", variant]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(error=" / ".join(tail) or f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(args) -> dict:
    import torch

    env = dict(torch=torch.__version__, python=platform.python_version(), host=platform.node())
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = args.threads or torch.get_num_threads()
    return env


def _table(args, rows: list[dict]) -> str:
    one = args.tokens * args.V * 4 / MIB
    lines = [
        f"device {args.device}, {args.dtype} head, V={args.V}, tokens={args.tokens}, "
        f"hidden={args.hidden}, k={args.k}, chunk={args.chunk}; one float32 (tokens x V) "
        f"buffer = {one:.0f} MiB, one chunk = {args.chunk * args.V * 4 / MIB:.0f} MiB",
        "",
        "| loss | variant | peak MiB | vs dense | time ms | vs dense | loss/token | "
        "grad-norm rel. diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for loss in dict.fromkeys(r["loss"] for r in rows):
        group = {r["variant"]: r for r in rows if r["loss"] == loss}
        dense = group.get("dense", {})
        for variant, r in group.items():
            if "error" in r:
                lines.append(f"| {loss} | {variant} | error: {r['error'][:80]} | | | | | |")
                continue
            mem, ms = r["peak_bytes"] / MIB, r["time_s"] * 1e3
            rel_mem = rel_time = diff = ""
            if "peak_bytes" in dense:
                rel_mem = f"{r['peak_bytes'] / max(dense['peak_bytes'], 1):.2f}x"
                rel_time = f"{r['time_s'] / dense['time_s']:.2f}x"
                diff = max(
                    abs(r[key] - dense[key]) / max(abs(dense[key]), 1e-30)
                    for key in ("grad_hidden_norm", "grad_weight_norm")
                )
                diff = f"{diff:.1e}"
            lines.append(
                f"| {loss} | {variant} | {mem:.0f} | {rel_mem} | {ms:.1f} | {rel_time} | "
                f"{r['loss_per_token']:.5f} | {diff} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--V", type=int, help="vocabulary size")
    parser.add_argument("--tokens", type=int, help="valid tokens N")
    parser.add_argument("--hidden", type=int, help="hidden size H")
    parser.add_argument("--k", type=int, help="teacher top-k")
    parser.add_argument("--chunk", type=int, help="tokens per chunk")
    parser.add_argument("--dtype", choices=["bf16", "f32"], help="hidden / head dtype")
    parser.add_argument("--reps", type=int, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--losses", default="fkl,jsd", help=f"comma list of {list(LOSSES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    rows = []
    for loss in args.losses.split(","):
        for variant in args.variants.split(","):
            r = _run_variant(args, loss, variant)
            rows.append(dict(loss=loss, variant=variant, **r))
            status = r.get("error") or f"{r['peak_bytes'] / MIB:.0f} MiB, {r['time_s']:.3f} s"
            print(f"  {loss:4s} {variant:10s} {status}", file=sys.stderr, flush=True)
    table = _table(args, rows)
    print(table)
    config = {
        k: getattr(args, k)
        for k in ("device", "V", "tokens", "hidden", "k", "chunk", "dtype", "reps")
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(config=config, env=_env(args), results=rows, table=table)
    args.out.write_text(json.dumps(checkout_relative(payload), indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

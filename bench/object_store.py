"""Read speed of a shard folder on an S3-compatible server next to the same folder on disk.

    python -m bench.object_store [--k 64] [--runs 3] [--out bench/results/object_store.json]

The data is bench.shards' (SmolLM2-135M-Instruct's top-k on gsm_symbolic worked solutions,
cached in bench/cache/), written once with `ShardWriter` defaults into a local folder and
uploaded as is to a moto S3 server (`moto_server`, a separate process on 127.0.0.1; dummy
credentials, nothing reaches AWS). Each figure is `ShardReader` iteration to torch tensors
per row (shuffle off; verify "full" and "none"), a reader built per pass (so a pass includes
listing and reading the manifests), repeated for >= 2 s on one core in a fresh process,
the median of `--runs` processes. The server is an in-memory Python process on the same
machine: it measures the client's cost and protocol overhead, not a network's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench import checkout_relative
from bench.shards import (
    REPO,
    _machine,
    _metadata,
    _rows,
    _single_core,
    _versions,
    log,
    read_speed,
    teacher_data,
)

DEFAULT_OUT = REPO / "bench" / "results" / "object_store.json"
BUCKET = "kdshards-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3_env(port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {
        **env,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }


def speed_worker(folder: str) -> dict:
    _single_core()
    return {"read_full": read_speed(folder, "full"), "read_none": read_speed(folder, "none")}


def _speeds(folder: str, env: dict, runs: int) -> dict:
    cmd = [sys.executable, "-m", "bench.object_store", "--speed-worker", folder]
    results = []
    for _ in range(runs):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for key in ("read_full", "read_none"):
        ranked = sorted(results, key=lambda r: r[key]["tokens_per_s"])
        out[key] = {
            **ranked[len(ranked) // 2][key],
            "runs_tokens_per_s": [r[key]["tokens_per_s"] for r in results],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--examples", type=int, default=480, help="gsm_symbolic examples")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--teacher", default=None, help="model folder (default: bench.shards')")
    parser.add_argument("--speed-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed_worker:
        print(json.dumps(speed_worker(args.speed_worker)))
        return 0

    from shards.writer import ShardWriter

    data = teacher_data(args.examples, 0, 8, args.teacher)
    n_tok = int(data["response_off"][-1])
    port = _free_port()
    env = _s3_env(port)
    server = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="kdshards-bench-") as tmp:
            local = Path(tmp) / f"k{args.k}"
            with ShardWriter(local, _metadata(data, args.k)) as writer:
                for row in _rows(data, args.k):
                    writer.add(row)
            files = writer.files_written
            url = f"s3://{BUCKET}/k{args.k}"
            upload = (
                "import sys, s3fs, time\n"
                "fs = s3fs.S3FileSystem()\n"
                "for _ in range(100):\n"
                "    try:\n"
                f"        fs.mkdir('{BUCKET}'); break\n"
                "    except OSError: time.sleep(0.1)\n"
                f"fs.put(sys.argv[1] + '/', '{BUCKET}/k{args.k}', recursive=True)\n"
            )
            subprocess.run([sys.executable, "-c", upload, str(local)], env=env, check=True)
            log(f"k={args.k}: {len(files)} file(s), {n_tok} tokens; reading ...")
            result = {
                "k": args.k,
                "response_tokens": n_tok,
                "files": len(files),
                "record_batches": sum(len(e.batch_rows) for e in files),
                "file_bytes": sum(e.bytes for e in files),
                "local": _speeds(str(local), env, args.runs),
                "s3_moto": _speeds(url, env, args.runs),
            }
    finally:
        server.kill()
        server.wait()
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.object_store " + " ".join(argv or sys.argv[1:]),
        "machine": _machine(),
        "versions": _versions(),
        "runs": args.runs,
        "result": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(checkout_relative(out), indent=1) + "\n")
    rows = [("local disk", result["local"]), ("S3 (moto, 127.0.0.1)", result["s3_moto"])]
    print("| folder | read tok/s (sha256 verified) | read tok/s (no verify) |")
    print("| --- | ---: | ---: |")
    for name, r in rows:
        print(
            f"| {name} | {r['read_full']['tokens_per_s'] / 1e3:.0f} k "
            f"| {r['read_none']['tokens_per_s'] / 1e3:.0f} k |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

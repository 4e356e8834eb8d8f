"""make onpolicy-live / make onpolicy-two-stage: live on-policy distillation in one command.

    python -m tools.onpolicy.live --shards DIR --out RUN [--two-stage] [--teacher T]
        [--teacher-url URL] [--config configs/train/onpolicy.yaml] [key=value ...]

Live on-policy training needs a teacher server beside the trainer. This starts one (vLLM's
OpenAI-compatible api_server with the teacher, vllm_engine/teacher_server.py) on a free local
port, trains against it, and stops it, also when training fails or is interrupted.
`--teacher-url` uses a server that is already running instead (`make teacher-server`, or one
on another machine). The shards (`make precompute`) give the prompts, in both views. The
key=value overrides go to every training command (model.path=, max_steps=, onpolicy.lmbda=).

--two-stage: SKD from the shards first (configs/train/skd.yaml, into RUN/skd), then
on-policy from SKD's final weights (into RUN/onpolicy); the server starts only for the
second stage. Both stages resume (resume=true): a re-run continues where it stopped.

Multi-GPU training (torchrun, DeepSpeed) stays `make teacher-server` beside
`make train METHOD=onpolicy GPUS=n TEACHER_URL=...`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

PY = sys.executable


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shards", required=True, help="teacher shards: the prompts (make precompute)")
    ap.add_argument("--out", required=True, help="run folder (two-stage: RUN/skd, RUN/onpolicy)")
    ap.add_argument("--two-stage", action="store_true", help="SKD first, then on-policy from it")
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct", help="server's model")
    ap.add_argument("--teacher-url", default="", help="a running teacher server (none started)")
    ap.add_argument("--max-logprobs", type=int, default=64, help="server's cap (>= the k used)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="server's context length")
    ap.add_argument("--config", default="configs/train/onpolicy.yaml", help="on-policy YAML")
    ap.add_argument("--skd-config", default="configs/train/skd.yaml", help="two-stage's first")
    ap.add_argument("overrides", nargs="*", help="key=value for every training command")
    return ap


def final_model(run: Path) -> Path:
    """A finished run's final weights: where the next stage starts."""
    from train.checkpoint import latest_model_dir

    model = latest_model_dir(run)
    if model is None:
        raise SystemExit(f"{run}: finished without a checkpoint (save_every?)")
    return model


def skd_command(args) -> list[str]:
    out = Path(args.out) / "skd"
    return [PY, "-m", "train", args.skd_config, f"data.shards={args.shards}", f"out_dir={out}",
            "resume=true", *args.overrides]  # fmt: skip


def onpolicy_command(args, teacher_url: str) -> list[str]:
    out = Path(args.out) / "onpolicy" if args.two_stage else Path(args.out)
    overrides = list(args.overrides)
    if args.two_stage:  # the student is SKD's result; model.path= was SKD's start
        overrides = [o for o in overrides if not o.startswith("model.path=")]
        overrides.append(f"model.path={final_model(Path(args.out) / 'skd')}")
    return [PY, "-m", "train", args.config, f"data.shards={args.shards}", f"out_dir={out}",
            "resume=true", f"onpolicy.teacher_url={teacher_url}", *overrides]  # fmt: skip


def run(cmd: list[str]) -> None:
    print(f"$ {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:  # the trainer has said why; the server (if any) is stopped on the way out
        raise SystemExit(rc)


def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    if not Path(args.shards).exists():
        raise SystemExit(f"--shards {args.shards}: no such folder (make precompute first)")
    if args.two_stage:
        run(skd_command(args))
    if args.teacher_url:
        run(onpolicy_command(args, args.teacher_url))
        return 0
    from vllm_engine.teacher_server import TeacherServer

    Path(args.out).mkdir(parents=True, exist_ok=True)
    log = Path(args.out) / "teacher-server.log"
    print(f"starting the teacher server ({args.teacher}; log {log})", flush=True)
    with TeacherServer(
        args.teacher, max_model_len=args.max_model_len, max_logprobs=args.max_logprobs, log=log
    ) as server:
        run(onpolicy_command(args, server.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())

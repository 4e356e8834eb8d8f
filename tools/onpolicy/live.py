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
second stage. Both stages resume (resume=true): a re-run continues where it stopped. The
stages run on tools/stages.py: each printed before it runs, the trainer's and the server's
process trees die with this process, kill -9 included.

Multi-GPU training (torchrun, DeepSpeed) stays `make teacher-server` beside
`make train METHOD=onpolicy GPUS=n TEACHER_URL=...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.stages import Runner, Service, Stage, later
from train.checkpoint import latest_model_dir
from vllm_engine.teacher_server import TeacherServer

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
    model = latest_model_dir(run)
    if model is None:
        raise SystemExit(f"{run}: finished without a checkpoint (save_every?)")
    return model


def teacher_service(args) -> Service:
    """The teacher server, started on a free local port for the on-policy stage."""

    def start():
        log = Path(args.out) / "teacher-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"teacher server: {args.teacher}, log {log}", flush=True)
        return TeacherServer(
            args.teacher, max_model_len=args.max_model_len, max_logprobs=args.max_logprobs, log=log
        ).start()

    return Service("teacher server", start)


def stages(args) -> list[Stage]:
    """[skd (two-stage only), onpolicy]. Two-stage's on-policy student is SKD's final
    checkpoint, found when the stage starts; it comes after the overrides, so it wins over
    their model.path= (SKD's start)."""
    out = Path(args.out)
    services = [] if args.teacher_url else [teacher_service(args)]
    url = later(lambda: f"onpolicy.teacher_url={args.teacher_url or services[0]().url}")

    def train(config: str, run: Path, *extra) -> list:
        return [PY, "-m", "train", config, f"data.shards={args.shards}", f"out_dir={run}",
                "resume=true", *extra, *args.overrides]  # fmt: skip

    if not args.two_stage:
        cmd = train(args.config, out, url)
        title = "live on-policy against the teacher server"
        return [Stage("onpolicy", title, cmd=cmd, inputs=[args.shards], services=services)]
    skd = out / "skd"
    return [
        Stage("skd", "SKD from the shards", cmd=train(args.skd_config, skd),
              inputs=[args.shards], outputs=[skd]),
        Stage("onpolicy", "live on-policy from SKD's final weights",
              cmd=[*train(args.config, out / "onpolicy", url),
                   later(lambda: f"model.path={final_model(skd)}")],
              inputs=[args.shards], services=services),
    ]  # fmt: skip


def main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    if not Path(args.shards).exists():
        raise SystemExit(f"--shards {args.shards}: no such folder (make precompute first)")
    # No state file: both trainings resume by themselves (resume=true), a re-run of a
    # finished job changes nothing.
    Runner(None).run(stages(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

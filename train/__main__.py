"""python -m train CONFIG.yaml [key=value ...]: distil a student from a shard folder.

No teacher is loaded: its top-k logprobs come from the shards, or, on-policy
(configs/train/onpolicy.yaml), from a teacher server scoring the student's samples. Several
processes run DDP through torchrun (`make train GPUS=n`, or on CPUs `ACCELERATE_USE_CPU=1
torchrun --nproc_per_node 2 -m train ...`), DeepSpeed with `deepspeed=configs/deepspeed/*.json`;
a plain `python -m train` is one process on the CPU or one GPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from datafiles.formats import InputError
from datafiles.reading import InputFileError
from shards.errors import ShardError
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.config import dump_config, load_config, to_dict
from train.logger import Logger
from train.setup import build_run, evaluate
from train.step import train_step
from vllm_engine.teacher_client import TeacherUnavailable


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    ap.add_argument("config", help="YAML file, e.g. configs/train/skd.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. loss.beta=0.5 max_steps=20")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = build_run(cfg)  # accelerator, student module, optimizer, scheduler, batch source
    acc, source = run.accelerator, run.source
    step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(acc, ckpt)
        step, tokens_seen = state["step"], state["tokens_seen"]
        source.load_state_dict(state["source"])
    if acc.is_main_process:
        dump_config(cfg, run.out_dir / "config.yaml")
        print(f"[train] {run.describe()}; from step {step}", flush=True)
    log = Logger(run.out_dir, cfg.max_steps, step, acc.is_main_process, acc, to_dict(cfg))
    batches = iter(run.loader())

    def save():
        state = {"tokens_seen": tokens_seen, "source": source.state_dict()}
        return save_checkpoint(acc, run.module, run.tokenizer, cfg, step, state)

    last_step = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    while step < last_step:
        t0 = time.time()
        try:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
        except TeacherUnavailable as e:  # on-policy: the teacher server is gone
            raise TeacherUnavailable(f"{e}; saved {save()}, resume=true continues") from e
        stats = train_step(
            micro,
            accelerator=acc,
            module=run.module,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            source=source,
            max_grad_norm=cfg.optim.max_grad_norm,
            deepspeed=run.deepspeed,
        )
        step += 1
        if hasattr(source, "after_step"):  # on-policy: the student engine gets the new weights
            source.after_step(step)
        tokens_seen += stats.tokens
        write = step % cfg.log_every == 0 or step == last_step
        metrics = {}
        if write:  # the step's stats leave the device (and meet across ranks) only here
            metrics = stats.metrics(acc)
            metrics.update(lr=run.scheduler.get_last_lr()[0])
            metrics["tok/s"] = stats.tokens / (time.time() - t0)
        metrics.update(source.pop_metrics())  # on-policy: generation and teacher time
        if cfg.eval_every and step % cfg.eval_every == 0:
            metrics["eval_loss"] = evaluate(run, cfg)
        log.log(step, metrics, write=write)
        if step % cfg.save_every == 0 or step == last_step:
            save()
    log.close()
    if hasattr(source, "close"):  # on-policy: the teacher client's threads, the student engine
        source.close()
    acc.end_training()


def cli() -> None:
    """main(), with damaged shard data and bad prompt rows reported in lines instead of a
    traceback."""
    try:
        main()
    except InputFileError as e:  # onpolicy.prompts: the file as a whole
        sys.exit(f"[train] {e}")
    except InputError as e:  # onpolicy.prompts: its bad rows, FILE:LINE: FIELD: reason each
        lines = [f"[train] {r.message()}" for r in e.rejects[:20]]
        sys.exit("\n".join([*lines, f"[train] {len(e.rejects)} invalid row(s) of {e.total}"]))
    except ShardError as e:
        sys.exit(
            f"[train] stopped on bad shard data: {e}. Find every damaged file with "
            "`python -m tools.shards verify DIR`, restore or regenerate it, and run again "
            "with resume=true to continue from the last checkpoint."
        )


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli()

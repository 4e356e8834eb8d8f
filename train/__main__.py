"""python -m train CONFIG.yaml [key=value ...]: distil a student from a shard folder.

No teacher is loaded: its top-k logprobs come from the shards, or, on-policy
(configs/train/onpolicy.yaml), from a teacher server scoring the student's samples. Launch
with `accelerate launch` for DDP or DeepSpeed (see configs/accelerate/); a plain
`python -m train` is one process on the CPU or one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from shards.errors import ShardError
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.config import dump_config, load_config
from train.logger import Logger
from train.setup import build_run, evaluate, global_sum
from train.teacher_client import TeacherUnavailable


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    ap.add_argument("config", help="YAML file, e.g. configs/train/skd.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. loss.beta=0.5 max_steps=20")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = build_run(cfg)  # accelerator, student module, optimizer, scheduler, batch source
    acc, module, optimizer, scheduler, source = (
        run.accelerator,
        run.module,
        run.optimizer,
        run.scheduler,
        run.source,
    )
    step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(acc, ckpt)
        step, tokens_seen = state["step"], state["tokens_seen"]
        source.load_state_dict(state["source"])
    if acc.is_main_process:
        dump_config(cfg, run.out_dir / "config.yaml")
        print(f"[train] {run.describe()}; from step {step}", flush=True)
    log = Logger(run.out_dir, cfg.max_steps, step, acc.is_main_process)
    batches = iter(run.loader())
    # The loss is a sum over tokens; DDP/DeepSpeed average gradients over ranks (and
    # DeepSpeed over accumulation steps), which this factor undoes, so that the update is
    # the mean over every trained token of the step, wherever it was.
    undo_mean = acc.num_processes * (cfg.grad_accum if run.deepspeed else 1)

    def save():
        state = {"tokens_seen": tokens_seen, "source": source.state_dict()}
        return save_checkpoint(acc, module, run.tokenizer, cfg, step, state)

    last_step = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    while step < last_step:
        t0 = time.time()
        try:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
        except TeacherUnavailable as e:  # on-policy: the teacher server is gone
            raise TeacherUnavailable(f"{e}; saved {save()}, resume=true continues") from e
        n_tokens = global_sum(acc, sum(b.num_tokens for b in micro))
        stats = {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or run.deepspeed else acc.no_sync(module)
            with sync, acc.autocast():
                out = module(batch.to(acc.device))
                acc.backward(out.loss * (undo_mean / max(n_tokens, 1)))
            for k, v in {"loss": out.loss.detach(), **out.stats}.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        grad_norm = acc.clip_grad_norm_(module.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for batch in micro:
            source.update(batch)
        step += 1
        tokens_seen += n_tokens
        sums = {k: global_sum(acc, v) for k, v in stats.items()}
        metrics = {f"{k}": v / max(n_tokens, 1) for k, v in sums.items() if k != "tokens"}
        metrics.update(
            tokens=n_tokens,
            lr=scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
            **{"tok/s": n_tokens / (time.time() - t0)},
            **source.pop_metrics(),  # on-policy: generation and teacher time
        )
        if cfg.eval_every and step % cfg.eval_every == 0:
            metrics["eval_loss"] = evaluate(run, cfg)
        log.log(step, metrics, write=step % cfg.log_every == 0 or step == last_step)
        if step % cfg.save_every == 0 or step == last_step:
            save()
    log.close()
    acc.end_training()


def cli() -> None:
    """main(), with damaged shard data reported in one line instead of a traceback."""
    try:
        main()
    except ShardError as e:
        sys.exit(
            f"[train] stopped on bad shard data: {e}. Find every damaged file with "
            "`python -m tools.shards verify DIR`, restore or regenerate it, and run again "
            "with resume=true to continue from the last checkpoint."
        )


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli()

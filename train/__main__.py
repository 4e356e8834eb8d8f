"""python -m train CONFIG.yaml [key=value ...]: distil a student from a shard folder.

No teacher is loaded: its top-k logprobs come from the shards, or, on-policy
(configs/train/onpolicy.yaml), from a teacher server scoring the student's samples. Several
processes run DDP through torchrun (`make train GPUS=n`, or on CPUs `ACCELERATE_USE_CPU=1
torchrun --nproc_per_node 2 -m train ...`), DeepSpeed with `deepspeed=configs/deepspeed/*.json`;
a plain `python -m train` is one process on the CPU or one GPU. Several machines: torchrun
on each with `--nnodes N --node-rank I` (or `--rdzv-backend c10d --rdzv-endpoint HOST:PORT`),
`make train NNODES=N NODE_RANK=I MASTER_ADDR=HOST`, or tools/slurm/train.sbatch under SLURM.

Config errors (a bad key or value, a run folder written with other settings, shards that do
not fit the student) end with one line, `train: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from datafiles.formats import InputError
from datafiles.reading import InputFileError
from shards.errors import ShardError
from train.checkpoint import load_checkpoint, resume_from, save_checkpoint
from train.config import ConfigError, config_help, dump_config, load_config, to_dict
from train.logger import Logger
from train.setup import build_run, evaluate
from train.step import global_sum, train_step
from vllm_engine.teacher_client import TeacherUnavailable


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=value after the YAML; dotted keys reach into sections):\n"
        + config_help(),
    )
    ap.add_argument("config", help="YAML file, e.g. configs/train/skd.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. loss.beta=0.5 max_steps=20")
    return ap


def epoch_cut(micro: list, num_epochs: int, accelerator) -> tuple[list, bool]:
    """The step's micro-batches without those of epoch `num_epochs` or later (a mixture's: of
    its first folder), and whether the epochs end with this step (on any rank).

    The last step of the epochs trains what is left of them, fewer micro-batches (the update
    is a per-token mean, so that is one smaller step); where a rank has none left, no rank
    takes the step ([] is returned), as DistributedSampler's drop_last would. A collective
    under DDP: every rank calls it."""
    keep = [b for b in micro if not (b.folder == 0 and b.cursor and b.cursor[1] >= num_epochs)]
    if not global_sum(accelerator, float(len(keep) < len(micro))):
        return micro, False
    return ([] if global_sum(accelerator, float(not keep)) else keep), True


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ckpt = resume_from(cfg)  # before anything is built: a refused folder fails fast
    run = build_run(cfg)  # accelerator, student module, optimizer, scheduler, batch source
    acc, source = run.accelerator, run.source
    step, tokens_seen = 0, 0
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
    saved, epochs_end = step, False
    while step < last_step:
        t0 = time.time()
        try:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
        except TeacherUnavailable as e:  # on-policy: the teacher server is gone
            raise TeacherUnavailable(f"{e}; saved {save()}, resume=true continues") from e
        ended = False
        if cfg.num_epochs:
            micro, ended = epoch_cut(micro, cfg.num_epochs, acc)
            epochs_end = ended
            if not micro:  # the next epoch's batches (on some rank): not trained
                break
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
        source.after_step(step)  # on-policy: the student engine gets the new weights
        tokens_seen += stats.tokens
        write = step % cfg.log_every == 0 or step == last_step or ended
        metrics = {}
        if write:  # the step's stats leave the device (and meet across ranks) only here
            metrics = stats.metrics(acc)
            metrics.update(lr=run.scheduler.get_last_lr()[0])
            metrics["tok/s"] = stats.tokens / (time.time() - t0)
        metrics.update(source.pop_metrics())  # on-policy: generation and teacher time
        if cfg.eval_every and step % cfg.eval_every == 0:
            metrics["eval_loss"] = evaluate(run, cfg)
        log.log(step, metrics, write=write)
        if step % cfg.save_every == 0 or step == last_step or ended:
            save()
            saved = step
        if ended:
            break
    if epochs_end and step != saved:
        save()
    overlong = source.pop_metrics()
    keys = ("overlong_rows", "overlong_tokens", "overlong_skipped_rows")
    counts = [int(global_sum(acc, overlong.get(k, 0))) for k in keys]
    if acc.is_main_process:
        if epochs_end:
            print(f"[train] num_epochs={cfg.num_epochs} done after {step} steps", flush=True)
        if counts[0]:
            what = {"skip": " skipped", "truncate": " truncated"}.get(cfg.data.overlong)
            if cfg.data.overlong == "drop_turns":
                what = f": {counts[0] - counts[2]} shortened by dropping turns, {counts[2]} skipped"
            print(
                f"[train] data.overlong={cfg.data.overlong}: {counts[0]} rows longer than "
                f"data.max_length={cfg.data.max_length}{what} ({counts[1]} tokens)",
                flush=True,
            )
    log.close()
    source.close()  # on-policy: the teacher client's threads, the student engine
    acc.end_training()


def cli() -> None:
    """main(), with config errors, damaged shard data and bad prompt rows reported in lines
    instead of a traceback."""
    try:
        main()
    except ConfigError as e:
        fail(str(e))
    except InputFileError as e:  # onpolicy.prompts: the file as a whole
        sys.exit(f"[train] {e}")
    except InputError as e:  # onpolicy.prompts: its bad rows, FILE:LINE: FIELD: reason each
        lines = [f"[train] {r.message()}" for r in e.rejects[:20]]
        sys.exit("\n".join([*lines, f"[train] {len(e.rejects)} invalid row(s) of {e.total}"]))
    except ShardError as e:
        # A ShardError re-raised from a DataLoader worker keeps its text, not its attributes.
        field = e.field or next(iter(re.findall(r"field '([^']+)'", str(e))), None)
        if field == "tokenizer_fingerprint":
            fail(
                f"the shards were written for another tokenizer than the student's ({e}); "
                "train a student that has the teacher's tokenizer, or write the shards again "
                "with `python -m precompute --student <this student>`"
            )
        if field in ("prompt_ids+response_ids", "meta.crosstok", "vocabulary"):
            # data.overlong=error; a teacher-vocabulary row the student cannot take, or a
            # folder whose teacher tokenizer cannot be found: the line says which and why.
            fail(str(e))
        sys.exit(
            f"[train] stopped on bad shard data: {e}. Find every damaged file with "
            "`python -m tools.shards verify DIR`, restore or regenerate it, and run again "
            "with resume=true to continue from the last checkpoint."
        )


def fail(message: str) -> None:
    print(f"train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli()

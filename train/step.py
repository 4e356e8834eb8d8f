"""One optimizer step over a step's micro-batches: the unit the training loop repeats.

The update of a step is the mean, over every trained token of the step on every rank, of the
loss gradient. The losses return sums (train/losses.py), so each micro-batch's backward is
scaled by 1 / (the step's global token count). DDP averages gradients over ranks, and
DeepSpeed also over its accumulation steps; `undo_mean` multiplies that averaging away, so the
update does not depend on how the step's tokens were split across ranks and micro-batches
(tests/test_train_step.py checks both splits against one batch).

The step's statistics stay on the device as sums; `StepStats.metrics` turns them into
per-token means with one all-reduce, called on log steps only, so a step that is not logged
syncs neither the device nor the ranks for them. The one collective every step needs is the
global token count, before the first backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from train.batches import Batch, BatchSource


@dataclass
class StepStats:
    """What a step leaves for logging.

    sums: this rank's float64 sums over the step's micro-batches, on the device: "loss" and
        the loss's stats ("kd", "ce", "gate"; see train.losses.LossOutput).
    tokens: trained tokens of the step, all ranks together (a float, as reduced).
    grad_norm: the gradient norm before clipping (None where DeepSpeed clips by itself).
    """

    sums: dict[str, torch.Tensor]
    tokens: float
    grad_norm: torch.Tensor | float | None

    def metrics(self, accelerator) -> dict[str, float]:
        """Per-token means over all ranks, the token count and the gradient norm.

        A collective under DDP (one all-reduce of every sum at once): every rank calls it.
        """
        # Sorted: the same order on every rank, whichever folder of a mixture each drew first.
        names = sorted(self.sums)
        sums = torch.stack([self.sums[k] for k in names])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        values = sums.tolist()
        out = {k: v / max(self.tokens, 1) for k, v in zip(names, values, strict=True)}
        out["tokens"] = self.tokens
        out["grad_norm"] = float(self.grad_norm) if self.grad_norm is not None else 0.0
        return out


def train_step(
    micro: list[Batch],
    *,
    accelerator,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    source: BatchSource,
    max_grad_norm: float,
    deepspeed: bool,
) -> StepStats:
    """Forward and backward of each micro-batch, clip, optimizer and scheduler step.

    micro: this rank's micro-batches of the step (grad_accum of them). After the optimizer
    step each is handed to `source.update`: the batch source's after-step hook (its resume
    position; anything that must see the new weights belongs there).
    """
    tokens = global_sum(accelerator, sum(b.num_tokens for b in micro))
    undo_mean = accelerator.num_processes * (len(micro) if deepspeed else 1)
    scale = undo_mean / max(tokens, 1)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        # DDP all-reduces gradients on the last micro-batch only; DeepSpeed handles its own.
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(module)
        with sync, accelerator.autocast():
            out = module(batch.to(accelerator.device))
            accelerator.backward(out.loss * scale)
        for k, v in {"loss": out.loss.detach(), **out.stats}.items():
            if k != "tokens":  # counted exactly above
                sums[k] = sums.get(k, 0) + v.to(torch.float64)
    grad_norm = accelerator.clip_grad_norm_(module.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    for batch in micro:
        source.update(batch)
    return StepStats(sums, tokens, grad_norm)


def global_sum(accelerator, value: float) -> float:
    """`value` summed over ranks (a collective under DDP), as a Python float."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor(float(value), device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum"))

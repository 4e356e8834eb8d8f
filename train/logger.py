"""Metrics to a JSONL file, TensorBoard and a tqdm bar (main process only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class Logger:
    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(out / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, write: bool = True) -> None:
        """Advance the bar; with `write`, also append to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        if write:
            record = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        self.bar.update(1)
        shown = {k: metrics[k] for k in ("loss", "tok/s", "gate") if k in metrics}
        if shown:  # steps that are not written keep the last written values on the bar
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()

"""Metrics to a JSONL file, TensorBoard, the trackers asked for, and one progress line.

metrics.jsonl and TensorBoard are always written (main process only). `log_with` (e.g.
"wandb,mlflow") adds experiment trackers through accelerate's own (`Accelerator(log_with=)`,
`init_trackers`, `log`): W&B, MLflow, trackio, and the others accelerate knows. Each reads
its usual environment: WANDB_MODE / WANDB_PROJECT, MLFLOW_TRACKING_URI, and so on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from accelerate import tracking
from torch.utils.tensorboard import SummaryWriter

from runtime.progress import progress

PROJECT = "kdshards"
TRACKERS = ("wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


def tracker_names(spec: str, where: str = "log_with") -> list[str]:
    """The tracker names in a comma-separated `spec`; unknown or uninstalled ones refused."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(
            f"{where}: unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)} "
            "(metrics.jsonl and TensorBoard are always written)"
        )
    if names:
        # Through the module, not a name bound at import: tests patch what is installed.
        available = {str(t) for t in tracking.get_available_trackers()}
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(
                f"{where}: {', '.join(missing)} not installed (pip install 'kdshards[trackers]'"
                " or the package by name)"
            )
    return names


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"loss": {"beta": 0.5}} -> {"loss.beta": 0.5}: trackers such as MLflow want flat params."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def start_trackers(accelerator, out_dir: Path, config: dict | None) -> None:
    """accelerate's init_trackers for the trackers the Accelerator was built with."""
    name = out_dir.resolve().name
    accelerator.init_trackers(
        PROJECT,
        config=flat_config(config or {}),
        init_kwargs={
            "wandb": {"name": name, "dir": str(out_dir)},
            "mlflow": {"run_name": name},
            "trackio": {"name": name},
        },
    )


def keep_until(path: Path, step: int) -> None:
    """Drop the records after `step` from a metrics.jsonl: steps a killed run logged after its
    last checkpoint (or all, on a fresh start) are trained and logged again, not twice."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


class Logger:
    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        accelerator=None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        keep_until(out / "metrics.jsonl", start_step)
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(out / "tensorboard"))
        self.acc = accelerator if accelerator is not None and accelerator.log_with else None
        if self.acc is not None:
            start_trackers(self.acc, out, config)
        self.bar = progress(total_steps, "train", "step", initial=start_step)
        self.t0 = time.time()

    def log(self, step: int, metrics: dict, write: bool = True) -> None:
        """Advance the bar; with `write`, also append to metrics.jsonl, TensorBoard and the
        trackers."""
        if not self.enabled:
            return
        if write:
            record = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            if self.acc is not None:
                self.acc.log(scalars, step=step)
        self.bar.update(1)
        shown = {k: metrics[k] for k in ("loss", "tok/s", "gate") if k in metrics}
        if shown:  # steps that are not written keep the last written values on the bar
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()

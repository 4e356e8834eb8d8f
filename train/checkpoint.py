"""Checkpoints: everything needed to continue a run as if it had not stopped.

<out_dir>/checkpoints/step-<N>/
  accelerate/              model, optimizer, scheduler and RNG states (accelerate.save_state,
                           which also handles DeepSpeed's sharded states)
  trainer_rank<r>.json     step, tokens seen and the batch source's position, per rank
  model/                   the student (or its LoRA adapter) + tokenizer, for evaluation
  config.yaml              the resolved config
<out_dir>/checkpoints/latest   name of the newest complete checkpoint (written last)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from train.config import dump_config


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(accelerator, module, tokenizer, cfg, step: int, trainer_state: dict) -> Path:
    root = checkpoint_root(cfg.out_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    rank = accelerator.process_index
    (tmp / f"trainer_rank{rank}.json").write_text(json.dumps({"step": step, **trainer_state}))
    # Collective under ZeRO-3 (gathers the shards): every rank must call it.
    full = accelerator.get_state_dict(module)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lm = accelerator.unwrap_model(module).lm
        lm_state = {k.removeprefix("lm."): v for k, v in full.items()}
        lm.save_pretrained(tmp / "model", state_dict=lm_state)
        tokenizer.save_pretrained(tmp / "model")
        dump_config(cfg, tmp / "config.yaml")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(final.name)
        (root / "latest.tmp").rename(root / "latest")
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = checkpoint_root(out_dir)
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if path.exists() else None


def latest_model_dir(out_dir: str | Path) -> Path | None:
    """The student saved by a run's newest complete checkpoint (None before the first)."""
    latest = latest_checkpoint(out_dir)
    return None if latest is None else checkpoint_model_dir(latest)


def is_run(path: str | Path) -> bool:
    """A training run's folder: it has a complete checkpoint."""
    return latest_checkpoint(path) is not None


def is_checkpoint(path: str | Path) -> bool:
    """One checkpoint's folder (step-<N>/), with its saved model."""
    model = checkpoint_model_dir(path)
    return (model / "config.json").exists() or (model / "adapter_config.json").exists()


def checkpoint_model_dir(checkpoint: str | Path) -> Path:
    """The student (or its LoRA adapter) + tokenizer saved in a checkpoint."""
    return Path(checkpoint) / "model"


def checkpoint_config(checkpoint: str | Path) -> dict:
    """The resolved training config saved with a checkpoint, as plain YAML data."""
    import yaml

    return yaml.safe_load((Path(checkpoint) / "config.yaml").read_text())


def checkpoint_run(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to, or None for a checkpoint copied elsewhere."""
    root = Path(checkpoint).parent
    return root.parent if root.name == "checkpoints" else None


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model/optimizer/scheduler/RNG; return this rank's trainer state."""
    accelerator.load_state(str(path / "accelerate"))
    state_file = path / f"trainer_rank{accelerator.process_index}.json"
    if not state_file.exists():
        raise FileNotFoundError(
            f"{state_file}: the checkpoint was saved with fewer processes than this run has"
        )
    return json.loads(state_file.read_text())

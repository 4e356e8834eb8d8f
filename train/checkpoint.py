"""Checkpoints: everything needed to continue a run as if it had not stopped.

<out_dir>/checkpoints/step-<N>/
  accelerate/              model, optimizer, scheduler and RNG states (accelerate.save_state,
                           which also handles DeepSpeed's sharded states)
  trainer_rank<r>.json     step, tokens seen and the batch source's position, per rank
  model/                   the student (or its LoRA adapter) + tokenizer, for evaluation
  config.yaml              the resolved config
<out_dir>/checkpoints/latest   name of the newest complete checkpoint (written last)

With save_total_limit = n, a save deletes the checkpoints older than the n newest only after
the new one is complete (renamed into place and named by `latest`), so a run killed at any
moment still has a complete checkpoint to resume from.

`resume_from` decides, from `resume` and the folder, where a run starts: a folder with
checkpoints continues (resume=auto/true) or is refused (resume=false); a folder written with
other settings is refused in one line naming the keys that differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from train.config import ConfigError, TrainConfig, dump_config, to_dict
from train.logger import flat_config

# Keys that say how long or how a job runs, not what it computes: a run may continue with
# other values (a longer max_steps, another stop_at, more frequent saves).
RESUMABLE_KEYS = {
    "out_dir",
    "max_steps",
    "num_epochs",
    "stop_at",
    "resume",
    "log_every",
    "save_every",
    "save_total_limit",
    "eval_every",
    "eval_batches",
    "log_with",
    "data.eval_shards",
    "data.verify",
    "onpolicy.timeout_s",
    "onpolicy.retries",
    "onpolicy.backoff_s",
    "onpolicy.max_backoff_s",
    "onpolicy.give_up_after_s",
    # Where the teacher is reached and how (a resumed run may find it on another machine).
    "onpolicy.teacher_api_key_env",
    "onpolicy.teacher_ca_file",
    # A copy of the samples on the side: where it goes does not change the training.
    "onpolicy.write_shards",
}


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
        if cfg.save_total_limit:
            prune_checkpoints(cfg.out_dir, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Delete the complete checkpoints older than the `keep` newest; return what went.

    Only checkpoints older than `latest` go (never `latest` itself, nor a folder still being
    written, which is a .step-*.tmp). Each is renamed out of the step-* names first, so that a
    kill during the deletion leaves no half-deleted folder that looks like a checkpoint."""
    latest = latest_checkpoint(out_dir)
    if latest is None or keep < 1:
        return []
    root = checkpoint_root(out_dir)
    done = sorted(
        (p for p in root.glob("step-*") if p.is_dir() and step_of(p) <= step_of(latest)),
        key=step_of,
    )
    gone = done[: max(len(done) - keep, 0)]
    for p in gone:
        doomed = root / f".{p.name}.deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        p.rename(doomed)
        shutil.rmtree(doomed)
    for p in root.glob(".step-*.deleting"):  # left by a kill during an earlier deletion
        shutil.rmtree(p, ignore_errors=True)
    return gone


def config_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """`key: saved -> now` for each key, outside RESUMABLE_KEYS, that differs. A key the
    saved config lacks (written by an older version) counts with its default."""
    now = flat_config(to_dict(cfg))
    before = {**flat_config(to_dict(TrainConfig())), **flat_config(saved)}
    # The teacher server's address may change (a re-run starts a new server); on-policy
    # switched on or off does change the run.
    for d in (now, before):
        d["onpolicy.teacher_url"] = "on" if d.get("onpolicy.teacher_url") else "off"
    return [
        f"{k}: {before.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE_KEYS and before.get(k) != v
    ]


def resume_from(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), by `cfg.resume`.

    Refuses, as a ConfigError: resume=false on a folder with checkpoints (it would be
    overwritten), and a folder whose run was written with other settings."""
    out = Path(cfg.out_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and cfg.resume == "false":
        raise ConfigError(
            f"{out} already holds a run (latest checkpoint {ckpt.name}) and resume=false "
            "would overwrite it: choose another out_dir, or resume=auto to continue it"
        )
    saved_file = ckpt / "config.yaml" if ckpt is not None else out / "config.yaml"
    if saved_file.exists():
        changes = config_changes(yaml.safe_load(saved_file.read_text()) or {}, cfg)
        if changes:
            raise ConfigError(
                f"{out} holds a run with other settings ({saved_file}): {'; '.join(changes)}; "
                "run with the same settings to continue it, or choose another out_dir"
            )
    return ckpt


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

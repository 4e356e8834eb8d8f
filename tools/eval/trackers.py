"""Evaluation results to experiment trackers (`python -m tools.eval --log-with wandb,mlflow`).

Through accelerate's trackers, as training does (train/logger.py): one run per evaluation,
named after the report folder, with the settings as its config and, per model, each task's
mean score and the generation speed, as `<model>/<task>` and `<model>/tokens_per_s`.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from train.logger import PROJECT, flat_config, tracker_names


def result_metrics(results: list[dict]) -> dict[str, float]:
    """{"<model>/<task>": mean score, "<model>/tokens_per_s": ...} over the models."""
    out = {}
    for r in results:
        for task, t in r["tasks"].items():
            out[f"{r['name']}/{task}"] = float(t["mean"])
        out[f"{r['name']}/tokens_per_s"] = float(r["tokens_per_s"])
        out[f"{r['name']}/mean_response_tokens"] = float(r["mean_response_tokens"])
    return out


def log_results(log_with: str, out_dir: Path, results: list[dict], settings: dict) -> None:
    names = tracker_names(log_with, "--log-with")
    if not names:
        return
    acc = Accelerator(cpu=True, log_with=names, project_dir=str(out_dir))
    name = f"eval-{Path(out_dir).resolve().name}"
    acc.init_trackers(
        PROJECT,
        config=flat_config(settings),
        init_kwargs={
            "wandb": {"name": name, "dir": str(out_dir), "job_type": "eval"},
            "mlflow": {"run_name": name},
            "trackio": {"name": name},
        },
    )
    acc.log(result_metrics(results), step=0)
    acc.end_training()

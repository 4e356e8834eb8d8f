"""Shared by the precompute tests: a small question set and configs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from precompute.config import load_config
from shards.reader import ShardFolder

K = 8
MAX_LEN = 256


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def questions(n: int = 12) -> list[dict]:
    return [
        {
            "question": f"What is {i} + {i + 3}?",
            "experience": "Add the two numbers." if i % 2 else None,
            "answer": f"{i} + {i + 3} = {2 * i + 3}.",
        }
        for i in range(n)
    ]


def cfg(teacher: Path, data: Path, out: Path, *overrides: str):
    return load_config(
        None,
        [
            f"teacher={teacher}",
            f"data.path={data}",
            f"out={out}",
            f"k={K}",
            "sampling.max_tokens=12",
            f"engine.max_model_len={MAX_LEN}",
            "commit_every=4",
            "progress=false",
            *overrides,
        ],
    )


def all_rows(folder: Path) -> list[dict]:
    """Every row of a folder, after verifying each file against the manifest."""
    sf = ShardFolder(folder)
    rows = []
    for fi, entry in enumerate(sf.manifest.files):
        sf.verify_file(fi)
        for bi in range(len(entry.batch_rows)):
            block = sf.read_block(fi, bi)
            rows.extend({**block.row(i), "file": entry.name} for i in range(len(block)))
    return rows


def hf_logprobs(model, prompt, response) -> np.ndarray:
    """(T, V) float32 log_softmax of the transformers model teacher-forced on the response."""
    import torch

    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[len(prompt) - 1 : len(prompt) + len(response) - 1].numpy()


def kill_after_first_commit(worker: int, events: list):
    """A precompute job's on_event hook: SIGKILLs `worker`'s process once, after its first
    commit; records every event in `events` and the killing one in `hook.killed`."""
    import os
    import signal

    def hook(ev):
        if ev["worker"] == worker and ev["summary"]["examples"] > 0 and not hook.killed:
            os.kill(ev["pid"], signal.SIGKILL)
            hook.killed.append(ev)
        events.append(ev)

    hook.killed = []
    return hook

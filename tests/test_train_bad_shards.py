"""Training that meets damaged shards, even with data.verify=none and in a DataLoader worker,
stops with one line naming the file and the record batch, not a traceback or wrong data."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from shards.reader import ShardFolder
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.shards_helpers import REPO
from tests.train_helpers import write_teacher_shards


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_batch_stops_training_with_one_line(tmp_path, workers):
    shards = write_teacher_shards(tmp_path / "s", tiny_model_dir(), examples=24)
    entry = ShardFolder(shards).manifest.files[0]
    assert len(entry.batch_rows) >= 2
    p = shards / entry.name
    data = bytearray(p.read_bytes())
    lo, hi = entry.batch_offsets[1], entry.batch_offsets[2]
    data[(lo + hi) // 2] ^= 0x01  # record batch 1
    p.write_bytes(bytes(data))
    student = build_tiny_model(tmp_path / "student", seed=7)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "configs/train/skd.yaml",
            f"model.path={student}",
            f"data.shards={shards}",
            f"out_dir={tmp_path / 'run'}",
            "data.verify=none",
            f"data.num_workers={workers}",
            "data.batch_tokens=256",
            "max_steps=50",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Progress lines share stderr: look for the message.
    (line,) = re.findall(r"\[train\] stopped on bad shard data: .*", proc.stderr)
    assert str(p) in line and "record batch 1 " in line and "resume=true" in line

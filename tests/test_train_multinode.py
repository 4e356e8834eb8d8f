"""Training on two "nodes": tools/slurm/train.sbatch starts torchrun on each node, which meet
at a c10d rendezvous; here srun is a stand-in that starts the script's command twice on this
machine (rendezvous on localhost, gloo). The weights after the run equal a one-process run over
the same global batches: one process with two DataLoader workers reads the same two row shards
as the two ranks (rank r and worker r both read shard r) and takes one micro-batch of each per
step (grad_accum=2), which the step's per-token mean makes the same update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.shards_helpers import REPO
from tests.test_train_step import free_port
from tests.train_helpers import write_teacher_shards

SBATCH = REPO / "tools" / "slurm" / "train.sbatch"

# srun: drop its options, start the command once per node in parallel, fail if any fails.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
    SLURM_NODEID=$node "$@" > "$LOGS/node$node.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo localhost
"""


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model" / "model.safetensors")


@pytest.mark.slow  # three trainer processes and a rendezvous: about a minute on 2 cores
def test_two_nodes_under_the_sbatch_script_equal_one_process(tmp_path):
    shards = write_teacher_shards(tmp_path / "s", tiny_model_dir(), examples=32)
    student = build_tiny_model(tmp_path / "student", seed=7)
    common = [
        "configs/train/jsd.yaml",
        f"model.path={student}",
        f"data.shards={shards}",
        "data.batch_tokens=256",
        "data.sort_window=8",
        "optim.warmup_steps=0",
        "optim.lr=3e-3",
        "max_steps=3",
        "save_every=3",
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "VENV": str(Path(sys.executable).parent.parent),
        "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "4242",
        "LOGS": str(tmp_path),
    }
    two = tmp_path / "two-nodes"
    proc = subprocess.run(
        ["bash", str(SBATCH), *common, f"out_dir={two}", "grad_accum=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-6000:]
    assert "2 process(es)" in logs  # one world of two ranks, not two runs of one
    one = tmp_path / "one-process"
    single = subprocess.run(
        [sys.executable, "-m", "train", *common, f"out_dir={one}"]
        + ["grad_accum=2", "data.num_workers=2"],
        cwd=REPO,
        # One thread, as each node's process: the same kernels, the same rounding.
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = weights(two, 3), weights(one, 3)
    start = load_file(student / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

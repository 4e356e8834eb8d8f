"""Experiment trackers (W&B offline, MLflow file store) through accelerate, and the progress
line: what training and evaluation log must arrive there, read back from the trackers' own
files; logs that are not a terminal get plain lines."""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

import pytest

from runtime.progress import LineProgress, line_progress_factory, progress
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.train_helpers import write_teacher_shards
from train.config import load_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_teacher_shards(
        tmp_path_factory.mktemp("shards") / "s", tiny_model_dir(), examples=12, new_tokens=8
    )


def train(tmp_path: Path, shards: Path, *extra: str) -> tuple[Path, list[dict]]:
    from train.__main__ import main

    out = tmp_path / "run"
    student = build_tiny_model(tmp_path / "student", seed=7)
    main(
        [
            "configs/train/skd.yaml",
            f"model.path={student}",
            f"data.shards={shards}",
            f"out_dir={out}",
            "data.batch_tokens=256",
            "max_steps=3",
            "save_every=3",
            *extra,
        ]
    )
    return out, [json.loads(line) for line in open(out / "metrics.jsonl")]


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (run-*.wandb: a LevelDB-style log of
    32 KiB blocks after a 7-byte header, each record in FULL or FIRST/MIDDLE/LAST pieces)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(out_dir: Path, timeout_s: float = 60.0) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run under out_dir/wandb.

    W&B's service process writes the file after `finish()` returns, so this waits for the
    run's exit record (on a loaded machine the file was seen still empty at first)."""
    (run_file,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(wandb_records(run_file))
        except Exception:  # still being written: a partial header or record
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {timeout_s} s"
        time.sleep(0.1)

    def items(entries):  # a key is either `key` or a path in `nested_key`
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in entries}

    config, history = {}, []
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "config":
            config.update(items(r.config.update))
        elif kind == "history":
            history.append(items(r.history.item))
    return config, history


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow 3 refuses a new file store unless told (its database stores need SQLAlchemy).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return mlflow.tracking.MlflowClient(uri)


def test_training_logs_to_wandb_offline(tmp_path, shards, wandb_offline):
    out, log = train(tmp_path, shards, "log_with=wandb")
    config, history = wandb_history(out)
    assert config["loss.divergence"] == "forward_kl" and config["max_steps"] == 3
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, r in zip(history, log, strict=True):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert h["tok/s"] == pytest.approx(r["tok/s"], rel=1e-12)


def test_training_logs_to_mlflow_file_store(tmp_path, shards, mlflow_store):
    out, log = train(tmp_path, shards, "log_with=mlflow")
    exp = mlflow_store.get_experiment_by_name("kdshards")
    (run,) = mlflow_store.search_runs([exp.experiment_id])
    assert run.info.run_name == out.name
    assert run.data.params["loss.divergence"] == "forward_kl"
    history = mlflow_store.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in log], rel=1e-12)


def results():
    return [
        {
            "name": name,
            "tasks": {"math": {"mean": mean}},
            "tokens_per_s": 100.0 + i,
            "mean_response_tokens": 20.0,
        }
        for i, (name, mean) in enumerate([("teacher-qe", 0.75), ("skd", 0.5)])
    ]


def test_evaluation_logs_to_wandb_offline(tmp_path, wandb_offline):
    from tools.eval.trackers import log_results

    log_results("wandb", tmp_path / "report", results(), {"examples": 4, "backend": "hf"})
    config, history = wandb_history(tmp_path / "report")
    assert config["examples"] == 4
    (h,) = history
    assert h["teacher-qe/math"] == 0.75 and h["skd/math"] == 0.5
    assert h["skd/tokens_per_s"] == 101.0


def test_evaluation_logs_to_mlflow_file_store(tmp_path, mlflow_store):
    from tools.eval.trackers import log_results

    log_results("mlflow", tmp_path / "report", results(), {"examples": 4})
    exp = mlflow_store.get_experiment_by_name("kdshards")
    (run,) = mlflow_store.search_runs([exp.experiment_id])
    assert run.data.metrics["teacher-qe/math"] == 0.75
    assert run.data.metrics["skd/tokens_per_s"] == 101.0


def test_unknown_or_missing_tracker_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="log_with: unknown tracker neptune"):
        load_config("configs/train/skd.yaml", ["log_with=wandb,neptune"])
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match="log_with: mlflow not installed"):
        load_config("configs/train/skd.yaml", ["log_with=mlflow"])


def test_progress_is_plain_lines_off_a_terminal():
    out = io.StringIO()
    bar = progress(40, "train", "step", file=out, interval=3600)
    assert isinstance(bar, LineProgress)
    for _ in range(40):
        bar.update(1)
        bar.set_postfix({"tok/s": "1.2e+03"})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # The first line and the last, nothing between within the interval.
    assert len(lines) == 2, lines
    assert lines[0].startswith("train:   0%") and "0/40" in lines[0]
    assert "40/40" in lines[1] and "tok/s=1.2e+03" in lines[1] and "step/s" in lines[1]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = progress(3, "train", "step", file=tty)
    assert not isinstance(bar, LineProgress)
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()


def test_progress_factory_takes_tqdm_calls_as_vllm_makes_them():
    """vLLM calls its `use_tqdm` factory both ways: tqdm(total=..., postfix=...) for the bar
    and tqdm(iterable, desc=...) around its requests."""
    out = io.StringIO()
    make = line_progress_factory()
    assert list(make(["a", "b", "c"], desc="Adding requests", file=out)) == ["a", "b", "c"]
    bar = make(total=2, desc="Processed prompts", dynamic_ncols=True, postfix="x", file=out)
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("Processed prompts: 100%") and "2/2" in lines[-1]
    assert any(line.startswith("Adding requests: 100%") and "3/3" in line for line in lines)

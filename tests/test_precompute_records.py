"""What precompute keeps in the folder besides shards (its config, its rejected rows) is
committed data: listed with a checksum in the writer's manifest, append-only, never lost by a
refused or resumed run; a fresh folder verifies with no warning (transformers backend on the
tiny model)."""

from __future__ import annotations

import json

import pytest

from precompute.hf_backend import HFBackend
from precompute.run import run
from shards.errors import ShardError
from shards.manifest import load_manifest
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import K, cfg, questions, write_jsonl
from tools import shards as cli


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def hf(tiny):
    return HFBackend(str(tiny), K, batch_size=16)


def verify(capsys, folder) -> tuple[int, list[str]]:
    code = cli.main(["verify", str(folder)])
    return code, capsys.readouterr().out.splitlines()


def rejects_of(folder) -> list[dict]:
    out = []
    for name in sorted(p.name for p in folder.glob("rejects-*.jsonl")):
        out += [json.loads(line) for line in (folder / name).read_text().splitlines()]
    return out


def test_fresh_folder_verifies_without_a_warning(tiny, hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(6) + ["{oops"])
    out = tmp_path / "out"
    run(cfg(tiny, data, out, "skip_invalid=true", "sampling.temperature=0"), backend=hf)
    code, lines = verify(capsys, out)
    assert code == 0 and len(lines) == 1 and lines[0].startswith("ok:"), lines
    kinds = sorted(e.kind for e in load_manifest(out).extras)
    assert kinds == ["precompute_config", "rejects"]


def test_config_file_is_covered_by_the_manifest(tiny, hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(4))
    out = tmp_path / "out"
    run(cfg(tiny, data, out, "sampling.temperature=0"), backend=hf)
    (config,) = out.glob("precompute_config-*.yaml")
    config.write_bytes(config.read_bytes()[:-20])  # truncated
    code, lines = verify(capsys, out)
    assert code == 1
    assert any(line.startswith(f"BAD  {config.name}: ") for line in lines), lines


def test_refused_run_keeps_the_earlier_rejects(tiny, hf, tmp_path):
    """A run refused for other settings writes nothing, in particular no rejects file over
    the earlier run's."""
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", questions(4) + ["{first bad row"])
    run(cfg(tiny, first, out, "skip_invalid=true", "sampling.temperature=0"), backend=hf)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert [r["row"] for r in rejects_of(out)] == ["{first bad row"]
    other = write_jsonl(tmp_path / "b.jsonl", questions(4) + ["{other bad row"])
    with pytest.raises(ShardError, match="other settings"):
        run(cfg(tiny, other, out, "skip_invalid=true", "k=4"), backend=hf)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resumed_run_keeps_rejects_once(tiny, hf, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", questions(6) + ["{bad", {"question": None}])
    out = tmp_path / "out"
    c = cfg(tiny, data, out, "skip_invalid=true", "sampling.temperature=0", "data.limit=3")
    assert run(c, backend=hf).rejects == 2
    c = cfg(tiny, data, out, "skip_invalid=true", "sampling.temperature=0")
    # data.limit is not part of the folder's identity: the second run completes the folder.
    s = run(c, backend=hf)
    assert (s.examples, s.skipped_done) == (3, 3)
    assert sorted(r["row"] for r in rejects_of(out)) == sorted(['{"question": null}', "{bad"])
    # The second run's config differs (data.limit): both are kept, in order.
    configs = sorted(p.name for p in out.glob("precompute_config-*.yaml"))
    assert configs == ["precompute_config-w0-00000.yaml", "precompute_config-w0-00001.yaml"]
    assert verify(capsys, out)[0] == 0

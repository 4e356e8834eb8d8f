"""Precompute end to end with the real vLLM CPU engine on the tiny model (float32).

One engine for the module (start-up is most of the cost). vLLM's CPU engine runs in spawned
processes; inside pytest that works with VLLM_WORKER_MULTIPROC_METHOD=spawn.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vllm_engine.env import default_kvcache_space

default_kvcache_space()
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

pytest.importorskip("vllm")

from precompute.config import SamplingConfig  # noqa: E402
from precompute.hf_backend import HFBackend  # noqa: E402
from precompute.run import run  # noqa: E402
from shards.reader import ShardFolder  # noqa: E402
from tests.fixtures.tiny_model import tiny_model_dir  # noqa: E402
from tests.precompute_helpers import (  # noqa: E402
    MAX_LEN,
    K,
    all_rows,
    cfg,
    hf_logprobs,
    questions,
    write_jsonl,
)
from tests.shards_helpers import quantization_bound  # noqa: E402

pytestmark = pytest.mark.slow
AGREE = 1e-4  # vLLM vs transformers, float32


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def engine(tiny):
    from vllm_engine.teacher import VLLMBackend

    # Seeded requests are safe here: the prompts are short enough never to be prefilled in
    # chunks (see sampling.per_request_seed). dtype and eager mode: the device's
    # (test_the_engine_takes_the_devices_settings).
    b = VLLMBackend(str(tiny), K, {"max_model_len": MAX_LEN}, per_request_seed="true")
    yield b
    b.close()


def test_the_engine_takes_the_devices_settings(engine):
    """No dtype or eager mode given: the device's (vllm_engine/engine_args.py); on the CPU
    float32, which `auto` would have downcast to bfloat16, and eager mode."""
    import torch

    from vllm_engine.engine_args import device_defaults

    want = device_defaults()
    cfg = engine.llm.llm_engine.model_config
    assert cfg.enforce_eager == want["enforce_eager"]
    if want["dtype"] == "float32":
        assert cfg.dtype == torch.float32


@pytest.fixture(scope="module")
def hf(tiny):
    return HFBackend(str(tiny), K, batch_size=16)


@pytest.fixture(scope="module")
def model(hf):
    return hf.model


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", questions())


def check_against_transformers(row, model, k, at=None):
    """Decoded shard values vs transformers' float32 log_softmax, within the codebook's
    quantization; the stored top-k is the true top-k (up to float-noise ties). `at`: the
    response positions of the stored tokens (a conversation's spans), default all."""
    lp = hf_logprobs(model, row["teacher_prompt_ids"].tolist(), row["response_ids"].tolist())
    response = row["response_ids"].numpy()
    if at is not None:
        lp, response = lp[at], response[at]
    ids, vals = row["topk_ids"].numpy(), row["topk_logprobs"].numpy()
    true = np.take_along_axis(lp, ids.astype(np.int64), axis=1)
    from shards.codec import Codebook

    target, bound = quantization_bound(Codebook.for_k(k), true)
    assert (np.abs(vals - target) <= bound + AGREE).all()
    kth = -np.sort(-lp, axis=1)[:, k - 1]
    assert (true >= kth[:, None] - AGREE).all()  # nothing better was left out
    tok = lp[np.arange(len(lp)), response]
    target, bound = quantization_bound(Codebook.for_k(k), tok)
    assert (np.abs(row["token_logprob"].numpy() - target) <= bound + AGREE).all()


def test_generate_writes_valid_shards(engine, model, tiny, data, tmp_path):
    out = tmp_path / "out"
    s = run(cfg(tiny, data, out, "sampling.n=2", "sampling.temperature=1.0"), backend=engine)
    assert (s.examples, s.rows, s.files) == (12, 24, 1)  # 3 commits, merged at the end
    rows = all_rows(out)  # verifies every file against the manifest
    assert len(rows) == 24
    meta = ShardFolder(out).metadata
    assert meta.logprobs_mode == "raw_logprobs" and meta.k == K and meta.vocab_size == 512
    assert meta.sampling["n"] == 2 and meta.sampling["mode"] == "generate"
    assert [p.name for p in out.glob("precompute_config*")] == ["precompute_config-w0-00000.yaml"]
    # vLLM's finish reasons are kept per row; those cut at max_tokens are counted.
    reasons = [json.loads(r["meta"])["finish_reason"] for r in rows]
    assert set(reasons) <= {"stop", "length"}
    assert (s.cut, s.max_tokens) == (reasons.count("length"), 12)
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
        assert r["source"] == "teacher" and r["thinking"] is None
        assert 1 <= len(r["response_ids"]) <= 12
        check_against_transformers(r, model, K)
    for rs in by_id.values():
        assert sorted(r["sample_index"] for r in rs) == [0, 1]
        assert rs[0]["prompt_ids"].tolist() == rs[1]["prompt_ids"].tolist()
    # The experience is in the teacher's view only (odd questions have one).
    longer = [len(rs[0]["teacher_prompt_ids"]) > len(rs[0]["prompt_ids"]) for rs in by_id.values()]
    assert sum(longer) == 6


def test_generate_is_reproducible_per_example(engine, tiny, data, tmp_path):
    """Per-example seeds: the same example samples the same tokens whatever the batch."""
    a = run(cfg(tiny, data, tmp_path / "a", "commit_every=12"), backend=engine)
    b = run(cfg(tiny, data, tmp_path / "b", "commit_every=2", "engine_window=5"), backend=engine)
    assert a.examples == b.examples == 12

    def responses(folder):
        return {r["id"]: r["response_ids"].tolist() for r in all_rows(folder)}

    assert responses(tmp_path / "a") == responses(tmp_path / "b")


def test_teacher_vocabulary_shards_with_vllm(engine, tiny, data, tmp_path):
    """A student of another tokenizer: each row's token spans tile its response text, the
    samples whose tokens spell no text are rejects, and a rerun redoes nothing."""
    from transformers import AutoTokenizer

    from crosstok.tokens import token_table
    from shards.manifest import load_manifest
    from tests.precompute_helpers import other_tokenizer_student

    student = other_tokenizer_student(tiny, tmp_path / "student")
    out = tmp_path / "out"
    c = cfg(tiny, data, out, f"student={student}", "sampling.n=2", "sampling.temperature=1.0")
    s = run(c, backend=engine)
    table = token_table(AutoTokenizer.from_pretrained(str(tiny)))
    rows = all_rows(out)
    assert len(rows) == s.rows and s.rows + s.rejects == 24
    for r in rows:
        ct = json.loads(r["meta"])["crosstok"]
        text = ct["response_text"].encode()
        spelled = [table.pieces[t] for t in r["response_ids"].tolist() if not table.special[t]]
        assert b"".join(spelled) == text
        assert [text[a:b] for a, b in ct["token_bytes"][: len(spelled)]] == spelled
    extras = load_manifest(out).extras
    again = run(c, backend=engine)
    assert (again.examples, again.skipped_done) == (0, 12) and load_manifest(out).extras == extras


def test_score_mode_teacher_forces_the_reference(engine, model, tiny, data, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    out = tmp_path / "out"
    s = run(cfg(tiny, data, out, "mode=score"), backend=engine)
    assert s.examples == 12
    rows = all_rows(out)
    qs = {f"What is {i} + {i + 3}?": q["answer"] for i, q in enumerate(questions())}
    for r in rows:
        assert r["source"] == "dataset" and r["sample_index"] == 0
        answer = json.loads(r["meta"])["answer"]
        assert answer in qs.values()
        expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert r["response_ids"].tolist() == expected
        check_against_transformers(r, model, K)


def test_conversation_rows_score_in_one_pass(engine, model, tiny, tmp_path):
    """Conversations (issue 21) through vLLM's prompt logprobs: the span tokens' top-k
    agree with transformers'; the experience sits before the first span, so the teacher's
    tokens from there on are the student's."""
    from tests.precompute_helpers import conversation

    rows = [
        {"id": f"c{i}", "messages": conversation(i, turns=3), "experience": "Add."}
        for i in range(2)
    ]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    c = cfg(tiny, data, tmp_path / "out", "mode=score", "view.experience_position=prefix")
    assert run(c, backend=engine).examples == 2
    for r in all_rows(tmp_path / "out"):
        p = len(r["prompt_ids"])
        spans = zip(r["span_starts"].tolist(), r["span_lengths"].tolist(), strict=True)
        at = np.concatenate([np.arange(s - p, s - p + n) for s, n in spans])
        assert len(r["span_starts"]) == 3 and len(at) == len(r["topk_ids"])
        check_against_transformers(r, model, K, at)


def test_rollout_episodes_play_and_score_with_vllm(engine, model, tiny, tmp_path):
    """mode=rollout on the module engine: the teacher plays two one-step episodes of a fake
    game (tests/test_precompute_rollout.py), each a conversation row whose action spans'
    top-k agree with transformers' in the teacher view."""
    from precompute.config import load_config
    from precompute.rollout import run_rollout
    from tests.test_precompute_rollout import FakeEnv

    out = tmp_path / "out"
    c = load_config(
        None,
        [
            "mode=rollout",
            f"teacher={tiny}",
            f"out={out}",
            f"k={K}",
            "progress=false",
            f"engine.max_model_len={MAX_LEN}",
            "env.fold=dev",
            "env.num_seeds=2",
            "env.step_limit=1",  # a second prompt would not fit the module engine's 256 tokens
            "rollout.max_tokens=4",
        ],
    )
    s = run_rollout(c, backend=engine, make_env=FakeEnv, log=lambda m: None)
    assert s.examples == s.kept == 2
    for r in all_rows(out):
        p = len(r["prompt_ids"])
        spans = zip(r["span_starts"].tolist(), r["span_lengths"].tolist(), strict=True)
        at = np.concatenate([np.arange(a - p, a - p + n) for a, n in spans])
        assert len(r["span_starts"]) == json.loads(r["meta"])["episode"]["steps"] == 1
        check_against_transformers(r, model, K, at)


def test_backends_agree_to_1e4(engine, hf, tiny):
    """Same model, float32: vLLM's and transformers' raw top-k logprobs agree to 1e-4, for
    scoring and for vLLM's own generated tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [
        tok(
            f"<|im_start|>user\nWhat is {i} times {i + 2}?<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )["input_ids"]
        for i in range(6)
    ]
    responses = [
        tok(f"It is {i * (i + 2)}.", add_special_tokens=False)["input_ids"] for i in range(6)
    ]
    sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=16)
    v_gen = [s[0] for s in engine.generate(prompts, [0] * 6, sampling)]
    generated = [s.token_ids.tolist() for s in v_gen]
    for v, h in zip(
        engine.score(prompts, responses) + v_gen,
        hf.score(prompts, responses) + hf.score(prompts, generated),
        strict=True,
    ):
        assert v.token_ids.tolist() == h.token_ids.tolist()
        np.testing.assert_allclose(v.topk_logprobs, h.topk_logprobs, atol=AGREE, rtol=0)
        np.testing.assert_allclose(v.token_logprobs, h.token_logprobs, atol=AGREE, rtol=0)
        # Same top-k sets, except for ids tied with the k-th value within float noise.
        for t in range(len(v.token_ids)):
            for i, val in zip(v.topk_ids[t], v.topk_logprobs[t], strict=True):
                if i not in h.topk_ids[t]:
                    assert abs(val - h.topk_logprobs[t, -1]) < AGREE


def test_eval_generation_agrees_with_transformers_greedy(engine, tiny):
    """tools.eval's vLLM generation is greedy decoding, as transformers' generate does it."""
    from transformers import AutoTokenizer

    from precompute.views import render
    from tools.eval.generate import generate_hf
    from vllm_engine.generate import generate as generate_vllm

    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [render(tok, [{"role": "user", "content": q["question"]}], {}) for q in questions(4)]
    fast = generate_vllm(engine.llm, prompts, 10, 0.0, 0)
    slow = generate_hf(str(tiny), prompts, 10, 0.0, 0, batch_size=1)
    assert [ids for ids, _ in fast] == [ids for ids, _ in slow]
    assert all(len(ids) > 0 for ids, _ in fast)


def test_logprob_layouts_write_the_same_shards(engine, tiny, tmp_path):
    """The engine's own arrays (vllm_engine/arrays.py) and vLLM's flat lists, converted
    with array operations (shards.topk), give the arrays, and the shard files byte for byte,
    of vLLM's per-position dicts through the per-token loop: teacher forcing and greedy
    generation run in all three layouts in one engine, and sampled generations (different per
    run) are converted from one output, whose dicts are what its flat lists become."""
    from operator import attrgetter

    from transformers import AutoTokenizer

    from shards.schema import ShardMetadata
    from shards.topk import topk_arrays
    from shards.writer import ShardRow, ShardWriter
    from vllm_engine.arrays import LogprobArrays
    from vllm_engine.topk import topk_from_entries, topk_from_flat_logprobs

    assert engine.layout == "arrays"  # the default, where this vLLM allows it
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [
        tok(f"Question {i}: what is {i} + {3 * i}? Answer:", add_special_tokens=False)["input_ids"]
        for i in range(8)
    ]
    responses = [
        tok(f" {4 * i}, of course.", add_special_tokens=False)["input_ids"] for i in range(8)
    ]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=20)
    layouts = ("dicts", "flat", "arrays")
    scored = {}
    try:
        for layout in layouts:
            engine.layout = layout
            scored[layout] = engine.score(prompts, responses) + [
                s[0] for s in engine.generate(prompts, list(range(8)), greedy)
            ]
    finally:
        engine.layout = "arrays"

    # Sampled at temperature 1, n=2 samples per prompt, seeded per request: the same samples
    # as flat lists (converted two ways) and, in another run, as the engine's arrays.
    def sampled(layout: str) -> list:
        """(logprobs, tokens, first position) of each sample, as generate converts them."""
        seen, convert = [], engine._topk
        engine.layout, engine._topk = layout, lambda reqs: seen.extend(reqs) or convert(reqs)
        try:
            engine.generate(
                prompts, [100 + i for i in range(8)], SamplingConfig(n=2, max_tokens=24)
            )
        finally:
            engine.layout = "arrays"
            del engine._topk  # the class's method again
        return seen

    for lp, toks, _ in sampled("flat"):
        assert type(lp).__name__ == "FlatLogprobs"
        scored["flat"].append(topk_from_flat_logprobs([(lp, toks, 0)], K)[0])
        scored["dicts"].append(topk_from_entries(list(lp), toks, K))
        # The engine's dicts are what the flat lists become position by position.
        ids, _, _ = topk_arrays(list(lp), toks, K, logprob=attrgetter("logprob"))
        assert ids.shape == (len(toks), K)
    arrays = sampled("arrays")
    assert all(isinstance(lp, LogprobArrays) for lp, _, _ in arrays)
    scored["arrays"] += engine._topk(arrays)
    assert len(scored["dicts"]) == len(scored["flat"]) == len(scored["arrays"]) == 32
    for layout in ("flat", "arrays"):
        for a, b in zip(scored["dicts"], scored[layout], strict=True):
            for name in ("token_ids", "topk_ids", "topk_logprobs", "token_logprobs"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    meta = ShardMetadata(
        k=K,
        vocab_size=engine.vocab_size,
        teacher="tiny",
        teacher_fingerprint="-",
        tokenizer_fingerprint="-",
        created_at="2026-12-01T00:00:00+00:00",
    )
    files = {}
    for layout in layouts:
        with ShardWriter(tmp_path / layout, meta, batch_tokens=64) as w:
            for i, s in enumerate(scored[layout]):
                prompt = prompts[i % 8]
                w.add(
                    ShardRow(
                        id=f"ex{i}",
                        prompt_ids=prompt,
                        teacher_prompt_ids=prompt,
                        response_ids=s.token_ids,
                        topk_ids=s.topk_ids,
                        topk_logprobs=s.topk_logprobs,
                        token_logprobs=s.token_logprobs,
                    )
                )
        files[layout] = [p.read_bytes() for p in sorted((tmp_path / layout).glob("*.arrow"))]
    assert files["dicts"] and files["dicts"] == files["flat"] == files["arrays"]

"""On-policy distillation against a real vLLM CPU teacher server (tiny model, float32).

One server for the module (its start-up, 15-50 s, is most of the cost). The student is a
tiny model with other random weights and the same tokenizer; its samples are scored by the
server, and the losses are checked against the same samples scored in-process by
transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import numpy as np
import pytest
import torch

from shards.reader import ShardReader
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.train_helpers import train_tiny, write_teacher_shards
from train.batches import ShardBatches
from train.config import OnPolicyConfig, load_config
from train.losses import KDSpec
from train.model import DistillModule
from train.onpolicy import OnPolicyBatches, cut_at_eos, is_onpolicy
from vllm_engine.teacher_client import (
    TeacherAnswerError,
    TeacherClient,
    TeacherMismatch,
    TeacherRequestError,
    TeacherUnavailable,
)
from vllm_engine.teacher_server import TeacherServer, free_port

K = 16
AGREE = 1e-4  # vLLM vs transformers, float32


# ---- no server ----------------------------------------------------------------------------


def test_mixing_draw_is_seeded_per_step_and_index_and_respects_lmbda():
    draws = [is_onpolicy(0, s, i, 0.3) for s in range(2000) for i in range(2)]
    assert draws == [is_onpolicy(0, s, i, 0.3) for s in range(2000) for i in range(2)]
    sd = math.sqrt(0.3 * 0.7 / len(draws))
    assert abs(np.mean(draws) - 0.3) < 4 * sd
    assert draws != [is_onpolicy(1, s, i, 0.3) for s in range(2000) for i in range(2)]
    assert not any(is_onpolicy(0, s, 0, 0.0) for s in range(100))
    assert all(is_onpolicy(0, s, 0, 1.0) for s in range(100))


def test_cut_at_eos_keeps_the_first_eos():
    assert cut_at_eos(torch.tensor([5, 6, 2, 0, 0]), {2, 0}).tolist() == [5, 6, 2]
    assert cut_at_eos(torch.tensor([5, 6, 7]), {2}).tolist() == [5, 6, 7]


def answer(sent, entries):
    return {"choices": [{"prompt_token_ids": sent, "prompt_logprobs": entries}]}


def entry(pairs):
    return {str(i): {"logprob": lp, "rank": r} for r, (i, lp) in enumerate(pairs, 1)}


def test_answers_that_do_not_match_the_request_are_refused():
    c = TeacherClient("http://127.0.0.1:9", k=2)
    sent = [1, 2, 3]
    good = [None, entry([(2, -0.1), (5, -2.5)]), entry([(7, -0.5), (8, -1.0), (3, -4.0)])]
    s = c._parse(answer(sent, good), sent, 2)
    assert s.topk_ids.tolist() == [[2, 5], [7, 8]]
    np.testing.assert_allclose(s.token_logprob, [-0.1, -4.0])
    for bad, msg in [
        (answer([1, 2, 4], good), "prompt_token_ids differ"),
        (answer(sent, good[:2]), "2 prompt logprobs for 3"),
        (answer(sent, [None, entry([(2, -0.1)]), good[2]]), "1 logprobs, expected 2"),
        (answer(sent, [None, good[1], entry([(7, -0.5), (8, -1.0)])]), "not in the answer"),
        (answer(sent, [None, good[1], entry([(7, 0.5), (3, -1.0)])]), "positive"),
        ({"choices": []}, "missing field"),
    ]:
        with pytest.raises(TeacherAnswerError, match=msg):
            c._parse(bad, sent, 2)
    c.close()


def test_bad_answers_are_asked_again_then_refused(monkeypatch):
    c = TeacherClient("http://127.0.0.1:9", k=1, retries=2)
    c.model = "m"
    sent = [1, 2]
    good = answer(sent, [None, entry([(2, -0.2)])])
    replies = [answer([9, 9], [None, None]), good]
    monkeypatch.setattr(c, "_http", lambda path, body: replies.pop(0))
    assert c.score([1], [2]).topk_ids.tolist() == [[2]] and c.num_retries == 1
    monkeypatch.setattr(c, "_http", lambda path, body: answer([9, 9], [None, None]))
    with pytest.raises(TeacherAnswerError, match="differ"):
        c.score([1], [2])
    c.close()


def test_unreachable_server_gives_up_after_the_configured_time():
    c = TeacherClient(f"http://127.0.0.1:{free_port()}", k=1, backoff_s=0.05, give_up_after_s=0.5)
    with pytest.raises(TeacherUnavailable, match="did not answer .*give_up_after_s=0.5"):
        c.call("/v1/models")
    assert c.num_retries >= 3
    c.close()


def test_onpolicy_config_section(tmp_path):
    cfg = load_config("configs/train/onpolicy.yaml", ["onpolicy.lmbda=0.25"])
    assert cfg.onpolicy.lmbda == 0.25 and cfg.loss.divergence == "jsd"
    with pytest.raises(ValueError, match="onpolicy.lmdba"):
        load_config("configs/train/onpolicy.yaml", ["onpolicy.lmdba=1"])
    with pytest.raises(ValueError, match="lmbda must be in"):
        load_config("configs/train/onpolicy.yaml", ["onpolicy.lmbda=1.5"])
    with pytest.raises(ValueError, match="needs a KD loss"):
        load_config("configs/train/onpolicy.yaml", ["loss.alpha=0"])


# ---- with a real vLLM server --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    pytest.importorskip("vllm")
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    srv = TeacherServer(tiny, max_model_len=512, max_logprobs=64, log=log).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny):
    return write_teacher_shards(tmp_path_factory.mktemp("shards") / "s", tiny, examples=24, k=K)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("student") / "m", seed=7)


def client_for(server, tokenizer, **kw):
    c = TeacherClient(server.url, K, **kw)
    c.connect(tokenizer)
    return c


def source(shards, student_dir, client, seed=0, **cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    reader = ShardReader(shards, seed=seed, epochs=None)
    sb = ShardBatches(reader, batch_tokens=256, max_rows=8, max_length=512, sort_window=8, pad_id=0)
    op = OnPolicyConfig(teacher_url=client.url, **{"max_new_tokens": 12, **cfg})
    src = OnPolicyBatches(
        sb, client, op, student=lambda: lm, tokenizer=tok, seed=seed, grad_accum=1, max_length=512
    )
    return src, lm


@pytest.mark.slow
def test_losses_equal_those_from_an_in_process_teacher(server, shards, student, tiny):
    """Same samples, teacher signal from the server vs from transformers in this process:
    same top-k (the true one), same values to 1e-4, same losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    client = client_for(server, tok)
    src, lm = source(shards, student, client, n_samples=2, max_prompts=3)
    batch = next(iter(src))
    assert src.pop_metrics()["onpolicy"] == 1
    n_rows = batch.input_ids.shape[0]
    assert n_rows % 2 == 0 and n_rows <= 6  # 2 samples for each of at most 3 prompts
    # Reproducible per (step, index): a fresh source draws the same samples.
    again, _ = source(shards, student, client, n_samples=2, max_prompts=3)
    b2 = next(iter(again))
    assert torch.equal(b2.input_ids, batch.input_ids) and torch.equal(b2.topk_ids, batch.topk_ids)

    teacher = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    width = batch.input_ids.shape[1]
    rows = batch.positions // width
    full = []
    for b in range(n_rows):
        resp = batch.targets[rows == b]
        assert len(resp) <= 12 and (len(resp) == 12 or resp[-1].item() in src.eos_ids)
        tp = batch.teacher_prompt_ids[b].long()
        seq = torch.cat([tp, resp])
        with torch.no_grad():
            lp = torch.log_softmax(teacher(seq[None]).logits[0].float(), -1)
        full.append(lp[len(tp) - 1 : len(seq) - 1])
    full = torch.cat(full)
    values = full.gather(1, batch.topk_ids)
    torch.testing.assert_close(batch.topk_logprobs, values, atol=AGREE, rtol=0)
    kth = full.topk(K, dim=1).values[:, -1]
    assert (values >= kth[:, None] - AGREE).all()  # the server's top-k is the true top-k
    token = full.gather(1, batch.targets[:, None])[:, 0]
    torch.testing.assert_close(batch.token_logprob, token, atol=AGREE, rtol=0)
    tail = torch.logsumexp(full.scatter(1, batch.topk_ids, float("-inf")), dim=1)
    torch.testing.assert_close(batch.tail_logprob, tail, atol=1e-3, rtol=0)

    reference = dataclasses.replace(
        batch, topk_logprobs=values, tail_logprob=tail, token_logprob=token
    )
    for spec in [
        KDSpec(divergence="jsd", beta=0.5),
        KDSpec(divergence="forward_kl"),
        KDSpec(divergence="reverse_kl"),
        KDSpec(divergence="reverse_kl", reverse_kl_estimator="mc"),
        KDSpec(divergence="jsd", beta=0.5, tail="renormalize", temperature=2.0),
    ]:
        module = DistillModule(lm, spec, chunk_tokens=64)
        got, want = module(batch).loss.item(), module(reference).loss.item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), spec
    big = TeacherClient(server.url, 100)  # above the server's --max-logprobs: a 400, no retry
    big.model = client.model
    with pytest.raises(TeacherRequestError, match="greater than max"):
        big.score([1, 2], [3])
    assert big.num_retries == 0
    client.close()


@pytest.mark.slow
def test_another_tokenizer_is_refused(server, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "o", vocab_size=576))
    with pytest.raises(TeacherMismatch, match="tokenizer fingerprint"):
        TeacherClient(server.url, K).connect(other)
    # A remote server (its model folder is not readable here): the probe text decides.
    monkeypatch.setattr(TeacherClient, "root_is_local", lambda self: False)
    with pytest.raises(TeacherMismatch, match="tokenizes a probe text differently"):
        TeacherClient(server.url, K).connect(other)
    same = AutoTokenizer.from_pretrained(tiny_model_dir())
    assert "tokenizer probe ok (remote)" in TeacherClient(server.url, K).connect(same)


def train(tmp, shards, student, url, *extra):
    out = tmp / "run"
    return out, train_tiny(
        "configs/train/onpolicy.yaml", out, student, shards, f"onpolicy.teacher_url={url}",
        "onpolicy.max_new_tokens=12", "onpolicy.max_prompts=4",
        "onpolicy.sampler=hf",  # the vLLM sampler has its own test below
        *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_onpolicy_training_mixes_with_shards_and_writes_a_checkpoint(
    server, shards, student, tmp_path
):
    extra = ["max_steps=6", "save_every=3", "grad_accum=2", "onpolicy.lmbda=0.5"]
    samples = tmp_path / "samples"
    out, log = train(
        tmp_path, shards, student, server.url, *extra, f"onpolicy.write_shards={samples}"
    )
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    expected = [sum(is_onpolicy(0, s, i, 0.5) for i in range(2)) for s in range(6)]
    assert [r["onpolicy"] for r in log] == expected
    assert 0 < sum(expected) < 12  # both kinds of batches occurred
    assert all(0.0 <= r["teacher_share"] <= 1.0 for r in log)
    assert all(r["gen_s"] > 0 for r, e in zip(log, expected, strict=True) if e)
    model = out / "checkpoints" / "step-0000006" / "model"
    assert (model / "config.json").exists() and (out / "checkpoints" / "latest").exists()
    rows = list(ShardReader(samples, shuffle=False, epochs=1))
    assert rows and all(r["source"] == "student" for r in rows)
    assert {r["sample_index"] for r in rows} == {0}
    assert all(1 <= len(r["response_ids"]) <= 12 for r in rows)


@pytest.mark.slow
def test_missing_server_stops_with_a_clear_error_after_saving(
    server, shards, student, tmp_path, monkeypatch
):
    with pytest.raises(TeacherUnavailable, match="did not answer"):
        url = f"http://127.0.0.1:{free_port()}"
        train(tmp_path / "a", shards, student, url, "onpolicy.give_up_after_s=1")
    assert not (tmp_path / "a" / "run" / "checkpoints").exists()  # nothing trained yet

    dead = f"http://127.0.0.1:{free_port()}"
    calls, orig = [0], TeacherClient.score
    lock = threading.Lock()

    def score(self, prompt, response):
        with lock:
            calls[0] += 1
            if calls[0] == 9:  # the server goes away mid-run and does not come back
                self.url = dead
        return orig(self, prompt, response)

    monkeypatch.setattr(TeacherClient, "score", score)
    extra = ["max_steps=8", "save_every=100", "onpolicy.lmbda=1", "onpolicy.backoff_s=0.1"]
    with pytest.raises(TeacherUnavailable, match=r"give_up_after_s=2.*saved .*resume=true"):
        train(tmp_path / "b", shards, student, server.url, *extra, "onpolicy.give_up_after_s=2")
    out = tmp_path / "b" / "run"
    done = len(open(out / "metrics.jsonl").readlines())
    assert 1 <= done < 8
    assert (out / "checkpoints" / "latest").read_text() == f"step-{done:07d}"
    monkeypatch.setattr(TeacherClient, "score", orig)
    _, log = train(tmp_path / "b", shards, student, server.url, *extra, "resume=true")
    assert [r["step"] for r in log] == list(range(1, 9))


@pytest.mark.slow
def test_killed_and_restarted_server_is_survived(server, shards, student, tmp_path, monkeypatch):
    extra = ["max_steps=5", "save_every=100", "onpolicy.lmbda=1", "onpolicy.give_up_after_s=240"]
    _, straight = train(tmp_path / "a", shards, student, server.url, *extra)

    calls, orig = [0], TeacherClient.score
    lock = threading.Lock()
    restart = threading.Thread(target=server.start, daemon=True)

    def score(self, prompt, response):
        with lock:
            calls[0] += 1
            if calls[0] == 6:  # kill -9 the server (and its engine) mid-run, restart it
                server.kill()
                restart.start()
        return orig(self, prompt, response)

    monkeypatch.setattr(TeacherClient, "score", score)
    _, log = train(tmp_path / "b", shards, student, server.url, *extra)
    restart.join()
    assert [r["step"] for r in log] == list(range(1, 6))
    assert log[-1]["teacher_retries"] > 0 and straight[-1]["teacher_retries"] == 0
    # The retries are invisible to training: same samples, same teacher answers, same losses.
    assert [r["tokens"] for r in log] == [r["tokens"] for r in straight]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in straight], rel=1e-4)


@pytest.mark.slow
def test_vllm_sampler_trains_and_syncs_every_step(server, shards, student, tmp_path):
    """sampler=vllm: the student's samples come from its colocated engine, whose weights
    are pushed after every optimizer step (sync_s > 0); sync_every=2 pushes every other."""
    extra = ["max_steps=4", "save_every=100", "grad_accum=2", "onpolicy.lmbda=1"]
    vllm = ["onpolicy.sampler=vllm", "onpolicy.cpu_kv_cache_gib=0.25"]
    out, log = train(tmp_path / "a", shards, student, server.url, *extra, *vllm)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["onpolicy"] == 2 and r["gen_s"] > 0 and r["sync_s"] > 0 for r in log)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    _, log = train(
        tmp_path / "b", shards, student, server.url, *extra, *vllm, "onpolicy.sync_every=2"
    )
    assert [r["sync_s"] > 0 for r in log] == [False, True, False, True]


@pytest.mark.slow
def test_two_stage_in_one_command_starts_on_policy_from_skds_weights(
    server, shards, student, tmp_path
):
    """make onpolicy-two-stage: SKD, then on-policy from SKD's final checkpoint (not from
    model.path=, which was SKD's start); a re-run finds both finished and changes nothing."""
    from tools.onpolicy import live as onpolicy_live
    from train.checkpoint import checkpoint_config, latest_checkpoint

    out = tmp_path / "ts"
    argv = [
        "--shards", str(shards), "--out", str(out), "--two-stage", "--teacher-url", server.url,
        f"model.path={student}", "max_steps=2", "save_every=2", "data.batch_tokens=256",
        "data.sort_window=8", "onpolicy.max_new_tokens=8", "onpolicy.max_prompts=2",
        "onpolicy.sampler=hf", "onpolicy.lmbda=1",
    ]  # fmt: skip
    assert onpolicy_live.main(argv) == 0
    skd_final = latest_checkpoint(out / "skd") / "model"
    on = latest_checkpoint(out / "onpolicy")
    assert checkpoint_config(on)["model"]["path"] == str(skd_final)
    assert checkpoint_config(latest_checkpoint(out / "skd"))["model"]["path"] == str(student)
    log = [json.loads(line) for line in open(out / "onpolicy" / "metrics.jsonl")]
    assert [r["onpolicy"] for r in log] == [1, 1]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert onpolicy_live.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


@pytest.mark.slow
def test_onpolicy_prompts_from_a_data_file_need_no_shards(server, student, tmp_path):
    """onpolicy.prompts: a TRL prompt file instead of shards (data.shards names no folder):
    the student samples on Q, the teacher scores on Q+E (the row's experience in the system
    message), and a resumed run continues."""
    from transformers import AutoTokenizer

    from tests.precompute_helpers import write_jsonl

    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 2?"}], "experience": "Add 2."}
        for i in range(6)
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    samples = tmp_path / "samples"
    extra = ["save_every=2", f"onpolicy.prompts={prompts}", f"onpolicy.k={K}", "onpolicy.lmbda=1"]
    nowhere = tmp_path / "no-shards"
    out, log = train(
        tmp_path, nowhere, student, server.url, "max_steps=2", *extra,
        f"onpolicy.write_shards={samples}",
    )  # fmt: skip
    assert not nowhere.exists()
    assert [r["step"] for r in log] == [1, 2] and all(r["onpolicy"] == 1 for r in log)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    tok = AutoTokenizer.from_pretrained(student)

    def ids(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    by_question = {
        tuple(ids(r["prompt"])): ids([{"role": "system", "content": "Add 2."}, *r["prompt"]])
        for r in rows
    }
    written = list(ShardReader(samples, shuffle=False, epochs=1))
    # 2 steps: one epoch of the 6 prompts, 4 then 2 (max_prompts 4), each prompt once.
    assert len({tuple(r["prompt_ids"].tolist()) for r in written}) == len(written) == 6
    for r in written:
        assert r["teacher_prompt_ids"].tolist() == by_question[tuple(r["prompt_ids"].tolist())]
    _, log = train(tmp_path, nowhere, student, server.url, "max_steps=3", "resume=true", *extra)
    assert [r["step"] for r in log] == [1, 2, 3]  # the log is appended: step 3 is new

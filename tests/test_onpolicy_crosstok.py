"""On-policy distillation from a teacher server of another tokenizer (issue #23 §2,
train/onpolicy_crosstok.py): samples go to the teacher as text, its answer in its tokens is
aligned as teacher-vocabulary shard rows are.

The teacher is the tiny model in this process (its top-k by teacher forcing), as a client
(`LMTeacher`) or behind a small fake of vLLM's endpoints (`HTTPTeacher`, for `python -m
train`); the student's samples are scripted where a test compares numbers (a random tiny
model's samples are mostly bytes that are not text).
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from tokenizers import normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosstok.tokens import CrossTokError, token_table
from datafiles.views import render
from shards.codec import tail_logprob_of
from shards.fingerprint import tokenizer_fingerprint
from shards.reader import ShardReader, read_rows
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from tests.fixtures.tiny_model import CHAT_TEMPLATE, tiny_model_dir
from tests.test_crosstok import SINGLES, byte_level_tokenizer
from tests.test_crosstok_train import TEXTS, token_spans, write_folders
from tests.train_helpers import ShardStub, train_tiny
from train.batches import ShardBatches, collate
from train.config import ConfigError, OnPolicyConfig
from train.crosstok_rows import KIND_MAPPED, crosstok_rows
from train.losses import KDSpec
from train.model import DistillModule
from train.onpolicy import OnPolicyBatches, eos_ids, is_onpolicy
from train.onpolicy_crosstok import (
    CrossTokTeacher,
    check_prompt_sources,
    load_teacher_tokenizer,
)
from vllm_engine.teacher_client import TeacherClient, TeacherMismatch, TeacherScore

K = 8
SPEC = KDSpec(divergence="jsd", beta=0.5, alpha=0.7)  # KD and CE both


class LMTeacher:
    """A teacher server's client in this process: the tiny model's top-k on the response
    tokens given the prompt (teacher forcing); every request and answer recorded."""

    max_model_len = 2048
    num_retries = 0
    url = "http://in-process"

    def __init__(self, lm):
        self.lm, self.requests = lm, []

    def score(self, prompt_ids, response_ids) -> TeacherScore:
        seq = torch.tensor([list(prompt_ids) + list(response_ids)])
        with torch.no_grad():
            lp = torch.log_softmax(self.lm(seq).logits[0].float(), -1)
        at = torch.arange(len(prompt_ids) - 1, seq.shape[1] - 1)
        top = torch.topk(lp[at], K)
        out = TeacherScore(
            top.indices.numpy(), top.values.numpy(), lp[at, torch.tensor(response_ids)].numpy()
        )
        self.requests.append((list(prompt_ids), list(response_ids), out))
        return out

    def submit(self, prompt_ids, response_ids):
        done = Future()
        done.set_result(self.score(prompt_ids, response_ids))
        return done

    def close(self):
        pass


@pytest.fixture(scope="module")
def teacher_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def teacher_lm(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cross(tmp_path_factory, teacher_dir):
    """A teacher-vocabulary folder of the tiny teacher (prompts as messages)."""
    return write_folders(tmp_path_factory.mktemp("ct"), teacher_dir, rows=8, crosstok_only=True)[1]


def load(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def scripted(src, responses):
    """The student's samples: responses[i] for the i-th sample of a generate call."""
    src._generate = lambda prompts, step, indices: [
        torch.tensor(responses[i % len(responses)]) for i in range(len(prompts) * src.cfg.n_samples)
    ]
    return src


def onpolicy(shards, teacher, lm, tok, crosstok=None, **cfg):
    op = OnPolicyConfig(teacher_url="http://in-process", **{"max_prompts": 8, **cfg})
    return OnPolicyBatches(
        shards, teacher, op, student=lambda: lm, tokenizer=tok, seed=0, grad_accum=1,
        max_length=512, crosstok=crosstok,
    )  # fmt: skip


def loss_and_grads(module, batch):
    module.zero_grad()
    out = module(batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ---- exactness -----------------------------------------------------------------------------


def test_same_tokenizer_through_the_text_path_equals_the_id_path(teacher_lm):
    """The student has the teacher's tokenizer and is forced through the cross-tokenizer
    path: the teacher gets the same ids, and loss and gradients equal the id path's (1e-6)."""
    tok, lm = load(tiny_model_dir(seed=7))
    rows = []
    for i in range(3):
        msgs = [{"role": "user", "content": f"Question {i}: say something."}]
        with_e = [{"role": "system", "content": "Be brief."}, *msgs]
        prompt, tprompt = render(tok, msgs), render(tok, with_e)
        rows.append(
            {
                "id": f"q{i}",
                "prompt_ids": torch.tensor(prompt),
                "teacher_prompt_ids": torch.tensor(tprompt),
                "response_ids": torch.tensor([5]),
                "topk_ids": torch.zeros(1, K, dtype=torch.long),
                "topk_logprobs": torch.full((1, K), -3.0),
                "tail_logprob": torch.full((1,), -0.5),
                "token_logprob": torch.full((1,), -1.0),
            }
        )
    prompts = [collate(rows, 512, tok.pad_token_id)]
    eos = tok.eos_token_id
    responses = [tok(t, add_special_tokens=False).input_ids + [eos] for t in TEXTS[:2]]
    responses.append(tok(TEXTS[5], add_special_tokens=False).input_ids)  # cut: no EOS
    batches, sent = [], []
    for crosstok in (None, CrossTokTeacher(tok, tok, eos_ids(lm, tok), "same")):
        teacher = LMTeacher(teacher_lm)
        src = scripted(onpolicy(ShardStub(prompts), teacher, lm, tok, crosstok), responses)
        batches.append(next(iter(src)))
        sent.append([(p, r) for p, r, _ in teacher.requests])
    assert sent[0] == sent[1] and len(sent[0]) == 3
    ids_batch, text_batch = batches
    assert text_batch.ct_kind is not None and (text_batch.ct_kind == KIND_MAPPED).all()
    assert torch.equal(ids_batch.input_ids, text_batch.input_ids)
    assert torch.equal(ids_batch.targets, text_batch.targets)
    module = DistillModule(lm, SPEC, chunk_tokens=16, uld_weight=1.0)
    out_i, g_i = loss_and_grads(module, ids_batch)
    out_t, g_t = loss_and_grads(module, text_batch)
    torch.testing.assert_close(out_t.loss, out_i.loss, rtol=0, atol=1e-6)
    assert g_i.keys() == g_t.keys()
    for name in g_i:
        torch.testing.assert_close(g_t[name], g_i[name], rtol=0, atol=1e-6)


def test_another_tokenizer_equals_the_same_rows_read_as_teacher_vocabulary_shards(
    tmp_path, cross, teacher_dir, teacher_lm
):
    """Student vocabulary 576, teacher 512: the on-policy batch's loss equals the loss of the
    teacher's answers as teacher-vocabulary shard rows (spans computed here) converted by the
    shard path. A sample with markup inside its text is skipped and counted."""
    s_tok, lm = load(tiny_model_dir(vocab_size=576, seed=7))
    t_tok = AutoTokenizer.from_pretrained(teacher_dir)
    convert = crosstok_rows(cross, s_tok)
    reader = ShardReader(cross, seed=0, epochs=None)
    shards = ShardBatches(
        reader, batch_tokens=4096, max_rows=3, max_length=512, sort_window=3, convert=convert
    )
    s_eos, t_eos = s_tok.eos_token_id, t_tok.eos_token_id
    texts = [TEXTS[0], TEXTS[5], TEXTS[2]]
    responses = [s_tok(t, add_special_tokens=False).input_ids + [s_eos] for t in texts]
    im_start = s_tok.convert_tokens_to_ids("<|im_start|>")
    responses.append(s_tok("Hi", add_special_tokens=False).input_ids + [im_start, s_eos])
    teacher = LMTeacher(teacher_lm)
    ct = CrossTokTeacher(t_tok, s_tok, eos_ids(lm, s_tok), "srv")
    src = scripted(onpolicy(shards, teacher, lm, s_tok, ct, n_samples=4, max_prompts=1), responses)
    batch = next(iter(src))
    metrics = src.pop_metrics()
    assert metrics["onpolicy"] == 1 and metrics["ct_skipped"] == 1
    assert len(batch.ids) == len(teacher.requests) == 3
    # The teacher scored its own tokens of the text, then its EOS.
    for (_, r, _), text in zip(teacher.requests, texts, strict=True):
        assert r == t_tok(text, add_special_tokens=False).input_ids + [t_eos]
    # The same teacher answers as teacher-vocabulary shard rows (spans computed here), as
    # the reader yields them, and as written to a folder and read back (its codec
    # quantizes the logprobs: equal to its precision).
    table = token_table(t_tok)
    messages = {r["id"]: json.loads(r["meta"])["crosstok"] for r in read_rows(cross)}
    rows = []
    for row_id, (prompt, resp, sc), text in zip(batch.ids, teacher.requests, texts, strict=True):
        ct_meta = {"prompt_messages": messages[row_id.split("@")[0]]["prompt_messages"]}
        ct_meta["thinking"], ct_meta["response_text"] = None, text
        ct_meta["token_bytes"] = token_spans(table, np.array(resp), eos=True)
        rows.append(
            {
                "id": row_id,
                "meta": json.dumps({"crosstok": ct_meta}),
                "prompt_ids": torch.tensor(prompt),
                "teacher_prompt_ids": torch.tensor(prompt),
                "response_ids": torch.tensor(resp),
                "topk_ids": torch.from_numpy(sc.topk_ids),
                "topk_logprobs": torch.from_numpy(sc.topk_logprobs),
                "tail_logprob": torch.from_numpy(tail_logprob_of(sc.topk_logprobs)),
                "token_logprob": torch.from_numpy(sc.token_logprob),
            }
        )
    reference = collate(list(map(convert, rows)), 512, s_tok.pad_token_id)
    assert torch.equal(reference.input_ids, batch.input_ids)
    assert torch.equal(reference.ct_kind, batch.ct_kind)
    assert (batch.ct_kind != KIND_MAPPED).any() and (batch.ct_kind == KIND_MAPPED).any()
    module = DistillModule(lm, SPEC, chunk_tokens=16, uld_weight=0.5)
    got = module(batch)
    torch.testing.assert_close(got.loss, module(reference).loss, rtol=0, atol=1e-6)
    fp = tokenizer_fingerprint(t_tok)
    voc = {"kind": "teacher", "teacher_tokenizer_fingerprint": fp}
    voc["teacher_tokenizer"] = {"path": str(teacher_dir)}
    meta = ShardMetadata(
        k=K, vocab_size=table.vocab_size, teacher="t", teacher_fingerprint="w",
        tokenizer_fingerprint=fp, extra={"vocabulary": voc},
    )  # fmt: skip
    folder = tmp_path / "same-rows"
    with ShardWriter(folder, meta, batch_tokens=128) as w:
        for r in rows:
            w.add(
                ShardRow(
                    id=r["id"], prompt_ids=r["prompt_ids"].numpy(),
                    teacher_prompt_ids=r["teacher_prompt_ids"].numpy(),
                    response_ids=r["response_ids"].numpy(), topk_ids=r["topk_ids"].numpy(),
                    topk_logprobs=r["topk_logprobs"].numpy(),
                    token_logprobs=r["token_logprob"].numpy(),
                    meta={"crosstok": json.loads(r["meta"])["crosstok"]},
                )
            )  # fmt: skip
    by_id = {r["id"]: r for r in map(crosstok_rows(folder, s_tok), read_rows(folder))}
    read_back = collate([by_id[i] for i in batch.ids], 512, s_tok.pad_token_id)
    assert torch.equal(read_back.input_ids, batch.input_ids)
    torch.testing.assert_close(module(read_back).loss, got.loss, rtol=1e-4, atol=0)
    assert float(got.stats["uld"]) > 0


# ---- the trainer, against a fake vLLM server -----------------------------------------------


class HTTPTeacher(ThreadingHTTPServer):
    """vLLM's endpoints that on-policy uses, for the tiny teacher in this process: its model
    folder (on this machine: the teacher tokenizer is found there), /tokenize, and
    /v1/completions with top-k prompt logprobs (the sent token added when outside them)."""

    daemon_threads = True

    def __init__(self, model_dir, lm, tok):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model_dir, self.lm, self.tok = str(model_dir), lm, tok
        self.lock = threading.Lock()
        # A short poll: shutdown() waits for it.
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HTTPTeacher

    def log_message(self, *args):
        pass

    def reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        card = {"id": "tiny", "root": self.server.model_dir, "max_model_len": 2048}
        self.reply({"data": [card]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            ids = self.server.tok(body["prompt"], add_special_tokens=False)["input_ids"]
            self.reply({"tokens": ids})
            return
        sent, k = body["prompt"], body["prompt_logprobs"]
        with self.server.lock, torch.no_grad():
            lp = torch.log_softmax(self.server.lm(torch.tensor([sent])).logits[0].float(), -1)
        entries = [None]
        for j in range(1, len(sent)):
            top = torch.topk(lp[j - 1], k)
            pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
            e = {str(i): {"logprob": v} for i, v in pairs}
            e.setdefault(str(sent[j]), {"logprob": float(lp[j - 1, sent[j]])})
            entries.append(e)
        self.reply({"choices": [{"prompt_token_ids": sent, "prompt_logprobs": entries}]})


@pytest.fixture(scope="module")
def http_teacher(teacher_dir, teacher_lm):
    srv = HTTPTeacher(teacher_dir, teacher_lm, AutoTokenizer.from_pretrained(teacher_dir))
    yield srv
    srv.close()


def test_training_mixes_onpolicy_samples_with_teacher_vocabulary_shards(
    tmp_path, cross, http_teacher, capfd
):
    """python -m train, lmbda=0.5, prompts and shard batches from a teacher-vocabulary folder,
    a teacher server of another tokenizer than the student's (found in its model folder)."""
    student = tiny_model_dir(vocab_size=576, seed=7)
    log = train_tiny(
        "configs/train/onpolicy.yaml", tmp_path / "run", student, cross,
        f"onpolicy.teacher_url={http_teacher.url}", "onpolicy.lmbda=0.5", "grad_accum=2",
        "max_steps=3", "save_every=100", "onpolicy.max_new_tokens=6", "onpolicy.max_prompts=2",
        "onpolicy.sampler=hf", "data.batch_tokens=128",
    )  # fmt: skip
    out = capfd.readouterr().out
    assert "not the student's: samples go to it as text and are aligned" in out
    assert [r["step"] for r in log] == [1, 2, 3]
    expected = [sum(is_onpolicy(0, s, i, 0.5) for i in range(2)) for s in range(3)]
    assert [r["onpolicy"] for r in log] == expected and 0 < sum(expected) < 6
    assert all("ct_skipped" in r and r["ct_skipped"] >= 0 for r in log)
    assert all(math.isfinite(r["loss"]) and 0 < r["one_to_one"] < 1 for r in log)


# ---- bad input -----------------------------------------------------------------------------


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


class Remote:
    root = "/srv/teacher"

    def root_is_local(self):
        return False


def batches(folder, convert=None):
    reader = ShardReader(folder, seed=0, epochs=None)
    return ShardBatches(
        reader, batch_tokens=256, max_rows=2, max_length=512, sort_window=2, convert=convert
    )


def test_teacher_tokenizer_not_found_is_one_line(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match="teacher tokenizer not found") as e:
        load_teacher_tokenizer(str(gone), Remote(), None)
    assert str(gone) in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load the teacher's tokenizer") as e:
        load_teacher_tokenizer(str(tmp_path / "empty"), Remote(), None)
    one_line(e)
    # A remote server: a teacher-vocabulary folder brings its teacher's tokenizer; with
    # ordinary shards there is none (the student's is assumed, and the probe decides).
    plain, cross = write_folders(tmp_path / "f", tiny_model_dir(), rows=2)
    s_tok = AutoTokenizer.from_pretrained(tiny_model_dir(vocab_size=576, seed=7))
    found = load_teacher_tokenizer("", Remote(), batches(cross, crosstok_rows(cross, s_tok)))
    assert tokenizer_fingerprint(found) == tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(tiny_model_dir())
    )
    assert load_teacher_tokenizer("", Remote(), batches(plain)) is None


def test_a_text_that_does_not_round_trip_is_one_line():
    student = byte_level_tokenizer(SINGLES, ".")
    nfkc = byte_level_tokenizer(SINGLES, ".", normalizer=normalizers.NFKC())
    for t in (student, nfkc):
        t.add_special_tokens({"eos_token": "<|im_end|>"})
        t.chat_template = CHAT_TEMPLATE
    ct = CrossTokTeacher(nfkc, student, [student.eos_token_id], "srv")
    ids = student("a \ufb01ne day", add_special_tokens=False).input_ids + [student.eos_token_id]
    with pytest.raises(CrossTokError, match="does not round-trip through the teacher") as e:
        ct.request(ids)
    one_line(e)
    assert ct.request(ids[:1] + ids[-1:]).teacher_ids == [
        nfkc.convert_tokens_to_ids("a"),
        nfkc.eos_token_id,
    ]


def test_prompt_sources_and_the_servers_tokenizer(tmp_path, teacher_dir, http_teacher, monkeypatch):
    """Ordinary shards (the student's ids) cannot give a teacher of another tokenizer its
    view; a teacher tokenizer that is not the server's fails the probe."""
    plain, cross = write_folders(tmp_path, teacher_dir, rows=2)
    t_tok = AutoTokenizer.from_pretrained(teacher_dir)
    fp = tokenizer_fingerprint(t_tok)

    with pytest.raises(ConfigError, match="shards of the student's tokenizer") as e:
        check_prompt_sources(batches(plain), fp)
    assert str(plain) in one_line(e)
    with pytest.raises(ConfigError, match="teacher-vocabulary shards .*student's tokenizer"):
        check_prompt_sources(batches(cross, crosstok_rows(cross, t_tok)), None)
    check_prompt_sources(batches(cross, crosstok_rows(cross, t_tok)), fp)
    other = AutoTokenizer.from_pretrained(tiny_model_dir(vocab_size=576, seed=7))
    monkeypatch.setattr(TeacherClient, "root_is_local", lambda self: False)
    with pytest.raises(TeacherMismatch, match="not the server's tokenizer") as e:
        TeacherClient(http_teacher.url, K).connect(t_tok, teacher_tokenizer=other)
    one_line(e)
    said = TeacherClient(http_teacher.url, K).connect(other, teacher_tokenizer=t_tok)
    assert said.endswith("tokenizer probe ok (remote)")


def test_prompts_from_a_file_get_the_teachers_template_and_a_step_with_no_sample_left(
    tmp_path, teacher_dir, teacher_lm
):
    """onpolicy.prompts: the teacher views are rendered with the teacher's chat template;
    when every sample is skipped the micro-batch trains no token and still runs (a prompt
    has no response to fall back to)."""
    from tests.precompute_helpers import write_jsonl
    from train.prompts import PromptBatches

    s_tok, lm = load(tiny_model_dir(vocab_size=576, seed=7))
    t_tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 2?"}]} for i in range(2)]
    prompts = PromptBatches(write_jsonl(tmp_path / "p.jsonl", rows), s_tok, max_rows=2,
                            max_length=512)  # fmt: skip
    check_prompt_sources(prompts, tokenizer_fingerprint(t_tok), t_tok)
    want = [render(t_tok, r["prompt"]) for r in rows]
    assert sorted(t.tolist() for t in prompts.teacher_prompt_ids) == sorted(want)
    assert want != [render(s_tok, r["prompt"]) for r in rows]
    markup = s_tok.convert_tokens_to_ids("<|im_start|>")
    ct = CrossTokTeacher(t_tok, s_tok, eos_ids(lm, s_tok), "srv")
    teacher = LMTeacher(teacher_lm)
    src = scripted(onpolicy(prompts, teacher, lm, s_tok, ct), [[markup, s_tok.eos_token_id]])
    batch = next(iter(src))
    assert src.pop_metrics()["ct_skipped"] == 2 and not teacher.requests
    assert batch.num_tokens == 0 and batch.ct_kind is not None and len(batch.ids) == 2
    out = DistillModule(lm, SPEC, chunk_tokens=16)(batch)
    out.loss.backward()
    assert float(out.loss) == 0.0

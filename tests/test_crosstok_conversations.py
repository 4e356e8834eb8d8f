"""Teacher-vocabulary conversation rows (issue #23): several trained assistant turns in one
row, written by precompute (precompute/teacher_vocab.py `conversation_crosstok`) and aligned
span by span at load (train/crosstok_rows.py), and mixtures of a teacher-vocabulary folder
with an ordinary one (train/setup.py, train/mixture.py).

Rows are built here as precompute builds them: the teacher's template renders the whole
conversation (datafiles.conversation.render_conversation), its spans' top-k are random.
References are naive float64 computations written here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from crosstok.tokens import token_table
from datafiles.conversation import render_conversation
from precompute.teacher_vocab import conversation_crosstok
from shards.errors import ShardError
from tests.fixtures.tiny_model import CHAT_TEMPLATE, tiny_model_dir
from tests.test_crosstok import SINGLES, byte_level_tokenizer, pairs_of
from tests.test_crosstok_train import TEXTS, naive_reference, random_topk, write_folders
from tests.train_helpers import train_tiny
from train.batches import collate
from train.chunked import LinearHead
from train.crosstok_loss import crosstok_loss
from train.crosstok_rows import KIND_FIRST, KIND_MAPPED, CrossTokRows
from train.losses import KDSpec, TeacherSignal, kd_loss
from train.spans import drop_turns

# Three trained assistant turns; the last text has an even number of bytes, the others not.
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where?"},
    {"role": "assistant", "content": TEXTS[0]},
    {"role": "user", "content": "How many?"},
    {"role": "assistant", "content": TEXTS[1]},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": TEXTS[5]},
]
TRAINED = [2, 4, 6]


def chat(tok, template: str = CHAT_TEMPLATE):
    tok.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def split_pair():
    """(teacher: byte pairs, student: single bytes), ChatML markers as special tokens."""
    pairs = chat(byte_level_tokenizer(SINGLES + pairs_of(TEXTS), ".."))
    singles = chat(byte_level_tokenizer(SINGLES, "."))
    return pairs, singles


def conversation_row(teacher, rng, messages=CONVERSATION, trained=TRAINED, row_id="c1") -> dict:
    """A conversation row of teacher-vocabulary shards as ShardReader yields it."""
    r = render_conversation(teacher, messages, trained)
    ids = np.asarray(r.ids)
    s0, end = r.spans[0][0], sum(r.spans[-1])
    n = sum(m for _, m in r.spans)
    topk, lps, tok_lp = random_topk(rng, n, token_table(teacher).vocab_size)
    ct = conversation_crosstok(
        token_table(teacher), teacher, messages, trained, None, None, r.ids, r.spans
    )
    return {
        "id": row_id,
        "meta": json.dumps({"crosstok": ct}),
        "prompt_ids": torch.tensor(ids[:s0], dtype=torch.int32),
        "teacher_prompt_ids": torch.tensor(ids[:s0], dtype=torch.int32),
        "response_ids": torch.tensor(ids[s0:end], dtype=torch.int32),
        "span_starts": torch.tensor([a for a, _ in r.spans]),
        "span_lengths": torch.tensor([m for _, m in r.spans]),
        "turn_starts": torch.tensor([a for a, _ in r.turns if a < end]),
        "turn_roles": [role for a, role in r.turns if a < end],
        "topk_ids": torch.from_numpy(topk),
        "topk_logprobs": torch.from_numpy(lps),
        "tail_logprob": torch.log1p(-torch.from_numpy(lps).double().exp().sum(1)).float(),
        "token_logprob": torch.from_numpy(tok_lp),
    }


def test_precompute_keeps_each_turns_text_and_token_bytes(split_pair):
    pairs, _ = split_pair
    row = conversation_row(pairs, np.random.default_rng(0))
    ct = json.loads(row["meta"])["crosstok"]
    assert set(ct) == {"messages", "thinking", "spans"} and ct["messages"] == CONVERSATION
    assert [s["message"] for s in ct["spans"]] == TRAINED
    assert [s["response_text"] for s in ct["spans"]] == [
        CONVERSATION[j]["content"] for j in TRAINED
    ]
    conv = torch.cat([row["prompt_ids"], row["response_ids"]]).numpy()
    table = token_table(pairs)
    for s, a, n in zip(ct["spans"], row["span_starts"], row["span_lengths"], strict=True):
        data = s["response_text"].encode()
        ids = conv[int(a) : int(a) + int(n)]
        assert len(s["token_bytes"]) == len(ids)
        assert b"".join(data[x:y] for x, y in s["token_bytes"]) == data
        assert [data[x:y] for x, y in s["token_bytes"][:-1]] == [table.pieces[i] for i in ids[:-1]]
        assert s["token_bytes"][-1] == [len(data), len(data)]  # the end of turn: markup
    # One trained turn: the single-turn form, unchanged.
    one = conversation_row(pairs, np.random.default_rng(0), CONVERSATION[:3], [2])
    ct1 = json.loads(one["meta"])["crosstok"]
    assert set(ct1) == {"prompt_messages", "thinking", "response_text", "token_bytes"}
    assert ct1["prompt_messages"] == CONVERSATION[:2] and ct1["response_text"] == TEXTS[0]


def test_each_turn_aligned_with_chain_rule_block_logprobs(split_pair):
    """Teacher = single bytes, student = byte pairs, three turns: the student's own template
    renders the conversation, and each student pair is one block of two teacher tokens of
    its turn whose logprob is the naive float64 chain-rule product."""
    pairs, singles = split_pair
    row = conversation_row(singles, np.random.default_rng(1))
    out = CrossTokRows("f", singles, pairs)(row)
    mine = render_conversation(pairs, CONVERSATION, TRAINED)
    end = sum(mine.spans[-1])
    conv = torch.cat([out["prompt_ids"], out["response_ids"]])
    assert conv.tolist() == mine.ids[:end]
    assert out["span_starts"].tolist() == [a for a, _ in mine.spans]
    assert out["span_lengths"].tolist() == [m for _, m in mine.spans]
    assert out["turn_roles"] == [r for a, r in mine.turns if a < end]
    n_s = sum(m for _, m in mine.spans)
    assert len(out["ct_kind"]) == len(out["topk_ids"]) == n_s
    t_lp = row["token_logprob"].double().numpy()
    kinds, blp = out["ct_kind"].numpy(), out["ct_block_logprob"].double().numpy()
    t_at, s_at = 0, 0
    for j in TRAINED:
        n = len(CONVERSATION[j]["content"].encode())
        for b in range(n // 2):
            assert kinds[s_at + b] == KIND_FIRST
            want = math.log(math.exp(t_lp[t_at + 2 * b]) * math.exp(t_lp[t_at + 2 * b + 1]))
            assert abs(blp[s_at + b] - want) < 1e-6
        m = (n + 1) // 2 + 1  # pairs, a last single byte when n is odd, the end of turn
        assert kinds[s_at + m - 1] == KIND_MAPPED
        assert int(conv[out["span_starts"][TRAINED.index(j)] + m - 1]) == pairs.eos_token_id
        if n % 2:
            assert kinds[s_at + m - 2] == KIND_MAPPED
        t_at, s_at = t_at + n + 1, s_at + m
    assert t_at == len(t_lp) and s_at == n_s
    # data.overlong=drop_turns removes the first turn with its spans' kinds and block logprobs.
    first = int(out["span_lengths"][0])
    short = drop_turns(out, len(conv) - 1)
    assert short["span_lengths"].tolist() == out["span_lengths"][1:].tolist()
    for key in ("ct_kind", "ct_block_logprob", "topk_ids"):
        assert torch.equal(short[key], out[key][first:]), key
    assert collate([short], 4096).num_tokens == n_s - first


def mapped_forward_kl(logits, ids, logprobs, tail_logprob) -> float:
    """float64 forward KL on the mapped top-k buckets plus the tail bucket, summed."""
    q_all = torch.softmax(logits.double(), dim=1)
    total = 0.0
    for i in range(len(ids)):
        valid = ids[i] >= 0
        p = logprobs[i][valid].double().exp()
        q = q_all[i, ids[i][valid]]
        p_tail, q_tail = math.exp(float(tail_logprob[i])), 1 - float(q.sum())
        total += float((p * (p / q).log()).sum()) + p_tail * math.log(p_tail / q_tail)
    return total


def test_conversation_loss_against_float64(split_pair):
    """Teacher = byte pairs, student = single bytes (each teacher token split in two), three
    turns in one row: the loss over every span's student tokens (merged blocks, a last
    single byte, each turn's end) equals the naive float64 chain rule + ULD + mapped KL."""
    pairs, singles = split_pair
    row = CrossTokRows("f", pairs, singles)(conversation_row(pairs, np.random.default_rng(2)))
    batch = collate([row], 4096)
    kinds = batch.ct_kind
    n = batch.num_tokens
    assert n == len(row["ct_kind"]) and (kinds == 0).sum() == 3 + 2  # 3 ends, 2 odd bytes
    gen = torch.Generator().manual_seed(0)
    vocab, h = len(singles), 16
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, h, generator=gen, dtype=torch.float64) * 0.5
    logits = hidden @ weight.T
    spec = KDSpec(divergence="forward_kl", tail="tail_bucket")
    rest, one = kinds != 0, kinds == 0
    first = kinds[rest] == 1
    for uld_weight in (0.0, 0.7):
        got = crosstok_loss(
            LinearHead(hidden.float(), weight.float()),
            batch.targets,
            kinds,
            batch.topk_ids,
            batch.topk_logprobs,
            batch.tail_logprob,
            batch.token_logprob,
            batch.ct_block_logprob,
            spec=spec,
            uld_weight=uld_weight,
            chunk_tokens=7,
        )
        want = naive_reference(
            logits[rest],
            batch.targets[rest],
            kinds[rest].tolist(),
            batch.ct_block_logprob[rest],
            batch.topk_logprobs[rest][first],
            uld_weight,
        ) + mapped_forward_kl(
            logits[one], batch.topk_ids[one], batch.topk_logprobs[one], batch.tail_logprob[one]
        )
        assert abs(float(got.loss) - want) < 1e-4 * max(1.0, abs(want)), (float(got.loss), want)
        assert float(got.stats["one_to_one"]) == 5 and float(got.stats["tokens"]) == n


@pytest.mark.parametrize(
    "spec",
    [
        KDSpec(divergence="forward_kl", tail="tail_bucket"),
        KDSpec(divergence="jsd", tail="renormalize", beta=0.3, alpha=0.6, temperature=2.0),
    ],
    ids=["fkl", "jsd-ce"],
)
def test_same_tokenizer_conversation_equals_the_id_path(spec):
    """The same tokenizer on both sides: the converted conversation row is the ordinary
    row (ids, spans, turns, top-k), every token one-to-one, and loss and gradients equal
    the id path's within 1e-6."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    row = conversation_row(tok, np.random.default_rng(3))
    out = CrossTokRows("f", tok, tok)(row)
    for key in ("prompt_ids", "response_ids", "span_starts", "span_lengths", "turn_starts"):
        assert out[key].tolist() == row[key].tolist(), key
    assert out["turn_roles"] == row["turn_roles"]
    assert (out["ct_kind"] == KIND_MAPPED).all()
    plain = {k: v for k, v in row.items() if k != "meta"}
    b_p, b_c = collate([plain], 4096), collate([out], 4096)
    assert torch.equal(b_p.topk_ids, b_c.topk_ids) and torch.equal(b_p.positions, b_c.positions)
    gen = torch.Generator().manual_seed(1)
    n, h = b_p.num_tokens, 32
    weight = torch.randn(len(tok), h, generator=gen) * 0.3

    def run(batch, ct: bool):
        hidden = torch.randn(n, h, generator=torch.Generator().manual_seed(2)).requires_grad_()
        head = LinearHead(hidden, weight)
        if ct:
            loss = crosstok_loss(
                head,
                batch.targets,
                batch.ct_kind,
                batch.topk_ids,
                batch.topk_logprobs,
                batch.tail_logprob,
                batch.token_logprob,
                batch.ct_block_logprob,
                spec=spec,
                uld_weight=1.0,
                chunk_tokens=16,
            ).loss
        else:
            teacher = TeacherSignal(
                batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, batch.token_logprob
            )
            loss = kd_loss(head, teacher, spec=spec, targets=batch.targets, chunk_tokens=16).loss
        loss.backward()
        return loss.detach(), hidden.grad

    (l_p, g_p), (l_c, g_c) = run(b_p, False), run(b_c, True)
    torch.testing.assert_close(l_c, l_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_c, g_p, rtol=0, atol=1e-6)


# ---- bad input -----------------------------------------------------------------------------


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_turn_the_student_renders_otherwise_is_one_line(split_pair):
    """A span that cannot be aligned: the student's template changes a turn's text (upper
    case from the second turn on), or ends its turns without an end-of-turn token."""
    pairs, _ = split_pair
    row = conversation_row(pairs, np.random.default_rng(4), row_id="r9")
    upper = chat(
        byte_level_tokenizer(SINGLES, "."),
        CHAT_TEMPLATE.replace(
            "message['content']",
            "(message['content'] | upper if loop.index > 3 else message['content'])",
        ),
    )
    with pytest.raises(ShardError, match="span 1 .message 4.: the student's rendering") as e:
        CrossTokRows("/data/shards", pairs, upper)(row)
    msg = one_line(e)
    assert "/data/shards" in msg and "'r9'" in msg and "meta.crosstok" in msg
    plain = chat(
        byte_level_tokenizer(SINGLES, "."),
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    )
    with pytest.raises(ShardError, match="span 0 .message 2.: .* end-of-turn token") as e:
        CrossTokRows("/data/shards", pairs, plain)(row)
    assert "'r9'" in one_line(e)


def test_malformed_conversation_rows_are_one_line(split_pair):
    pairs, singles = split_pair
    convert = CrossTokRows("/data/shards", pairs, singles)
    row = conversation_row(pairs, np.random.default_rng(5), row_id="r3")
    meta = json.loads(row["meta"])
    for change, match in (
        (lambda ct: ct["spans"].pop(), "2 spans in meta.crosstok for the row's 3"),
        (lambda ct: ct["spans"][1].update(message=3), "not ascending indices of assistant"),
        (
            lambda ct: ct["spans"][2]["token_bytes"].pop(0),
            r"span 2 .message 6.: \d+ token_bytes spans for its \d+",
        ),
        (lambda ct: ct.pop("messages"), "meta.crosstok missing or malformed"),
    ):
        ct = json.loads(json.dumps(meta["crosstok"]))
        change(ct)
        with pytest.raises(ShardError, match=match) as e:
            convert({**row, "meta": json.dumps({"crosstok": ct})})
        assert "'r3'" in one_line(e) and "meta.crosstok" in str(e.value)


# ---- mixtures ------------------------------------------------------------------------------


def test_mixture_of_a_teacher_vocabulary_folder_and_an_ordinary_one_trains(tmp_path):
    """A student (vocabulary 576) trains from a mixture of teacher-vocabulary shards of the
    tiny teacher (512) and ordinary shards of its own tokenizer: each batch comes from one
    folder, both are drawn, and every step logs the same stats."""
    teacher, student = tiny_model_dir(), tiny_model_dir(vocab_size=576, seed=7)
    _, cross = write_folders(tmp_path / "t", teacher, rows=12, crosstok_only=True)
    plain, _ = write_folders(tmp_path / "s", student, rows=12)
    metrics = train_tiny(
        "configs/train/skd.yaml",
        tmp_path / "run",
        student,
        f"{cross}:0.5,{plain}:0.5",
        "max_steps=4",
        "grad_accum=2",
        "data.batch_tokens=128",
    )
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    shares = [(r["mix/cross"], r["mix/plain"]) for r in metrics]
    assert 0 < shares[-1][0] < 1 and abs(sum(shares[-1]) - 1) < 1e-9
    assert all(math.isfinite(r["loss"]) and 0 < r["one_to_one"] <= 1 for r in metrics)
    assert any(r["one_to_one"] < 1 and r["uld"] > 0 for r in metrics)

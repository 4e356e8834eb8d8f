"""Training from teacher-vocabulary shards (issue #23 §2): the load path (train/crosstok_rows.py),
the loss (train/crosstok_loss.py), the trainer end to end, and the bad-input lines.

Teacher-vocabulary shards are written here with ShardWriter in the contract's format
(metadata.extra["vocabulary"], row meta["crosstok"]); the teacher tokenizer is found by path.
References are naive float64 computations written here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import normalizers
from transformers import AutoTokenizer

from crosstok.tokens import token_table
from shards.errors import ShardError
from shards.fingerprint import tokenizer_fingerprint
from shards.reader import read_rows
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from tests.fixtures.tiny_model import CHAT_TEMPLATE, tiny_model_dir
from tests.test_crosstok import SINGLES, byte_level_tokenizer, pairs_of
from tests.train_helpers import train_tiny
from train.batches import collate
from train.chunked import LinearHead
from train.crosstok_loss import crosstok_loss
from train.crosstok_rows import KIND_FIRST, KIND_MAPPED, CrossTokRows, crosstok_rows
from train.losses import KDSpec

K = 8
TEXTS = [
    "The capital of France is Paris.",
    "She has eight apples, because three plus five is eight.",
    "It travels two hundred and forty miles.",
    "Seven times six is forty-two.",
    "Half of forty is twenty, and a quarter of forty is ten.",
    "Naïve café: 日本語!",
]


def random_topk(rng, n: int, ids_from: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n, K) distinct, logprobs (n, K) with mass < 1, token logprobs (n,))."""
    ids = np.stack([rng.choice(ids_from, K, replace=False) for _ in range(n)])
    logits = rng.standard_normal((n, K + 1)) * 3
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return ids, lp[:, :K].astype(np.float32), lp[:, 0].astype(np.float32)


def token_spans(table, ids, eos: bool) -> list[list[int]]:
    ends = np.cumsum(table.lengths[ids[: len(ids) - int(eos)]])
    spans = [[int(a), int(b)] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)]
    return spans + ([[int(ends[-1]), int(ends[-1])]] if eos else [])


def write_folders(root, tok_dir, *, rows: int = 24, crosstok_only: bool = False):
    """(ordinary folder, teacher-vocabulary folder): the same rows of the tokenizer at
    `tok_dir`, as id-level shards and as teacher-vocabulary shards (prompt as messages,
    response text and token byte spans), each response ending in the EOS token."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    table = token_table(tok)
    fp = tokenizer_fingerprint(tok)
    rng = np.random.default_rng(0)
    meta = dict(k=K, vocab_size=table.vocab_size, teacher="t", teacher_fingerprint="w")
    voc = {
        "kind": "teacher",
        "teacher_tokenizer_fingerprint": fp,
        "teacher_tokenizer": {"path": str(tok_dir)},
        "student_tokenizer_fingerprint": "",
    }
    plain = root / "plain"
    cross = root / "cross"
    writers = [
        ShardWriter(
            cross,
            ShardMetadata(**meta, tokenizer_fingerprint=fp, extra={"vocabulary": voc}),
            batch_tokens=128,
        )
    ]
    if not crosstok_only:
        writers.append(
            ShardWriter(plain, ShardMetadata(**meta, tokenizer_fingerprint=fp), batch_tokens=128)
        )
    for i in range(rows):
        messages = [{"role": "user", "content": f"Question {i}: say something."}]
        text = TEXTS[i % len(TEXTS)]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        response = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids, lps, tok_lp = random_topk(rng, len(response), table.vocab_size)
        ct = {"prompt_messages": messages, "thinking": None, "response_text": text}
        ct["token_bytes"] = token_spans(table, np.array(response), eos=True)
        for w in writers:
            w.add(
                ShardRow(
                    id=f"r{i}",
                    prompt_ids=prompt_ids,
                    teacher_prompt_ids=prompt_ids,
                    response_ids=response,
                    topk_ids=ids,
                    topk_logprobs=lps,
                    token_logprobs=tok_lp,
                    meta={"crosstok": ct} if w is writers[0] else None,
                )
            )
    for w in writers:
        w.close()
    return plain, cross


@pytest.fixture(scope="module")
def teacher_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, teacher_dir):
    return write_folders(tmp_path_factory.mktemp("ct"), teacher_dir)


# ---- exactness -----------------------------------------------------------------------------


def loss_and_grads(module, batch):
    module.zero_grad()
    out = module(batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "spec",
    [
        KDSpec(divergence="forward_kl", tail="tail_bucket"),
        KDSpec(divergence="jsd", tail="renormalize", beta=0.3, alpha=0.6, temperature=2.0),
    ],
    ids=["fkl", "jsd-ce"],
)
def test_same_tokenizer_equals_the_id_path(folders, teacher_dir, spec):
    """The same tokenizer on both sides, written as teacher-vocabulary shards: every token is
    one-to-one, the map is the identity, and loss and gradients equal the id path's (1e-6)."""
    from transformers import AutoModelForCausalLM

    from train.model import DistillModule

    plain, cross = folders
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    convert = crosstok_rows(cross, tok)
    rows_p = list(read_rows(plain))
    rows_c = [convert(r) for r in read_rows(cross)]
    for a, b in zip(rows_p, rows_c, strict=True):
        assert torch.equal(a["prompt_ids"].long(), b["prompt_ids"])
        assert torch.equal(a["response_ids"].long(), b["response_ids"])
        assert (b["ct_kind"] == KIND_MAPPED).all()
    batch_p, batch_c = collate(rows_p[:8], 512), collate(rows_c[:8], 512)
    assert torch.equal(batch_p.topk_ids, batch_c.topk_ids)
    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    module = DistillModule(lm, spec, chunk_tokens=16, uld_weight=1.0)
    out_p, g_p = loss_and_grads(module, batch_p)
    out_c, g_c = loss_and_grads(module, batch_c)
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=0, atol=1e-6)
    assert out_c.stats["one_to_one"] == out_c.stats["tokens"] == batch_p.num_tokens
    assert float(out_c.stats["uld"]) == 0.0
    assert g_p.keys() == g_c.keys()
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def split_pair():
    """(teacher: byte pairs, student: single bytes), with an EOS and a chat template."""
    teacher = byte_level_tokenizer(SINGLES + pairs_of(TEXTS), "..")
    student = byte_level_tokenizer(SINGLES, ".")
    for t in (teacher, student):
        t.add_special_tokens({"eos_token": "<|im_end|>"})
        t.chat_template = CHAT_TEMPLATE
    return teacher, student


def teacher_row(teacher, text: str, rng, *, eos: bool = True, row_id: str = "x") -> dict:
    """A row as ShardReader yields it from a teacher-vocabulary folder."""
    table = token_table(teacher)
    ids = teacher(text, add_special_tokens=False).input_ids + (
        [teacher.eos_token_id] if eos else []
    )
    topk, lps, tok_lp = random_topk(rng, len(ids), table.vocab_size)
    ct = {
        "prompt_messages": [{"role": "user", "content": "Say it."}],
        "thinking": None,
        "response_text": text,
        "token_bytes": token_spans(table, np.array(ids), eos=eos),
    }
    return {
        "id": row_id,
        "meta": json.dumps({"crosstok": ct}),
        "prompt_ids": torch.zeros(3, dtype=torch.int32),
        "teacher_prompt_ids": torch.zeros(3, dtype=torch.int32),
        "response_ids": torch.tensor(ids, dtype=torch.int32),
        "topk_ids": torch.from_numpy(topk),
        "topk_logprobs": torch.from_numpy(lps),
        "tail_logprob": torch.log1p(-torch.from_numpy(lps).double().exp().sum(1)).float(),
        "token_logprob": torch.from_numpy(tok_lp),
    }


def test_teacher_split_in_two_gives_chain_rule_block_logprobs(split_pair):
    """Teacher = single bytes, student = byte pairs: each student token is one block of two
    teacher tokens whose logprob is log(p1 p2), the naive float64 chain-rule product."""
    pairs, singles = split_pair
    rng = np.random.default_rng(1)
    convert = CrossTokRows("f", singles, pairs)
    for text in TEXTS:
        row = teacher_row(singles, text, rng)
        out = convert(row)
        n = len(text.encode())
        t_lp = row["token_logprob"].double().numpy()
        kinds = out["ct_kind"].numpy()
        assert len(out["response_ids"]) == (n + 1) // 2 + 1  # + EOS
        for j in range(n // 2):
            assert kinds[j] == KIND_FIRST
            want = math.log(math.exp(t_lp[2 * j]) * math.exp(t_lp[2 * j + 1]))
            assert abs(float(out["ct_block_logprob"][j]) - want) < 1e-6
        assert kinds[-1] == KIND_MAPPED  # the EOS, mapped to the student's
        assert int(out["response_ids"][-1]) == pairs.eos_token_id


def naive_reference(logits, targets, kinds, block_lp, t_first_lp, uld_weight):
    """float64: forward KL on {span, rest} per merged block, with the student's span
    probability the product of its tokens' softmax probabilities, plus ULD at the first
    token of each block (sorted probabilities, zero-padded, L1)."""
    p_all = torch.softmax(logits.double(), dim=1)
    total, j, blocks = 0.0, 0, 0
    n = len(kinds)
    while j < n:
        end = j + 1
        while end < n and kinds[end] == 2:
            end += 1
        q = 1.0
        for i in range(j, end):
            q *= float(p_all[i, targets[i]])
        p = math.exp(float(block_lp[j]))
        total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        s = torch.sort(p_all[j], descending=True).values
        t = torch.sort(t_first_lp[blocks].double().exp(), descending=True).values
        t = torch.nn.functional.pad(t, (0, len(s) - len(t)))
        total += uld_weight * float((s - t).abs().sum())
        blocks += 1
        j = end
    return total


def test_student_split_in_two_loss_against_float64(split_pair):
    """Teacher = byte pairs, student = single bytes (each teacher token split in two): the
    loss of the merged blocks equals the naive float64 chain rule + ULD reference."""
    pairs, singles = split_pair
    rng = np.random.default_rng(2)
    convert = CrossTokRows("f", pairs, singles)
    text = TEXTS[5]  # an even number of bytes: every block merged but the EOS
    assert len(text.encode()) % 2 == 0
    out = convert(teacher_row(pairs, text, rng))
    kinds = out["ct_kind"]
    n = len(kinds)
    assert (kinds[:-1:2] == 1).all() and (kinds[1:-1:2] == 2).all() and kinds[-1] == 0
    gen = torch.Generator().manual_seed(0)
    vocab, h = len(singles), 16
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, h, generator=gen, dtype=torch.float64) * 0.5
    targets = out["response_ids"]
    spec = KDSpec(divergence="forward_kl", tail="tail_bucket")
    m = n - 1  # the merged tokens (the EOS is checked by test_same_tokenizer_... paths)
    for uld_weight in (0.0, 0.7):
        got = crosstok_loss(
            LinearHead(hidden[:m].float(), weight.float()),
            targets[:m],
            kinds[:m],
            out["topk_ids"][:m],
            out["topk_logprobs"][:m],
            out["tail_logprob"][:m],
            out["token_logprob"][:m],
            out["ct_block_logprob"][:m],
            spec=spec,
            uld_weight=uld_weight,
            chunk_tokens=5,  # chunks that cut blocks in the middle
        )
        first = kinds[:m] == 1
        want = naive_reference(
            hidden[:m] @ weight.T,
            targets[:m],
            kinds[:m].tolist(),
            out["ct_block_logprob"][:m],
            out["topk_logprobs"][:m][first],
            uld_weight,
        )
        assert abs(float(got.loss) - want) < 1e-4 * max(1.0, abs(want)), (float(got.loss), want)
        assert float(got.stats["one_to_one"]) == 0 and float(got.stats["tokens"]) == m
    # and it has gradients
    hid = hidden[:m].float().requires_grad_()
    crosstok_loss(
        LinearHead(hid, weight.float()),
        targets[:m],
        kinds[:m],
        out["topk_ids"][:m],
        out["topk_logprobs"][:m],
        out["tail_logprob"][:m],
        out["token_logprob"][:m],
        out["ct_block_logprob"][:m],
        spec=spec,
        uld_weight=1.0,
        chunk_tokens=4,
    ).loss.backward()
    assert torch.isfinite(hid.grad).all() and hid.grad.abs().sum() > 0


def test_truncation_never_trains_part_of_a_merged_block(split_pair):
    """data.overlong=truncate cutting a row inside a merged block leaves the whole block
    untrained (its chain-rule logprob covers all of it)."""
    pairs, singles = split_pair
    row = CrossTokRows("f", pairs, singles)(teacher_row(pairs, TEXTS[0], np.random.default_rng(5)))
    p = len(row["prompt_ids"])
    for budget in range(p + 2, p + 9):
        batch = collate([row], budget)
        n = batch.num_tokens
        assert n % 2 == 0 and n >= budget - p - 2  # whole pairs only, at most one block cut
        assert batch.ct_kind[:n:2].eq(1).all() and batch.ct_kind[1:n:2].eq(2).all()


# ---- the trainer ---------------------------------------------------------------------------


def test_training_from_teacher_vocabulary_shards_runs_and_resumes(tmp_path, folders):
    """A student with another tokenizer (vocabulary 576 vs the teacher's 512) trains from
    the teacher-vocabulary folder; stopped after step 1 and resumed, it logs the same steps
    as a straight run."""
    _, cross = folders
    student = tiny_model_dir(vocab_size=576, seed=7)
    common = ["max_steps=3", "save_every=1", "data.batch_tokens=128"]
    straight = train_tiny("configs/train/skd.yaml", tmp_path / "a", student, cross, *common)
    train_tiny("configs/train/skd.yaml", tmp_path / "b", student, cross, *common, "stop_at=1")
    resumed = train_tiny(
        "configs/train/skd.yaml", tmp_path / "b", student, cross, *common, "resume=true"
    )
    assert [r["step"] for r in resumed] == [1, 2, 3]
    key = [(r["step"], r["loss"], r["tokens"], r["uld"]) for r in straight]
    assert [(r["step"], r["loss"], r["tokens"], r["uld"]) for r in resumed] == key
    from safetensors.torch import load_file

    final = [
        load_file(tmp_path / d / "checkpoints/step-0000003/model/model.safetensors")
        for d in ("a", "b")
    ]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert all(0 < r["one_to_one"] < 1 and r["uld"] > 0 for r in straight)
    assert all(math.isfinite(r["loss"]) for r in straight)


def test_ordinary_folder_of_another_tokenizer_still_refused(folders):
    plain, _ = folders
    other = AutoTokenizer.from_pretrained(tiny_model_dir(vocab_size=576, seed=7))
    assert crosstok_rows(plain, other) is None
    from shards.reader import ShardReader

    with pytest.raises(ShardError, match="tokenizer fingerprint"):
        ShardReader(plain, expected_tokenizer_fingerprint=tokenizer_fingerprint(other))


# ---- bad input -----------------------------------------------------------------------------


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_student_that_cannot_represent_the_text_is_one_line(split_pair):
    pairs, singles = split_pair
    nfkc = byte_level_tokenizer(SINGLES, ".", normalizer=normalizers.NFKC())
    nfkc.add_special_tokens({"eos_token": "<|im_end|>"})
    nfkc.chat_template = CHAT_TEMPLATE
    row = teacher_row(singles, "a \ufb01ne day", np.random.default_rng(3), row_id="r7")
    with pytest.raises(ShardError, match="cannot represent the text") as e:
        CrossTokRows("/data/shards", singles, nfkc)(row)
    msg = one_line(e)
    assert "/data/shards" in msg and "'r7'" in msg and "normaliser" in msg


def test_malformed_rows_are_one_line(split_pair):
    pairs, singles = split_pair
    convert = CrossTokRows("/data/shards", singles, pairs)
    row = teacher_row(singles, "abcd", np.random.default_rng(4), row_id="r1")
    with pytest.raises(ShardError, match="meta.crosstok missing") as e:
        convert({**row, "meta": None})
    assert "'r1'" in one_line(e)
    meta = json.loads(row["meta"])
    meta["crosstok"]["token_bytes"][1] = [1, 3]
    with pytest.raises(ShardError, match="do not tile") as e:
        convert({**row, "meta": json.dumps(meta)})
    meta["crosstok"]["token_bytes"] = meta["crosstok"]["token_bytes"][:-1]
    with pytest.raises(ShardError, match="4 token_bytes spans .* 5 response tokens") as e:
        convert({**row, "meta": json.dumps(meta)})
    one_line(e)


def test_missing_teacher_tokenizer_is_one_line(tmp_path, teacher_dir):
    _, cross = write_folders(tmp_path, teacher_dir, rows=2, crosstok_only=True)
    meta_files = list(cross.glob("*manifest*"))
    assert meta_files
    for f in meta_files:
        f.write_text(f.read_text().replace(str(teacher_dir), str(tmp_path / "gone")))
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    with pytest.raises(ShardError, match="teacher tokenizer not found") as e:
        crosstok_rows(cross, tok)
    assert str(cross) in one_line(e)

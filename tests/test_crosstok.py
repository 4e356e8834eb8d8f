"""Tests for crosstok/ (alignment, chain-rule spans, vocabulary map) and the cross-tokenizer
losses of train/losses.py (kd_loss_mapped, uld_loss), with tokenizers built here (no files,
no weights) and naive float64 references written here.

The constructed pair: both tokenizers are byte-level (GPT-2 byte alphabet, ByteLevel decoder);
the teacher cuts the text's bytes into consecutive PAIRS (a WordLevel vocabulary of the 256
single bytes and the byte pairs of the test texts), the student into single BYTES. So every
teacher token of two bytes is exactly two student tokens, and pairs cut multi-byte UTF-8
characters ('é' is 2 bytes, '日' is 3) in the middle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from crosstok.align import align_lengths, align_text
from crosstok.spans import block_logprobs
from crosstok.tokens import CrossTokError, check_tokens, encode_exact, token_table
from crosstok.vocab import build_vocab_map, map_topk, vocab_map
from train.losses import KDSpec, TeacherSignal, kd_loss, kd_loss_mapped, uld_loss

F64 = torch.float64
B2U = bytes_to_unicode()
TEXTS = [
    "The cat sat on the mat.",
    "Naïve café: 日本語 and 😀 emoji!\nNew line, odd",
    "a",
]


def byte_level_tokenizer(pieces, split: str, normalizer=None) -> PreTrainedTokenizerFast:
    """A byte-level WordLevel tokenizer: the text's bytes (as GPT-2 byte characters) cut by
    the regex `split` into pieces looked up in `pieces` (a list of bytes; [UNK] is id 0)."""
    vocab = {"[UNK]": 0}
    for p in pieces:
        vocab.setdefault("".join(B2U[b] for b in p), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


SINGLES = [bytes([b]) for b in range(256)]


def pairs_of(texts) -> list[bytes]:
    out = []
    for t in texts:
        data = t.encode()
        out += [data[i : i + 2] for i in range(0, len(data) - 1, 2)]
    return out


@pytest.fixture(scope="module")
def pair():
    """(teacher: byte pairs, student: single bytes) and their token tables."""
    teacher = byte_level_tokenizer(SINGLES + pairs_of(TEXTS), "..")
    student = byte_level_tokenizer(SINGLES, ".")
    return teacher, student, token_table(teacher), token_table(student)


# ---- alignment -------------------------------------------------------------------------------


def test_token_table_reads_byte_level_pieces(pair):
    teacher, _, t_table, _ = pair
    for text in TEXTS:
        ids, lengths = encode_exact(teacher, t_table, text, role="teacher")
        assert b"".join(t_table.pieces[i] for i in ids) == text.encode()
        assert lengths.sum() == len(text.encode())
    assert t_table.special[0] and t_table.pieces[0] == b"[UNK]"


def test_same_tokenizer_aligns_one_to_one(pair):
    teacher, _, t_table, _ = pair
    for text in TEXTS:
        ids, _ = encode_exact(teacher, t_table, text, role="teacher")
        al, s_ids = align_text(text, ids, t_table, teacher, t_table)
        assert s_ids == ids
        assert al.one_to_one.all()
        np.testing.assert_array_equal(al.teacher[:, 0], np.arange(len(ids)))
        np.testing.assert_array_equal(al.student, al.teacher)
        # span logprobs over the identity alignment are the token logprobs themselves
        lp = -torch.rand(len(ids), generator=torch.Generator().manual_seed(len(ids)))
        torch.testing.assert_close(block_logprobs(lp, al.teacher), lp, rtol=0, atol=0)


def test_split_in_two_merges_each_pair(pair):
    """Each teacher token of 2 bytes is one block with the 2 student bytes under it (also
    where the pair ends inside a UTF-8 character); a trailing single byte maps one to one."""
    teacher, student, t_table, s_table = pair
    for text in TEXTS:
        n = len(text.encode())
        ids, _ = encode_exact(teacher, t_table, text, role="teacher")
        al, s_ids = align_text(text, ids, t_table, student, s_table)
        assert len(s_ids) == n and len(ids) == (n + 1) // 2
        want = [(range(i, i + 1), range(2 * i, min(2 * i + 2, n))) for i in range(len(ids))]
        assert al.blocks() == want
        assert al.one_to_one.sum() == n % 2


def test_alignment_merges_the_smallest_equal_groups():
    # teacher 2|3|1 (ends 2, 5, 6), student 1|2|1|2 (ends 1, 3, 4, 6): common {0, 6} only,
    # so the whole text is one block.
    al = align_lengths([2, 3, 1], [1, 2, 1, 2])
    assert al.blocks() == [(range(0, 3), range(0, 4))]
    # teacher 2|1|3 (ends 2, 3, 6), student 1|1|1|3 (ends 1, 2, 3, 6): common {0, 2, 3, 6}.
    al = align_lengths([2, 1, 3], [1, 1, 1, 3])
    assert al.blocks() == [
        (range(0, 1), range(0, 2)),
        (range(1, 2), range(2, 3)),
        (range(2, 3), range(3, 4)),
    ]
    assert al.one_to_one.tolist() == [False, True, True]
    assert al.block_of_teacher().tolist() == [0, 1, 2]
    assert al.block_of_student().tolist() == [0, 0, 1, 2]
    with pytest.raises(CrossTokError, match="not the same text"):
        align_lengths([2, 2], [3])
    with pytest.raises(CrossTokError, match="positive"):
        align_lengths([2, 0], [2])


# ---- chain rule ------------------------------------------------------------------------------


def test_block_logprobs_are_chain_rule_products(pair):
    """A random bigram 'model' over student bytes gives each student token's conditional
    logprob; each teacher token's block probability must be the product of its two bytes'
    conditional probabilities, computed here in float64 by walking the text."""
    teacher, student, t_table, s_table = pair
    g = torch.Generator().manual_seed(0)
    bigram = torch.randn(257, 256, generator=g, dtype=F64).log_softmax(1)  # row 256: start
    for text in TEXTS:
        data = text.encode()
        ids, _ = encode_exact(teacher, t_table, text, role="teacher")
        al, s_ids = align_text(text, ids, t_table, student, s_table)
        prev = [256, *data[:-1]]
        token_lp = torch.tensor(
            [float(bigram[p, b]) for p, b in zip(prev, data, strict=True)], dtype=F64
        )
        got = block_logprobs(token_lp.float().requires_grad_(), al.student)
        assert got.dtype == torch.float32
        for i in range(len(ids)):  # naive: teacher token i covers bytes 2i, 2i + 1
            want = 1.0
            for j in range(2 * i, min(2 * i + 2, len(data))):
                want *= math.exp(float(bigram[prev[j], data[j]]))
            assert math.isclose(math.exp(float(got[i].detach())), want, rel_tol=1e-5)
        # the identity alignment gives the token logprobs back
        one = block_logprobs(
            token_lp, np.stack([np.arange(len(data)), np.arange(1, len(data) + 1)], 1)
        )
        torch.testing.assert_close(one, token_lp.float(), rtol=0, atol=0)


def test_block_logprobs_gradient_and_bad_ranges():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    out = block_logprobs(lp, np.array([[0, 2], [2, 3]]))
    (out * torch.tensor([3.0, 5.0])).sum().backward()
    assert lp.grad.tolist() == [3.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="tile"):
        block_logprobs(lp.detach(), np.array([[0, 2]]))
    with pytest.raises(ValueError, match="consecutive"):
        block_logprobs(lp.detach(), np.array([[0, 2], [1, 3]]))


# ---- vocabulary map --------------------------------------------------------------------------


def sentencepiece_tokenizer(words) -> PreTrainedTokenizerFast:
    """A Metaspace WordLevel tokenizer: '▁word' pieces, '<0xNN>' byte pieces."""
    vocab = {"<unk>": 0, "<0xC3>": 1}
    for w in words:
        vocab.setdefault(w.replace(" ", "\u2581"), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_vocab_map_by_bytes_across_conventions(pair, tmp_path):
    """'Ġthe' (byte-level) and '▁the' (SentencePiece) are both b' the'; a byte-fallback piece
    maps to the byte-level single byte; pairs with no student token map to -1."""
    _, student, _, s_table = pair
    sp = sentencepiece_tokenizer([" the", " cat", "sat"])
    sp_table = token_table(sp)
    assert sp_table.strip_prefix_space
    bl = byte_level_tokenizer([b" the", b"sat", b"\xc3", b"zz"], ".+")
    table = build_vocab_map(sp_table, token_table(bl))
    bl_ids = bl.get_vocab()
    sp_ids = sp.get_vocab()
    assert table[sp_ids["\u2581the"]] == bl_ids["Ġthe"]
    assert table[sp_ids["sat"]] == bl_ids["sat"]
    assert table[sp_ids["<0xC3>"]] == bl_ids[B2U[0xC3]]
    assert table[sp_ids["\u2581cat"]] == -1
    assert table[sp_ids["<unk>"]] == -1  # special: only to a special of the same content
    # SentencePiece's added prefix space is not part of the text
    ids, lengths = encode_exact(sp, sp_table, "the cat", role="student")
    assert lengths.tolist() == [3, 4]
    # the cached map is the built one, and is read back
    m1, *_ = vocab_map(sp, student, tmp_path)
    files = list(tmp_path.glob("vocabmap-*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), m1)
    m2, *_ = vocab_map(sp, student, tmp_path)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(m1, build_vocab_map(sp_table, s_table))


def test_vocab_map_prefers_a_regular_piece_over_a_byte_fallback_one():
    """Gemma has '<0x31>' (a low id) and '1': its tokenizer writes '1', so the teacher's '1'
    must map there, not to the byte piece the student never produces; a byte that only a
    fallback piece spells still maps to it."""
    vocab = {"<unk>": 0, "<0x31>": 1, "<0xC3>": 2, "1": 3, "\u2581the": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    sp_table = token_table(sp)
    assert sp_table.byte_fallback.tolist() == [False, True, True, False, False]
    bl = byte_level_tokenizer([b"1", b"\xc3", b" the"], ".+")
    table = build_vocab_map(token_table(bl), sp_table)
    bl_ids = bl.get_vocab()
    assert table[bl_ids["1"]] == 3
    assert table[bl_ids[B2U[0xC3]]] == 2
    assert table[bl_ids["Ġthe"]] == 4


def test_map_topk_moves_unmapped_mass_to_the_tail():
    table = torch.tensor([5, -1, 7, 5, -1])  # teacher ids 0 and 3 both spell student id 5
    ids = torch.tensor([[0, 1, 2], [2, 3, 0], [1, 4, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.25, 0.05], [0.4, 0.3, 0.2]]))
    tail = torch.log(torch.tensor([0.2, 0.4, 0.1]))
    m = map_topk(ids, lp, tail, table)
    assert m.ids.tolist() == [[5, -1, 7], [7, 5, -1], [-1, -1, 7]]
    p = m.logprobs.exp()
    torch.testing.assert_close(p, torch.tensor([[0.5, 0, 0.1], [0.3, 0.3, 0], [0, 0, 0.2]]))
    torch.testing.assert_close(m.tail_logprob.exp(), torch.tensor([0.4, 0.4, 0.8]))
    torch.testing.assert_close(m.mapped_mass, torch.tensor([0.6, 0.6, 0.2]))


# ---- the id-level loss through the mapped path -----------------------------------------------


def teacher_case(n, v, k, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (3.0 * torch.randn(n, v, generator=g, dtype=F64)).log_softmax(1)
    ids = logp.topk(k, dim=1).indices
    ids = ids.gather(1, torch.argsort(torch.rand(n, k, generator=g), dim=1))
    tail = torch.logsumexp(logp.scatter(1, ids, -math.inf), 1)
    logits = 2.0 * torch.randn(n, v, generator=g)
    return logp, ids, logp.gather(1, ids).float(), tail.float(), logits


@pytest.mark.parametrize(
    "spec",
    [
        dict(),
        dict(tail="renormalize"),
        dict(divergence="reverse_kl", temperature=2.0),
        dict(divergence="jsd", beta=0.3, alpha=0.5),
        dict(divergence="dual_kl"),
    ],
)
def test_same_tokenizer_mapped_loss_equals_id_level(pair, spec):
    """Identity map: every top-k entry maps to itself, and the mapped path gives the id-level
    loss and gradients (to 1e-6)."""
    _, _, t_table, _ = pair
    table = torch.from_numpy(build_vocab_map(t_table, t_table))
    text = torch.from_numpy(np.flatnonzero(~t_table.special))
    assert (table[text] == text).all()
    v = t_table.vocab_size
    _, ids, lp, tail, logits = teacher_case(9, v, 6, seed=1)
    targets = ids[:, 0]
    m = map_topk(ids, lp, tail, table)
    assert (m.ids == ids).all()
    torch.testing.assert_close(m.logprobs, lp, rtol=0, atol=0)
    torch.testing.assert_close(m.tail_logprob, tail, rtol=0, atol=0)
    spec = KDSpec(**spec)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = kd_loss(x1, TeacherSignal(ids, lp, tail), spec=spec, targets=targets, chunk_tokens=4)
    got = kd_loss_mapped(
        x2, m.ids, m.logprobs, m.tail_logprob, spec=spec, targets=targets, chunk_tokens=4
    )
    ref.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)


def test_mapped_loss_with_unmapped_entries_against_float64():
    """Forward KL with the tail bucket, some entries unmapped: the reference puts the
    teacher's unmapped mass and the student's mass outside the mapped ids in one bucket."""
    n, v, k = 7, 23, 5
    logp, ids, lp, tail, logits = teacher_case(n, v, k, seed=2)
    g = torch.Generator().manual_seed(3)
    unmapped = torch.rand(n, k, generator=g) < 0.4
    unmapped[0] = True  # a row with nothing mapped
    unmapped[1] = False
    s_ids = ids.masked_fill(unmapped, -1)
    s_tail = torch.logaddexp(tail, torch.logsumexp(lp.masked_fill(~unmapped, -math.inf), 1))
    x = logits.clone().double().requires_grad_()
    q = x.softmax(1)
    total = torch.zeros((), dtype=F64)
    for r in range(n):
        keep = [int(i) for i, u in zip(ids[r], unmapped[r], strict=True) if not u]
        p_b = [float(logp[r, i].exp()) for i in keep]
        p_b.append(1.0 - sum(p_b))
        q_b = [q[r, i] for i in keep]
        q_b.append(1.0 - sum(q_b) if keep else q[r].sum())
        for pb, qb in zip(p_b, q_b, strict=True):
            if pb > 0:
                total = total + pb * (math.log(pb) - torch.log(qb))
    total.backward()
    x32 = logits.clone().requires_grad_()
    out = kd_loss_mapped(x32, s_ids, lp, s_tail, spec=KDSpec(), chunk_tokens=3)
    out.loss.backward()
    assert math.isclose(float(out.loss.detach()), float(total.detach()), rel_tol=1e-5, abs_tol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-4, atol=1e-6)


# ---- ULD -------------------------------------------------------------------------------------


def naive_uld(student_logits, teacher_logprobs, top_k=None) -> float:
    total = 0.0
    for zs, lt in zip(student_logits.tolist(), teacher_logprobs.tolist(), strict=True):
        m = max(zs)
        e = [math.exp(z - m) for z in zs]
        q = sorted((x / sum(e) for x in e), reverse=True)[: top_k or len(e)]
        p = sorted((math.exp(x) for x in lt), reverse=True)
        width = max(len(q), len(p))
        q += [0.0] * (width - len(q))
        p += [0.0] * (width - len(p))
        total += sum(abs(a - b) for a, b in zip(q, p, strict=True))
    return total


@pytest.mark.parametrize(
    "n,vs,kt,top_k", [(5, 7, 11, None), (3, 13, 3, None), (4, 9, 9, 4), (1, 2, 5, 1)]
)
def test_uld_against_float64(n, vs, kt, top_k):
    g = torch.Generator().manual_seed(n * 100 + vs)
    z = 2.0 * torch.randn(n, vs, generator=g)
    lt = (2.0 * torch.randn(n, kt, generator=g)).log_softmax(1)
    got = uld_loss(z, lt, student_top_k=top_k)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), naive_uld(z, lt, top_k), rel_tol=1e-5, abs_tol=1e-6)
    # bf16 logits are upcast inside
    zb = z.bfloat16()
    assert math.isclose(
        float(uld_loss(zb, lt, student_top_k=top_k)), naive_uld(zb.float(), lt, top_k), rel_tol=1e-5
    )


def test_uld_gradient_mask_and_errors():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 10, generator=g)
    lt = torch.randn(6, 4, generator=g).log_softmax(1) - 0.3  # a top-k: mass 0.74, rest unknown
    mask = torch.tensor([True, False, True, True, False, True])
    x = z.clone().requires_grad_()
    uld_loss(x, lt, mask=mask).backward()
    # float64 reference: sorted-difference L1 over masked rows, gradient by autograd here
    x64 = z.double().requires_grad_()
    q = x64.softmax(1)
    ref = torch.zeros((), dtype=F64)
    for r in mask.nonzero()[:, 0].tolist():
        order = sorted(range(10), key=lambda j: -float(q[r, j].detach()))
        p = sorted(lt[r].double().exp().tolist(), reverse=True) + [0.0] * 6
        ref = ref + sum((q[r, j] - p[i]).abs() for i, j in enumerate(order))
    ref.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert x.grad[~mask].abs().sum() == 0
    with pytest.raises(ValueError, match="student_top_k"):
        uld_loss(z, lt, student_top_k=11)
    with pytest.raises(ValueError, match="positions"):
        uld_loss(z, lt[:3])


def test_uld_zero_when_equal_up_to_permutation():
    p = torch.tensor([[0.5, 0.3, 0.2]]).log()
    z = torch.tensor([[0.2, 0.5, 0.0, 0.3]]).log()  # same probabilities, another order, a 0
    assert float(uld_loss(z, p)) < 1e-6


# ---- bad input -------------------------------------------------------------------------------


def test_text_that_does_not_round_trip_through_the_teacher(pair):
    lower = byte_level_tokenizer(SINGLES, ".", normalizer=normalizers.Lowercase())
    table = token_table(lower)
    with pytest.raises(CrossTokError, match="does not round-trip through the teacher") as e:
        encode_exact(lower, table, "The cat", role="teacher")
    assert "\n" not in str(e.value) and "byte 0" in str(e.value)
    # an unknown character becomes [UNK]: special, not text
    _, student, _, s_table = pair
    few = byte_level_tokenizer([b"a", b"b"], ".")
    with pytest.raises(CrossTokError, match="round-trip.*special or empty"):
        encode_exact(few, token_table(few), "abc", role="teacher")
    # stored teacher ids that spell another text
    t_ids = student("abd", add_special_tokens=False)["input_ids"]
    with pytest.raises(CrossTokError, match="does not round-trip"):
        align_text("abc", t_ids, s_table, student, s_table)


def test_student_that_cannot_represent_the_text(pair):
    """An NFKC student turns the ligature 'ﬁ' (U+FB01) into 'fi': one line naming the tokenizer,
    the byte and both spellings."""
    _, teacher, _, t_table = pair  # single bytes: the teacher spells any text
    nfkc = byte_level_tokenizer(SINGLES, ".", normalizer=normalizers.NFKC())
    n_table = token_table(nfkc)
    text = "a \ufb01ne day"
    t_ids, _ = encode_exact(teacher, t_table, text, role="teacher")
    with pytest.raises(CrossTokError, match="student tokenizer .* cannot represent the text") as e:
        align_text(text, t_ids, t_table, nfkc, n_table)
    msg = str(e.value)
    assert "\n" not in msg and "byte 2" in msg and "normaliser" in msg
    with pytest.raises(CrossTokError, match="outside its vocabulary"):
        check_tokens(n_table, [10**6], "x", role="student")


def test_llama_style_sentencepiece_with_byte_fallback():
    """Llama 2's convention: a Prepend('▁') + Replace(' ', '▁') normaliser, a BPE with byte
    fallback, and a Replace / ByteFallback / Fuse / Strip decoder. 'é' is not in the vocabulary
    and falls back to its two bytes; the added leading space is not part of the text."""
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "\u2581": 3, "a": 4, "b": 5}
    vocab.update({"\u2581a": 6, "\u2581b": 7, "ab": 8})
    merges = [("\u2581", "a"), ("\u2581", "b"), ("a", "b")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    llama = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    table = token_table(llama)
    assert table.kind == "sentencepiece" and table.strip_prefix_space
    text = "ab é b"
    ids, lengths = encode_exact(llama, table, text, role="student")
    assert llama.convert_ids_to_tokens(ids) == [
        "\u2581a",
        "b",
        "\u2581",
        "<0xC3>",
        "<0xA9>",
        "\u2581b",
    ]
    assert lengths.sum() == len(text.encode()) and lengths[0] == 1  # '▁a' is 'a' here
    # against single bytes: 'é' (two byte-fallback tokens) aligns byte by byte
    student = byte_level_tokenizer(SINGLES, ".")
    al, _ = align_text(text, ids, table, student, token_table(student))
    assert al.one_to_one.tolist() == [True] * 5 + [False]  # ' b' is two student bytes
    assert al.blocks()[-1] == (range(5, 6), range(5, 7))


def test_mapped_loss_through_a_linear_head_equals_logits():
    """The memory-bounded student input (hidden states and head) gives the logits' loss and
    gradients with unmapped entries, over several chunks and a mask."""
    from train.losses import LinearHead

    n, v, k, h = 11, 17, 4, 6
    _, ids, lp, tail, _ = teacher_case(n, v, k, seed=4)
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    s_ids = ids.masked_fill(torch.rand(n, k, generator=g) < 0.3, -1)
    mask = torch.rand(n, generator=g) < 0.8
    spec = KDSpec(divergence="jsd", alpha=0.7)
    targets = ids[:, 1]
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    a = kd_loss_mapped(
        LinearHead(h1, w1), s_ids, lp, tail, spec=spec, targets=targets, mask=mask, chunk_tokens=3
    )
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = kd_loss_mapped(h2 @ w2.T, s_ids, lp, tail, spec=spec, targets=targets, mask=mask)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert float(a.stats["tokens"]) == float(mask.sum())

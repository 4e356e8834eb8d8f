"""Training on conversation rows with several trained spans (issue #21, section 3).

collate against a naive per-token reference; training on a multi-span row equals training on
its spans as separate rows for every loss; data.overlong=drop_turns against a reference built
from the messages; shards of multi-span rows written by the writer train and resume exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from shards.reader import ShardReader
from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.train_helpers import train_tiny
from train.batches import ShardBatches, collate
from train.losses import KDSpec
from train.model import DistillModule
from train.spans import drop_turns
from train.step import train_step

# (role, tokens) per message; an assistant message's first HEADER tokens are its generation
# prompt, the rest its trained span. The last message is an assistant's: the conversation
# ends with the last span, as the shard format has it.
HEADER = 2
MESSAGES = (
    ("system", 4),
    ("user", 6),
    ("assistant", 5),
    ("user", 3),
    ("assistant", 6),
    ("tool", 4),
    ("assistant", 5),
    ("user", 2),
    ("assistant", 4),
)


def conversation_row(vocab: int, seed: int, messages=MESSAGES, k: int = 6) -> dict:
    """A shard-like multi-span row (the reader's dict) with a random teacher top-k; also
    `messages`: each message's (role, token list), for the references."""
    g = torch.Generator().manual_seed(seed)
    conv, turns, spans, parts = [], [], [], []
    for role, n in messages:
        tokens = torch.randint(0, vocab, (n,), generator=g).tolist()
        turns.append((len(conv), role))
        if role == "assistant":
            spans.append((len(conv) + HEADER, n - HEADER))
        parts.append((role, tokens))
        conv += tokens
    index = [c for s, n in spans for c in range(s, s + n)]
    logp = (2.0 * torch.randn(len(index), vocab, generator=g, dtype=torch.float64)).log_softmax(-1)
    values, ids = logp.topk(k, dim=-1)
    targets = torch.tensor([conv[c] for c in index])
    first = spans[0][0]
    return {
        "id": f"c{seed}",
        "prompt_ids": torch.tensor(conv[:first]),
        "teacher_prompt_ids": torch.tensor([1, 2, 3] + conv[:first]),  # a longer teacher view
        "response_ids": torch.tensor(conv[first:]),
        "span_starts": torch.tensor([s for s, _ in spans]),
        "span_lengths": torch.tensor([n for _, n in spans]),
        "turn_starts": torch.tensor([s for s, _ in turns]),
        "turn_roles": [r for _, r in turns],
        "topk_ids": ids,
        "topk_logprobs": values.float(),
        "tail_logprob": torch.logsumexp(logp.scatter(1, ids, -math.inf), -1).float(),
        "token_logprob": logp.gather(1, targets[:, None])[:, 0].float(),
        "messages": parts,
    }


def without_spans(row: dict) -> dict:
    """The row as a v1 or live row: no span or turn keys (one span: the whole response)."""
    drop = ("span_starts", "span_lengths", "turn_starts", "turn_roles")
    return {k: v for k, v in row.items() if k not in drop}


def naive_reference(rows: list[dict], max_length: int):
    """Per row (sequence, [(position, target, top-k row)]) by plain counting: the prompt keeps
    its last max_length - 1 tokens, the conversation is cut on the right at max_length, span
    token c (conversation coordinates) is predicted from position c - 1."""
    out = []
    for r in rows:
        conv = r["prompt_ids"].tolist() + r["response_ids"].tolist()
        p = len(r["prompt_ids"])
        cut = max(0, p - (max_length - 1))
        seq = conv[cut : cut + max_length]
        if "span_starts" in r:
            spans = list(zip(r["span_starts"].tolist(), r["span_lengths"].tolist(), strict=True))
        else:
            spans = [(p, len(r["response_ids"]))]
        entries, j = [], 0
        for s, n in spans:
            for c in range(s, s + n):
                if c - cut < len(seq):
                    entries.append((c - cut - 1, conv[c], j))
                j += 1
        out.append((seq, entries))
    return out


def assert_batch_equals(batch, rows: list[dict], reference) -> None:
    width = batch.input_ids.shape[1]
    positions, targets, topk = [], [], []
    for b, (seq, entries) in enumerate(reference):
        assert batch.input_ids[b, : len(seq)].tolist() == seq
        assert batch.attention_mask[b].tolist() == [1] * len(seq) + [0] * (width - len(seq))
        for p, t, j in entries:
            positions.append(b * width + p)
            targets.append(t)
            topk.append(j)
    assert batch.positions.tolist() == positions
    assert batch.targets.tolist() == targets
    rows_of = [(b, j) for b, (_, entries) in enumerate(reference) for _, _, j in entries]
    for name, got in (
        ("topk_ids", batch.topk_ids),
        ("topk_logprobs", batch.topk_logprobs),
        ("tail_logprob", batch.tail_logprob),
        ("token_logprob", batch.token_logprob),
    ):
        want = [rows[b][name][j] for b, j in rows_of]
        assert len(got) == len(want), name
        if want:
            assert torch.equal(got, torch.stack(want).to(got.dtype)), name
    # The token after each trained position is the token it is trained on.
    assert torch.equal(batch.input_ids.flatten()[batch.positions + 1], batch.targets)


VOCAB = 97


@pytest.mark.parametrize("max_length", [1000, 33, 24, 15, 12, 9, 4])
def test_collate_multi_span_rows_equals_a_naive_reference(max_length):
    # Prompts of 12 and 6 tokens: 1000 keeps everything, 33..15 cut spans on the right
    # (inside a span, between spans), 12..4 cut the first row's prompt from the left.
    short = tuple(m for i, m in enumerate(MESSAGES) if i != 1)  # no user message: a 6-token prompt
    rows = [conversation_row(VOCAB, 1), conversation_row(VOCAB, 2, short)]
    batch = collate(rows, max_length)
    assert_batch_equals(batch, rows, naive_reference(rows, max_length))
    if max_length == 1000:
        assert batch.num_tokens == sum(int(r["span_lengths"].sum()) for r in rows)
    # On-policy samples from the conversation before the first span, cut as today.
    for r, p in zip(rows, batch.prompt_ids, strict=True):
        assert p.tolist() == r["prompt_ids"].tolist()[-(max_length - 1) :]


@pytest.mark.parametrize("max_length", [1000, 30, 13, 5])
def test_rows_without_spans_train_their_whole_response_as_before(max_length):
    multi = conversation_row(VOCAB, 3)
    plain = without_spans(multi)
    # As a v1 row: the top-k covers every response token.
    n = len(plain["response_ids"])
    logp = torch.randn(n, VOCAB).log_softmax(-1)
    values, ids = logp.topk(6, dim=-1)
    plain.update(topk_ids=ids, topk_logprobs=values, tail_logprob=torch.zeros(n))
    plain["token_logprob"] = logp.gather(1, plain["response_ids"][:, None])[:, 0]
    one_span = {
        **plain,
        "span_starts": torch.tensor([len(plain["prompt_ids"])]),
        "span_lengths": torch.tensor([n]),
    }
    rows = [plain, multi]
    batch = collate(rows, max_length)
    assert_batch_equals(batch, rows, naive_reference(rows, max_length))
    same = collate([one_span, multi], max_length)
    for name in ("input_ids", "attention_mask", "positions", "targets", "topk_ids"):
        assert torch.equal(getattr(batch, name), getattr(same, name)), name


def test_collate_refuses_top_k_rows_that_do_not_match_the_spans():
    row = conversation_row(VOCAB, 4)
    row["topk_ids"] = row["topk_ids"][:-1]
    with pytest.raises(ValueError, match="row 'c4': field 'topk_ids': 11 rows for 12 span"):
        collate([row], 1000)


# ---- training: a multi-span row equals its spans as separate rows ---------------------------


def split_rows(row: dict) -> list[dict]:
    """Separate row i: prompt = the conversation up to span i, response = span i's tokens,
    the top-k rows of span i; no span keys (one span, the whole response)."""
    conv = torch.cat([row["prompt_ids"], row["response_ids"]])
    out, j = [], 0
    spans = zip(row["span_starts"].tolist(), row["span_lengths"].tolist(), strict=True)
    for i, (s, n) in enumerate(spans):
        part = {
            "id": f"{row['id']}.{i}",
            "prompt_ids": conv[:s],
            "response_ids": conv[s : s + n],
        }
        for name in ("topk_ids", "topk_logprobs", "tail_logprob", "token_logprob"):
            part[name] = row[name][j : j + n]
        out.append(part)
        j += n
    return out


class Consumed:
    def update(self, batch) -> None:
        pass


def trained_weights(model_dir, steps: list, spec: KDSpec) -> dict:
    """Weights after one SGD step per micro-batch list of `steps`, unclipped."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    acc = Accelerator(cpu=True)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    module = DistillModule(lm, spec, chunk_tokens=7)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    for micro in steps:
        train_step(
            micro,
            accelerator=acc,
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            source=Consumed(),
            max_grad_norm=1e9,
            deepspeed=False,
        )
    return {k: v.detach().clone() for k, v in acc.unwrap_model(module).state_dict().items()}


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir()


LOSSES = {
    "seqkd": KDSpec(alpha=0.0),
    "skd": KDSpec(divergence="forward_kl", alpha=0.9, temperature=1.5),
    "jsd": KDSpec(divergence="jsd", beta=0.5, alpha=1.0),
    "dualkl": KDSpec(divergence="dual_kl", alpha=1.0),
}


@pytest.mark.parametrize("method", list(LOSSES))
def test_a_multi_span_row_trains_as_its_spans_as_separate_rows(model_dir, method):
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    short = tuple(m for i, m in enumerate(MESSAGES) if i not in (3, 4))
    rows = [conversation_row(vocab, 10), conversation_row(vocab, 11, short)]
    third = conversation_row(vocab, 12)
    # Two optimizer steps: rows 0 and 1 in one micro-batch, then row 2.
    multi = [[collate(rows, 256)], [collate([third], 256)]]
    split = [
        [collate(split_rows(rows[0]) + split_rows(rows[1]), 256)],
        [collate(split_rows(third), 256)],
    ]
    assert [b[0].num_tokens for b in multi] == [b[0].num_tokens for b in split]
    a = trained_weights(model_dir, multi, LOSSES[method])
    b = trained_weights(model_dir, split, LOSSES[method])
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    moved = max((a[f"lm.{k}"] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3  # the steps did something, 1000 times the tolerance
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# ---- data.overlong=drop_turns ----------------------------------------------------------------


def dropped_reference(row: dict, drop: set[int]):
    """(sequence, [(position, target, top-k row)]) of the row without messages `drop`,
    rebuilt from its messages."""
    seq, entries, j = [], [], 0
    for m, (role, tokens) in enumerate(row["messages"]):
        keep = m not in drop
        for t, token in enumerate(tokens):
            trained = role == "assistant" and t >= HEADER
            if keep:
                if trained:
                    entries.append((len(seq) - 1, token, j))
                seq.append(token)
            j += trained
    return seq, entries


@pytest.mark.parametrize(
    "max_length,drop",
    [
        (39, set()),  # fits: unchanged
        (31, {2, 3}),  # the first turn (assistant + the user reply after it) is enough
        (30, {2, 3, 4, 5}),  # one turn is not: the first two
        (21, {2, 3, 4, 5}),
        (20, {2, 3, 4, 5, 6, 7}),  # everything but the task and the last turn
        (14, {2, 3, 4, 5, 6, 7}),
    ],
)
def test_drop_turns_removes_the_earliest_whole_turns(max_length, drop):
    row = conversation_row(VOCAB, 5)
    assert len(row["prompt_ids"]) + len(row["response_ids"]) == 39
    short = drop_turns(row, max_length)
    batch = collate([short], max_length)
    assert_batch_equals(batch, [row], [dropped_reference(row, drop)])
    assert short["turn_roles"] == [r for m, (r, _) in enumerate(row["messages"]) if m not in drop]
    # On-policy still samples from the row's own prompt, the one its teacher view is of.
    assert torch.equal(batch.prompt_ids[0], row["prompt_ids"])
    assert torch.equal(batch.teacher_prompt_ids[0], row["teacher_prompt_ids"])


def test_drop_turns_skips_what_cannot_fit_and_refuses_turns_across_a_span():
    row = conversation_row(VOCAB, 6)
    assert drop_turns(row, 13) is None  # task (10) + last turn (4) > 13
    assert drop_turns(without_spans(row), 30) is None  # no turns recorded (a v1 row)
    assert drop_turns({**row, "turn_starts": torch.zeros(0), "turn_roles": []}, 30) is None
    # Only assistant turns after the task, one of them: nothing can be dropped.
    two = conversation_row(VOCAB, 7, MESSAGES[:3])
    assert drop_turns(two, 9) is None
    bad = {**row, "turn_starts": row["turn_starts"].clone()}
    bad["turn_starts"][4] += 3  # the second assistant message now starts inside its span
    with pytest.raises(ValueError, match="crosses a message boundary"):
        drop_turns(bad, 30)


# ---- shards of multi-span rows: the writer, the reader, whole runs ------------------------------


def write_conversation_shards(folder, model_dir, *, examples: int = 24, k: int = 8):
    """Multi-turn ChatML conversations of the tiny tokenizer, every assistant turn a span
    (its tokens after the generation prompt through <|im_end|>), with the tiny model's own
    top-k at the span tokens (teacher forcing over the whole conversation)."""
    from shards.writer import ShardRow, ShardWriter
    from tests.train_helpers import tiny_teacher

    tok, model, meta = tiny_teacher(model_dir, k)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    with ShardWriter(folder, meta, batch_tokens=512) as writer:
        for i in range(examples):
            turns = 2 + i % 3
            messages = [("system", "You are in a room."), ("user", f"Find apple {i}.")]
            for t in range(turns):
                answer = f"Go to shelf {i + t}."
                if t == turns - 1 and i % 5 == 0:  # a last turn too long for drop_turns
                    answer = f"Apple {i} is on shelf {t}. " * 8
                messages.append(("assistant", answer))
                if t < turns - 1:
                    messages.append(("tool" if t % 2 else "user", f"You see {t} apples."))
            ids, spans, marks = [], [], []
            for m, (role, text) in enumerate(messages):
                marks.append((len(ids), role))
                head = encode(f"<|im_start|>{role}\n")
                body = encode(text + "<|im_end|>")
                if role == "assistant":
                    spans.append((len(ids) + len(head), len(body)))
                ids += head + body + (encode("\n") if m < len(messages) - 1 else [])
            index = torch.tensor([c for s, n in spans for c in range(s, s + n)])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            lp = logp[index - 1]
            values, top = lp.topk(k, -1)
            first = spans[0][0]
            writer.add(
                ShardRow(
                    id=f"conv{i}",
                    prompt_ids=ids[:first],
                    teacher_prompt_ids=encode("<|im_start|>system\nExperience.<|im_end|>\n")
                    + ids[:first],
                    response_ids=ids[first:],
                    topk_ids=top.numpy(),
                    topk_logprobs=values.numpy(),
                    token_logprobs=lp.gather(1, torch.tensor(ids)[index][:, None])[:, 0].numpy(),
                    spans=spans,
                    turns=marks,
                )
            )
    return folder


@pytest.fixture(scope="module")
def conversations(tmp_path_factory, model_dir):
    return write_conversation_shards(tmp_path_factory.mktemp("conv") / "s", model_dir)


def lengths_of(folder) -> dict[str, int]:
    return {
        r["id"]: len(r["prompt_ids"]) + len(r["response_ids"])
        for r in ShardReader(folder, shuffle=False)
    }


# A max_length that keeps the 2-turn conversations, shortens the longer ones by dropping
# turns and skips those whose last turn is too long (write_conversation_shards).
DROP_TURNS_LIMIT = 100


def test_shard_rows_collate_their_spans(conversations):
    rows = list(ShardReader(conversations, shuffle=False))
    assert max(len(r["span_starts"]) for r in rows) == 4
    for max_length in (1000, 40):
        batch = collate(rows[:5], max_length)
        assert_batch_equals(batch, rows[:5], naive_reference(rows[:5], max_length))
    # data.overlong=truncate: each batch cut as the reference cuts its rows, counted.
    by_id, limit = {r["id"]: r for r in rows}, 100
    reader = ShardReader(conversations, seed=3, epochs=1)
    source = ShardBatches(
        reader, batch_tokens=300, max_rows=3, max_length=limit, sort_window=8, overlong="truncate"
    )
    seen = []
    for batch in source:
        source.update(batch)
        got = [by_id[i] for i in batch.ids]
        assert_batch_equals(batch, got, naive_reference(got, limit))
        seen += batch.ids
    assert sorted(seen) == sorted(by_id)
    long = [n for n in lengths_of(conversations).values() if n > limit]
    assert source.pop_metrics() == {
        "overlong_rows": len(long),
        "overlong_tokens": sum(n - limit for n in long),
    }


def test_drop_turns_counts_and_resume_of_a_shard_folder(conversations):
    limit = DROP_TURNS_LIMIT

    def make():
        reader = ShardReader(conversations, seed=1, epochs=1)
        return ShardBatches(
            reader,
            batch_tokens=400,
            max_rows=4,
            max_length=limit,
            sort_window=10,
            overlong="drop_turns",
        )

    full = make()
    every = list(full)
    for b in every:
        full.update(b)
    metrics = full.pop_metrics()
    long = {i: n for i, n in lengths_of(conversations).items() if n > limit}
    trained = {i for b in every for i in b.ids}
    skipped = set(long) - trained
    assert 0 < len(skipped) < len(long)  # some rows shortened, some skipped
    assert metrics["overlong_rows"] == len(long)
    assert metrics["overlong_skipped_rows"] == len(skipped)
    assert metrics["overlong_tokens"] > sum(long[i] for i in skipped)
    assert max(int(b.attention_mask.sum(1).max()) for b in every) <= limit
    for cut in (1, 3, len(every) - 1):
        first = make()
        it = iter(first)
        for _ in range(cut):
            first.update(next(it))
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        rest = list(resumed)
        for b in rest:
            resumed.update(b)
        assert [b.ids for b in rest] == [b.ids for b in every[cut:]]
        assert resumed.pop_metrics() == metrics, cut


class InProcessTeacher:
    """A TeacherClient stand-in: scores (prompt, sample) with the tiny model in this process
    and records what it was sent."""

    max_model_len = None
    num_retries = 0

    def __init__(self, model_dir, k: int):
        from transformers import AutoModelForCausalLM

        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.k, self.sent = k, []

    def submit(self, prompt: list[int], response: list[int]):
        from concurrent.futures import Future

        from vllm_engine.teacher_client import TeacherScore

        self.sent.append((prompt, response))
        with torch.no_grad():
            logits = self.lm(torch.tensor([prompt + response])).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)
        values, top = lp.topk(self.k, -1)
        token = lp.gather(1, torch.tensor(response)[:, None])[:, 0]
        future = Future()
        future.set_result(TeacherScore(top.numpy(), values.numpy(), token.numpy()))
        return future

    def close(self) -> None:
        pass


def test_onpolicy_samples_continue_the_conversation_before_the_first_span(
    conversations, model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.config import OnPolicyConfig
    from train.onpolicy import OnPolicyBatches

    rows = {r["id"]: r for r in ShardReader(conversations, shuffle=False)}
    student = build_tiny_model(tmp_path / "student", seed=7)
    lm = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher = InProcessTeacher(model_dir, k=8)
    reader = ShardReader(conversations, seed=0, epochs=None)
    shards = ShardBatches(reader, batch_tokens=256, max_rows=4, max_length=300, sort_window=8)
    cfg = OnPolicyConfig(teacher_url="x", lmbda=0.5, max_new_tokens=5, max_prompts=2)
    source = OnPolicyBatches(
        shards,
        teacher,
        cfg,
        student=lambda: lm,
        tokenizer=AutoTokenizer.from_pretrained(student),
        seed=0,
        grad_accum=2,
        max_length=300,
    )
    kinds = set()
    for _, batch in zip(range(6), source, strict=False):
        live = "@" in batch.ids[0]
        kinds.add(live)
        base = [rows[i.split("@")[0]] for i in batch.ids]
        for b, r in enumerate(base):
            # Both kinds start every sequence with the conversation before the first span.
            p = len(r["prompt_ids"])
            assert torch.equal(batch.input_ids[b, :p], r["prompt_ids"])
            assert torch.equal(batch.teacher_prompt_ids[b], r["teacher_prompt_ids"])
        if live:  # one span: the whole sample, scored by the teacher on the teacher view
            lengths = batch.attention_mask.sum(1).tolist()
            samples = [
                batch.input_ids[b, len(r["prompt_ids"]) : lengths[b]].tolist()
                for b, r in enumerate(base)
            ]
            assert batch.num_tokens == sum(len(x) for x in samples) > 0
            for sample, r in zip(samples, base, strict=True):
                assert (r["teacher_prompt_ids"].tolist(), sample) in teacher.sent
        else:  # the shard rows' spans
            assert batch.num_tokens == sum(int(r["span_lengths"].sum()) for r in base)
    assert kinds == {True, False}


def final_weights(out) -> dict:
    from safetensors.torch import load_file

    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    return {
        k: v
        for f in sorted((latest / "model").glob("*.safetensors"))
        for k, v in load_file(f).items()
    }


@pytest.mark.slow  # three short runs of the tiny model
def test_interrupted_run_on_multi_span_rows_resumes_exactly(tmp_path, conversations, capsys):
    student = build_tiny_model(tmp_path / "student", seed=7)
    common = [
        "max_steps=6",
        "save_every=2",
        "data.overlong=drop_turns",
        f"data.max_length={DROP_TURNS_LIMIT}",
    ]
    config = "configs/train/jsd.yaml"
    straight = train_tiny(config, tmp_path / "a", student, conversations, *common)
    train_tiny(config, tmp_path / "b", student, conversations, *common, "stop_at=3")
    resumed = train_tiny(config, tmp_path / "b", student, conversations, *common)  # auto
    assert [r["step"] for r in resumed] == list(range(1, 7))
    keys = ("step", "loss", "tokens", "overlong_rows", "overlong_tokens", "overlong_skipped_rows")
    assert [[r.get(k) for k in keys] for r in resumed] == [
        [r.get(k) for k in keys] for r in straight
    ]
    last = straight[-1]
    assert (
        last["overlong_skipped_rows"] > 0 and last["overlong_rows"] > last["overlong_skipped_rows"]
    )
    shortened = last["overlong_rows"] - last["overlong_skipped_rows"]
    assert (
        f"data.overlong=drop_turns: {last['overlong_rows']} rows longer than "
        f"data.max_length={DROP_TURNS_LIMIT}: {shortened} shortened by dropping turns, "
        f"{last['overlong_skipped_rows']} skipped ({last['overlong_tokens']} tokens)"
    ) in capsys.readouterr().out
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

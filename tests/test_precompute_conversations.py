"""Precompute of conversations (issue 21) on the tiny model with the transformers backend:
a conversation is scored in one teacher pass and its row equals its assistant turns scored
one by one; two files equal one file with experience; tool calls render and score; a run
cut mid-folder resumes without duplicates or gaps."""

from __future__ import annotations

import numpy as np
import pytest

from precompute.hf_backend import HFBackend
from precompute.run import run
from shards.reader import ShardFolder
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import (
    QWEN3_LIKE_TEMPLATE,
    K,
    all_rows,
    cfg,
    conversation,
    with_template,
    write_jsonl,
)

EXPERIENCE = "Add the two numbers."


class Counting:
    """The transformers backend, counting score() calls and the sequences in each."""

    def __init__(self, backend, fail_after: int | None = None):
        self.backend, self.calls, self.fail_after = backend, [], fail_after
        self.scored = []  # (response ids, Scored) of every sequence, unquantized
        self.name, self.k, self.vocab_size = backend.name, backend.k, backend.vocab_size

    def score(self, prompts, responses):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("the engine died")
        self.calls.append([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)])
        out = self.backend.score(prompts, responses)
        self.scored += [(list(r), x) for r, x in zip(responses, out, strict=True)]
        return out

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def hf(tiny):
    return HFBackend(str(tiny), K, batch_size=4)


def score(tiny, backend, data, out, *extra):
    c = cfg(tiny, data, out, "mode=score", "view.experience_position=prefix", *extra)
    return run(c, backend=backend)


def by_id(ids, logprobs) -> tuple[np.ndarray, np.ndarray]:
    """Each position's top-k sorted by id: shards store the top-k as a set, in no order."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def same_topk(ids_a, lps_a, ids_b, lps_b) -> None:
    (ia, la), (ib, lb) = by_id(ids_a, lps_a), by_id(ids_b, lps_b)
    assert ia.tolist() == ib.tolist()
    np.testing.assert_allclose(la, lb, atol=1e-5, rtol=0)


def spans_of(row) -> list[tuple[int, int]]:
    return list(zip(row["span_starts"].tolist(), row["span_lengths"].tolist(), strict=True))


def test_a_conversation_row_equals_its_turns_scored_one_by_one(tiny, hf, tmp_path):
    conv = conversation(5, turns=3)
    data = write_jsonl(
        tmp_path / "c.jsonl", [{"id": "c", "messages": conv, "experience": EXPERIENCE}]
    )
    engine = Counting(hf)
    s = score(tiny, engine, data, tmp_path / "conv")
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 1  # one pass, one sequence
    (row,) = all_rows(tmp_path / "conv")
    # Each assistant turn alone: the conversation before it as the prompt, the turn as the
    # completion (today's single-turn path: tokenized, then EOS).
    singles = [
        {
            "id": f"t{j}",
            "prompt": conv[:j],
            "completion": conv[j]["content"],
            "experience": EXPERIENCE,
        }
        for j in (2, 4, 6)
    ]
    alone = Counting(hf)
    score(tiny, alone, write_jsonl(tmp_path / "s.jsonl", singles), tmp_path / "single")
    by_id = {r["id"]: r for r in all_rows(tmp_path / "single")}
    whole = np.concatenate([row["prompt_ids"], row["response_ids"]])
    spans = spans_of(row)
    assert (
        len(spans) == 3 and spans[0][0] == len(row["prompt_ids"]) and sum(spans[-1]) == len(whole)
    )
    assert s.tokens == sum(n for _, n in spans) == len(row["topk_ids"])
    assert [role for role in row["turn_roles"]] == [m["role"] for m in conv]
    assert row["teacher_prompt_ids"].tolist() == by_id["t2"]["teacher_prompt_ids"].tolist()
    at = 0
    for (start, n), j in zip(spans, (2, 4, 6), strict=True):
        one = by_id[f"t{j}"]
        assert whole[:start].tolist() == one["prompt_ids"].tolist()
        assert whole[start : start + n].tolist() == one["response_ids"].tolist()
        same_topk(
            row["topk_ids"][at : at + n], row["topk_logprobs"][at : at + n],
            one["topk_ids"], one["topk_logprobs"],
        )  # fmt: skip
        for name in ("token_logprob", "tail_logprob"):
            np.testing.assert_allclose(row[name][at : at + n], one[name], atol=1e-5, rtol=0)
        at += n
    # Before the shards' quantization: the engine's float32 top-k of the conversation's
    # pass at the span tokens against the single-turn passes, in rank order.
    ((_, whole_pass),) = engine.scored
    p = len(row["prompt_ids"])
    for start, n in spans:
        (one,) = [x for r, x in alone.scored if r == whole[start : start + n].tolist()]
        part = slice(start - p, start - p + n)  # teacher and student responses are equal here
        assert whole_pass.topk_ids[part].tolist() == one.topk_ids.tolist()
        np.testing.assert_allclose(whole_pass.topk_logprobs[part], one.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(whole_pass.token_logprobs[part], one.token_logprobs, atol=1e-5)
    # The turns start where the rendering of the turns before them ends.
    starts = row["turn_starts"].tolist()
    assert starts[0] == 0 and starts[2] < spans[0][0] < starts[3] < spans[1][0]


def with_experience(chat: list[dict]) -> list[dict]:
    """The teacher file's copy: the experience before the task, as view.experience_position
    =prefix puts it."""
    out = [dict(m) for m in chat]
    out[1]["content"] = EXPERIENCE + "\n\n" + out[1]["content"]
    return out


def same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b, strict=True):
        for name in ("prompt_ids", "teacher_prompt_ids", "response_ids", "span_starts",
                     "span_lengths", "turn_starts"):  # fmt: skip
            assert x[name].tolist() == y[name].tolist(), (x["id"], name)
        assert x["turn_roles"] == y["turn_roles"]
        same_topk(x["topk_ids"], x["topk_logprobs"], y["topk_ids"], y["topk_logprobs"])
        for name in ("token_logprob", "tail_logprob"):
            np.testing.assert_allclose(x[name], y[name], atol=1e-5, rtol=0)


def test_two_files_give_the_rows_of_one_file_with_experience(tiny, hf, tmp_path):
    convs = {f"ep{i}": conversation(i, turns=1 + i % 3) for i in range(5)}
    one = write_jsonl(
        tmp_path / "one.jsonl",
        [{"id": i, "messages": c, "experience": EXPERIENCE} for i, c in convs.items()],
    )
    student = write_jsonl(
        tmp_path / "noexp_agent_train.jsonl", [{"id": i, "messages": c} for i, c in convs.items()]
    )
    teacher = write_jsonl(
        tmp_path / "agent_train.jsonl",
        [{"id": i, "messages": with_experience(c)} for i, c in reversed(convs.items())],
    )
    score(tiny, hf, one, tmp_path / "one")
    score(tiny, hf, student, tmp_path / "two", f"data.teacher_path={teacher}")
    key = lambda r: r["id"]  # noqa: E731
    same_rows(
        sorted(all_rows(tmp_path / "one"), key=key), sorted(all_rows(tmp_path / "two"), key=key)
    )
    # The metadata records the settings and, with two files, the teacher file's fingerprint.
    one, two = (
        ShardFolder(tmp_path / x).metadata.extra["precompute"]["data"] for x in ("one", "two")
    )
    assert one["train_turns"] == two["train_turns"] == "all" and "teacher_path" not in two
    assert "teacher_data_fingerprint" not in one
    assert two["teacher_data_fingerprint"].startswith("sha256:")


AGENT = [
    {"role": "system", "content": "You act in a house."},
    {"role": "user", "content": [{"type": "text", "text": "Find the mug."}]},
    {"role": "assistant", "content": "<think>\nlook first\n</think>\n\nI look.", "tool_calls": [
        {"type": "function", "function": {"name": "look", "arguments": {"at": "desk"}}}]},
    {"role": "tool", "content": "A mug is on the desk.", "tool_call_id": "c0"},
    {"role": "assistant", "content": "I take it.", "train": False,
     "tool_calls": [{"type": "function", "function": {"name": "take", "arguments": "{\"x\": 1}"}}]},
    {"role": "tool", "content": "You hold the mug."},
    {"role": "user", "content": "Done?"},
    {"role": "assistant", "content": "<think>\nyes\n</think>\n\nYes, I have the mug."},
]  # fmt: skip


@pytest.mark.parametrize("which", ["all", "marked"])
def test_tool_calls_render_and_score(tiny, hf, tmp_path, which):
    """A Qwen3-like template: tool calls rendered in their turns, the reasoning of turns
    before the last user turn dropped; top-k against the model's own float32 log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shards.codec import Codebook
    from tests.precompute_helpers import hf_logprobs
    from tests.shards_helpers import quantization_bound

    teacher = with_template(tiny, tmp_path / "teacher", QWEN3_LIKE_TEMPLATE)
    data = write_jsonl(tmp_path / "a.jsonl", [{"id": "ep", "messages": AGENT}])
    c = cfg(teacher, data, tmp_path / "out", "mode=score", f"data.train_turns={which}")
    run(c, backend=hf)
    (row,) = all_rows(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(teacher)
    whole = np.concatenate([row["prompt_ids"], row["response_ids"]])
    texts = [tok.decode(whole[s : s + n]) for s, n in spans_of(row)]
    first = 'I look.\n<tool_call>look {"at": "desk"}</tool_call><|im_end|>'
    middle = 'I take it.\n<tool_call>take {"x": 1}</tool_call><|im_end|>'
    last = "<think>\nyes\n</think>\n\nYes, I have the mug.<|im_end|>"
    assert texts == ([first, middle, last] if which == "all" else [first, last])
    assert list(row["turn_roles"]) == [m["role"] for m in AGENT]
    assert tok.decode(whole[row["turn_starts"][3] : row["turn_starts"][4]]) == (
        "<|im_start|>tool\nA mug is on the desk.<|im_end|>\n"
    )
    # The reference: the model teacher-forced on the whole conversation (no experience: the
    # views are the same), read at the span tokens.
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    p = len(row["prompt_ids"])
    lp = hf_logprobs(model, row["prompt_ids"].tolist(), row["response_ids"].tolist())
    at = np.concatenate([np.arange(s - p, s - p + n) for s, n in spans_of(row)])
    ref = lp[at]
    top = np.argsort(-ref, axis=1, kind="stable")[:, :K]
    ids, lps = by_id(row["topk_ids"], row["topk_logprobs"])
    assert ids.tolist() == by_id(top, top)[0].tolist()
    # Stored logprobs are quantized (shards/codec.py): within half a level of the reference.
    for stored, want in (
        (lps, np.take_along_axis(ref, ids.astype(np.int64), 1)),
        (row["token_logprob"].numpy(), ref[np.arange(len(at)), row["response_ids"].numpy()[at]]),
    ):
        target, bound = quantization_bound(Codebook.for_k(K), want)
        assert (np.abs(stored - target) <= bound + 1e-5).all()


def test_a_run_cut_mid_folder_resumes_without_duplicates_or_gaps(tiny, hf, tmp_path):
    rows = [{"id": f"ep{i}", "messages": conversation(i, turns=1 + i % 3)} for i in range(8)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    # One engine call of two conversations per commit; the third call dies.
    with pytest.raises(RuntimeError, match="the engine died"):
        score(tiny, Counting(hf, fail_after=2), data, out, "commit_every=2", "engine_window=2")
    assert sorted(r["id"] for r in all_rows(out)) == ["ep0", "ep1", "ep2", "ep3"]
    s = score(tiny, hf, data, out, "commit_every=2")
    assert (s.skipped_done, s.examples) == (4, 4)
    score(tiny, hf, data, tmp_path / "clean", "commit_every=2")
    key = lambda r: r["id"]  # noqa: E731
    same_rows(sorted(all_rows(out), key=key), sorted(all_rows(tmp_path / "clean"), key=key))

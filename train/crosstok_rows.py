"""Teacher-vocabulary rows turned into student rows at load time (issue #23 §2,
docs/cross-tokenizer.md "The trainer's load path").

A folder of teacher-vocabulary shards (crosstok.folder.teacher_vocabulary) keeps the teacher's
ids and, per row, meta["crosstok"]: the student view's prompt as chat messages, the response
text and each response token's byte span in it. For every row read, `CrossTokRows`:

1. renders the prompt messages with the student's chat template (datafiles.views.render, the
   project's one rendering), the thinking flag passed as the template's enable_thinking;
2. encodes the response text with the student tokenizer, checked to spell it byte for byte
   (crosstok.tokens.encode_exact; a text it cannot represent stops with one line naming the
   folder, the row and the reason);
3. aligns the teacher's token spans with the student's (crosstok.align.align_lengths);
4. gives each STUDENT response token one of three kinds (`ct_kind`):
   0 (a one-to-one block): the teacher's top-k at that token mapped onto student ids
     (crosstok.vocab.map_topk; the mass that does not map joins the tail);
   1 (the first token of a merged block): the raw teacher top-k logprobs of the block's first
     teacher token (both sides predict from the same text there: the ULD pairing) and, in
     `ct_block_logprob`, the block's chain-rule logprob, the sum of its teacher tokens'
     logprobs (crosstok.spans.block_logprobs);
   2 (a later token of a merged block): no teacher signal of its own.
5. A last teacher token that is special with an empty span (the end of the response, EOS) is
   a one-to-one position with the student's EOS token; the teacher's EOS id maps to the
   student's EOS id (both mean "the response ends here") when no equal token exists.

The result has the keys of a reader row in the student's vocabulary (one span, the whole
response), so batching, length limits and resume are unchanged; `collate` carries ct_kind and
ct_block_logprob to the loss (train/crosstok_loss.py).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from crosstok.align import align_lengths
from crosstok.spans import block_logprobs
from crosstok.tokens import CrossTokError, check_tokens, encode_exact
from crosstok.vocab import map_topk, vocab_map
from datafiles.conversation import SpanError, render_conversation
from datafiles.views import render
from shards.errors import ShardError
from shards.fingerprint import tokenizer_fingerprint
from shards.spans import spans_of

KIND_MAPPED, KIND_FIRST, KIND_REST = 0, 1, 2
SPANS_KEY = "spans"  # meta["crosstok"] of a conversation row (precompute/teacher_vocab.py)


class CrossTokRows:
    """Converts the rows of one teacher-vocabulary folder for one student tokenizer.

    folder: for messages. teacher_tokenizer / student_tokenizer: transformers fast tokenizers.
    cache_dir: where the vocabulary map is cached (by both fingerprints), or None.
    Picklable (DataLoader workers get a copy).
    """

    def __init__(self, folder, teacher_tokenizer, student_tokenizer, cache_dir=None):
        self.folder = str(folder)
        self.student = student_tokenizer
        self.t_fingerprint = tokenizer_fingerprint(teacher_tokenizer)  # the folder's metadata's
        table, self.t_table, self.s_table = vocab_map(
            teacher_tokenizer, student_tokenizer, cache_dir
        )
        table = table.copy()
        self.student_eos = student_tokenizer.eos_token_id
        t_eos = teacher_tokenizer.eos_token_id
        if t_eos is not None and self.student_eos is not None and table[t_eos] < 0:
            table[t_eos] = self.student_eos
        self.table = torch.from_numpy(table)
        self.mapped_vocab = float((table >= 0).mean())

    def _bad(self, row: dict, message: str) -> ShardError:
        return ShardError(self.folder, message, row=repr(str(row["id"])), field="meta.crosstok")

    def _malformed(self, row: dict, e: Exception) -> ShardError:
        return self._bad(
            row, f"not a teacher-vocabulary row: meta.crosstok missing or malformed ({e!r})"
        )

    def __call__(self, row: dict) -> dict:
        try:
            return self._convert(row)
        except CrossTokError as e:
            raise self._bad(row, str(e)) from None

    def _convert(self, row: dict) -> dict:
        try:
            ct = json.loads(row.get("meta") or "{}")["crosstok"]
            conversation = SPANS_KEY in ct
            if not conversation:
                text, thinking = str(ct["response_text"]), ct.get("thinking")
                messages = list(ct["prompt_messages"])
                spans = np.asarray(ct["token_bytes"], dtype=np.int64).reshape(-1, 2)
        except (KeyError, TypeError, ValueError) as e:
            raise self._malformed(row, e) from None
        if conversation:
            return self._conversation(row, ct)
        t_ids = np.asarray(row["response_ids"], dtype=np.int64)
        n_t = len(t_ids)
        if len(spans) != n_t or len(row["topk_ids"]) != n_t:
            raise self._bad(
                row,
                f"{len(spans)} token_bytes spans and {len(row['topk_ids'])} top-k rows for "
                f"{n_t} response tokens (teacher-vocabulary rows train the whole response)",
            )
        lengths, eos = self._teacher_lengths(row, t_ids, spans, text)
        # An on-policy sample (train/onpolicy_crosstok.py) brings the student's own prompt and
        # sampled tokens (the EOS included), checked to spell the text, instead of a rendering
        # and a re-encoding: the student trains on what it sampled.
        prompt, sampled = row.get("student_prompt_ids"), row.get("student_response_ids")
        if prompt is None:
            kwargs = None if thinking is None else {"enable_thinking": bool(thinking)}
            prompt = render(self.student, messages, kwargs)
        if sampled is None:
            s_ids, s_len = encode_exact(self.student, self.s_table, text, role="student")
        else:
            s_ids = [int(i) for i in sampled][: len(sampled) - int(eos)]
            s_len = check_tokens(self.s_table, s_ids, text, role="student")
        signal = self._signal(row, 0, lengths, eos, s_len, eos)
        n_s = len(s_ids) + int(eos)
        s_eos = int(sampled[-1]) if eos and sampled is not None else self.student_eos
        response = torch.tensor([*s_ids, *([s_eos] if eos else [])], dtype=torch.long)
        out = self._kept(row)
        out.update(
            prompt_ids=torch.as_tensor(prompt, dtype=torch.long),
            teacher_prompt_ids=row["teacher_prompt_ids"],  # the teacher's vocabulary
            response_ids=response,
            span_starts=torch.tensor([len(prompt)] if n_s else [], dtype=torch.long),
            span_lengths=torch.tensor([n_s] if n_s else [], dtype=torch.long),
            turn_starts=torch.zeros(0, dtype=torch.long),
            turn_roles=[],
            **signal,
        )
        return out

    @staticmethod
    def _kept(row: dict) -> dict:
        return {
            key: row[key]
            for key in ("id", "sample_index", "source", "thinking", "meta", "cursor")
            if key in row
        }

    def _teacher_lengths(
        self, row: dict, t_ids, spans, text: str, where: str = ""
    ) -> tuple[np.ndarray, bool]:
        """((T_text,) byte lengths of the teacher's text tokens, eos): checks that `spans`
        (T, 2) tile `text`'s bytes, the last token alone allowed the empty span [len, len]
        when it is special (the end of the response or turn, `eos`)."""
        n_t = len(t_ids)
        n_bytes = len(text.encode("utf-8"))
        eos = bool(
            n_t > 0 and spans[-1, 0] == spans[-1, 1] == n_bytes and self.t_table.special[t_ids[-1]]
        )
        n_text = n_t - int(eos)
        lengths = spans[:n_text, 1] - spans[:n_text, 0]
        starts_ok = n_text == 0 or (
            spans[0, 0] == 0 and (spans[1:n_text, 0] == spans[: n_text - 1, 1]).all()
        )
        if not starts_ok or (n_text and spans[n_text - 1, 1] != n_bytes) or (lengths <= 0).any():
            raise self._bad(
                row,
                f"{where}token_bytes do not tile the response text's bytes (consecutive, "
                "non-empty, 0 to its length; only a last special token may be empty)",
            )
        return lengths, eos

    def _signal(self, row: dict, at: int, t_len, t_eos: bool, s_len, s_eos: bool) -> dict:
        """The teacher signal of one trained span per STUDENT token (n_s = len(s_len) +
        s_eos): the span's teacher tokens are the row's top-k rows at..at + len(t_len) +
        t_eos, their text tokens of byte lengths `t_len`, the student's of `s_len` (the same
        text); a trailing end token on both sides (`t_eos`, `s_eos`) is one more one-to-one
        position. Returns topk_ids, topk_logprobs, tail_logprob, token_logprob, ct_kind and
        ct_block_logprob, (n_s, ...) each."""
        al = align_lengths(t_len, s_len)
        one = al.one_to_one
        n_t, n_text = len(t_len) + int(t_eos), len(t_len)
        n_s = len(s_len) + int(s_eos)
        eos = t_eos and s_eos
        k = row["topk_ids"].shape[1]
        ids = torch.full((n_s, k), -1, dtype=torch.long)
        lps = torch.full((n_s, k), -torch.inf, dtype=torch.float32)
        tail = torch.zeros(n_s, dtype=torch.float32)
        tok = torch.zeros(n_s, dtype=torch.float32)
        block_lp = torch.zeros(n_s, dtype=torch.float32)
        kind = torch.full((n_s,), KIND_REST, dtype=torch.int8)
        t_lp = row["token_logprob"][at : at + n_t].float()
        # One-to-one positions (and the EOS) take the mapped top-k of their teacher token.
        s_one = np.concatenate([al.student[one, 0], [n_s - 1] if eos else []]).astype(np.int64)
        t_one = np.concatenate([al.teacher[one, 0], [n_t - 1] if eos else []]).astype(np.int64)
        if len(s_one):
            t_rows = torch.from_numpy(t_one + at)
            m = map_topk(
                row["topk_ids"][t_rows],
                row["topk_logprobs"][t_rows],
                row["tail_logprob"][t_rows],
                self.table,
            )
            s_one_ = torch.from_numpy(s_one)
            ids[s_one_], lps[s_one_], tail[s_one_] = m.ids, m.logprobs, m.tail_logprob
            tok[s_one_] = t_lp[torch.from_numpy(t_one)]
            kind[s_one_] = KIND_MAPPED
        merged = ~one
        if merged.any():
            s_first = torch.from_numpy(al.student[merged, 0])
            t_first = torch.from_numpy(al.teacher[merged, 0] + at)
            kind[s_first] = KIND_FIRST
            lps[s_first] = row["topk_logprobs"][t_first].float()
            block_lp[s_first] = block_logprobs(t_lp[:n_text], al.teacher)[torch.from_numpy(merged)]
        return {
            "topk_ids": ids,
            "topk_logprobs": lps,
            "tail_logprob": tail,
            "token_logprob": tok,
            "ct_kind": kind,
            "ct_block_logprob": block_lp,
        }

    def _conversation(self, row: dict, ct: dict) -> dict:
        """A conversation row (several trained spans, meta["crosstok"]["spans"]): the
        student's template renders the whole conversation (datafiles.conversation, its own
        spans), and each trained span's student tokens are aligned with that span's teacher
        tokens by their bytes: the same text, each ending in its end-of-turn token on both
        sides or on neither."""
        try:
            thinking = ct.get("thinking")
            messages = [dict(m) for m in ct["messages"]]
            turns = list(ct[SPANS_KEY])
            trained = [int(t["message"]) for t in turns]
            texts = [str(t["response_text"]) for t in turns]
            t_spans = [np.asarray(t["token_bytes"], dtype=np.int64).reshape(-1, 2) for t in turns]
        except (KeyError, TypeError, ValueError) as e:
            raise self._malformed(row, e) from None
        bad = [j for j in trained if not 0 <= j < len(messages)]
        bad += [j for j in trained if j not in bad and messages[j].get("role") != "assistant"]
        if bad or trained != sorted(set(trained)):
            raise self._bad(
                row,
                f"spans' messages {trained} are not ascending indices of assistant messages "
                f"among the {len(messages)} messages",
            )
        conv = np.concatenate([np.asarray(row["prompt_ids"]), np.asarray(row["response_ids"])])
        starts, lengths = (x.numpy() for x in spans_of(row))
        if len(starts) != len(turns):
            raise self._bad(
                row,
                f"{len(turns)} spans in meta.crosstok for the row's {len(starts)} trained "
                "spans (span_starts)",
            )
        for j, (n, tb) in enumerate(zip(lengths, t_spans, strict=True)):
            if len(tb) != n:
                raise self._bad(
                    row,
                    f"span {j} (message {trained[j]}): {len(tb)} token_bytes spans for its "
                    f"{n} teacher tokens",
                )
        if len(row["topk_ids"]) != int(lengths.sum()):
            raise self._bad(
                row, f"{len(row['topk_ids'])} top-k rows for {int(lengths.sum())} span tokens"
            )
        kwargs = None if thinking is None else {"enable_thinking": bool(thinking)}
        try:
            r = render_conversation(self.student, messages, trained, kwargs)
        except SpanError as e:
            raise CrossTokError(
                f"message {e.turn}: the student's chat template: {e.reason}"
            ) from None
        s_ids = np.asarray(r.ids, dtype=np.int64)
        parts, at = [], 0
        for j, (start, n) in enumerate(zip(starts, lengths, strict=True)):
            t_ids = conv[start : start + n]
            where = f"span {j} (message {trained[j]})"
            t_len, t_eos = self._teacher_lengths(row, t_ids, t_spans[j], texts[j], f"{where}: ")
            a, m = r.spans[j]
            span = s_ids[a : a + m]
            s_eos = bool(m and self.s_table.special[span[-1]])
            if s_eos != t_eos:
                ends = ("ends", "does not end") if t_eos else ("does not end", "ends")
                raise CrossTokError(
                    f"{where}: the teacher's turn {ends[0]} in an end-of-turn token and the "
                    f"student's template's {ends[1]}: the spans cannot be aligned"
                )
            try:
                s_len = check_tokens(self.s_table, span[: m - int(s_eos)], texts[j], role="student")
            except CrossTokError as e:
                raise CrossTokError(
                    f"{where}: the student's rendering of the turn is not its text: {e}"
                ) from None
            parts.append(self._signal(row, at, t_len, t_eos, s_len, s_eos))
            at += int(n)
        s0, end = r.spans[0][0], sum(r.spans[-1])
        out = self._kept(row)
        out.update(
            prompt_ids=torch.from_numpy(s_ids[:s0].copy()),
            teacher_prompt_ids=row["teacher_prompt_ids"],  # the teacher's vocabulary
            response_ids=torch.from_numpy(s_ids[s0:end].copy()),
            span_starts=torch.tensor([a for a, _ in r.spans], dtype=torch.long),
            span_lengths=torch.tensor([m for _, m in r.spans], dtype=torch.long),
            # Turns after the last trained span are not kept (nor are their tokens).
            turn_starts=torch.tensor([a for a, _ in r.turns if a < end], dtype=torch.long),
            turn_roles=[role for a, role in r.turns if a < end],
            **{key: torch.cat([p[key] for p in parts]) for key in parts[0]},
        )
        return out


def crosstok_rows(folder, student_tokenizer, cache_dir=None) -> CrossTokRows | None:
    """The converter of `folder` for the student, or None for ordinary shards. Raises
    ShardError (one line naming the folder) when its teacher tokenizer cannot be found."""
    from crosstok.folder import teacher_vocabulary

    try:
        voc = teacher_vocabulary(folder)
        if voc is None:
            return None
        return CrossTokRows(folder, voc.tokenizer(), student_tokenizer, cache_dir)
    except CrossTokError as e:
        raise ShardError(None, str(e), field="vocabulary") from None

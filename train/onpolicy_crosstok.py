"""On-policy distillation from a teacher server of another tokenizer (issue #23 §2,
docs/onpolicy.md "A teacher of another tokenizer").

The student samples with its own tokenizer; each sample goes to the teacher as text:

1. the text is what the student's sampled tokens spell (crosstok.tokens.token_bytes with the
   student's token table); a last EOS of the student's is markup, not text;
2. the teacher's tokens are the teacher tokenizer's encoding of that text, checked to give it
   back byte for byte (crosstok.tokens.encode_exact, the round trip), then the teacher's EOS
   when the sample ended with one (the teacher special token of the same content as the
   student's EOS, else the teacher tokenizer's eos_token);
3. the teacher server scores the teacher view's prompt in its tokens + those tokens, the same
   request as without another tokenizer (TeacherClient.score: top-k prompt logprobs);
4. the answer is a teacher-vocabulary row as precompute writes one (meta["crosstok"]: the
   response text and each teacher token's byte span, both built by token_bytes) and goes
   through train/crosstok_rows.py's conversion, given the student's own prompt and sampled
   tokens: the batch has the alignment and the loss (train/crosstok_loss.py) of a row read
   from teacher-vocabulary shards.

A sample that cannot be sent (a special token inside its text, bytes that are not UTF-8, a
text the teacher's tokenizer does not give back), that does not fit the teacher's context,
or that cannot be aligned is skipped and counted: `ct_skipped` in the step log, the first
reason printed once.

The teacher view's prompt in the teacher's tokens: rows of teacher-vocabulary shards have it
(`teacher_prompt_ids`, rendered by the teacher's chat template at precompute; the folder's
teacher tokenizer must be the server's); prompts from a data file (`onpolicy.prompts`) are
rendered here with the teacher's chat template from their messages. An ordinary folder holds
the student's ids only and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crosstok.folder import teacher_vocabulary
from crosstok.tokens import CrossTokError, encode_exact, token_bytes
from shards.codec import tail_logprob_of
from shards.fingerprint import tokenizer_fingerprint
from train.config import ConfigError
from train.crosstok_rows import CrossTokRows
from train.prompts import PromptBatches


@dataclass(frozen=True)
class Request:
    """One sample in the teacher's tokens: teacher_ids (T_t,) and its meta["crosstok"]."""

    teacher_ids: list[int]
    meta: dict


class CrossTokTeacher:
    """Turns student samples into teacher requests, and teacher answers into student rows.

    teacher_tokenizer / student_tokenizer: transformers fast tokenizers. eos_ids: the student's
    end-of-sequence ids (a sample's last token may be one). name: for messages (the server).
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, eos_ids, name: str):
        self.teacher, self.name = teacher_tokenizer, name
        self.convert = CrossTokRows(name, teacher_tokenizer, student_tokenizer)
        self.t_table, self.s_table = self.convert.t_table, self.convert.s_table
        self.fingerprint = self.convert.t_fingerprint
        self.eos_ids = {int(e) for e in eos_ids}
        t_specials = {
            self.t_table.pieces[i]: i for i in np.flatnonzero(self.t_table.special)[::-1].tolist()
        }
        t_eos = teacher_tokenizer.eos_token_id
        # The student's EOS -> the teacher's: the special token of the same content (both end
        # the turn), else the teacher tokenizer's EOS.
        self.teacher_eos = {
            e: t_specials.get(self.s_table.pieces[e], t_eos)
            for e in self.eos_ids
            if 0 <= e < self.s_table.vocab_size
        }

    def request(self, response) -> Request:
        """The teacher request of a student sample (T_s,) ids. Raises CrossTokError (one line)
        when it cannot go to the teacher as text."""
        ids = [int(i) for i in response]
        eos = bool(ids) and ids[-1] in self.eos_ids
        body = ids[: len(ids) - int(eos)]
        table = self.s_table
        inner = [i for i in body if 0 <= i < table.vocab_size and table.special[i]]
        if inner:
            raise CrossTokError(
                f"the student's sample has the special token {table.pieces[inner[0]]!r} in its "
                "text (markup, not text)"
            )
        text, _ = token_bytes(table, body, role="student")
        t_ids, _ = encode_exact(self.teacher, self.t_table, text, role="teacher")
        if eos:
            t_eos = self.teacher_eos.get(ids[-1])
            if t_eos is None:
                raise CrossTokError("the teacher tokenizer has no EOS token to end the response")
            t_ids = [*t_ids, t_eos]
        _, spans = token_bytes(self.t_table, t_ids, text)
        meta = {"prompt_messages": [], "thinking": None, "response_text": text}
        return Request([int(i) for i in t_ids], {**meta, "token_bytes": spans})

    def row(self, row_id: str, prompt_ids, teacher_prompt_ids, response, req: Request, score):
        """The student row (train/crosstok_rows.py's keys) of a scored sample: the student's
        prompt (P_s,) and sampled response (T_s,), the teacher's prompt (P_t,), its request
        and its TeacherScore. Raises ShardError (one line) when it cannot be aligned."""
        return self.convert(
            {
                "id": row_id,
                "meta": json.dumps({"crosstok": req.meta}),
                "teacher_prompt_ids": teacher_prompt_ids,
                "response_ids": torch.tensor(req.teacher_ids, dtype=torch.long),
                "topk_ids": torch.from_numpy(score.topk_ids),
                "topk_logprobs": torch.from_numpy(score.topk_logprobs),
                "tail_logprob": torch.from_numpy(tail_logprob_of(score.topk_logprobs)),
                "token_logprob": torch.from_numpy(score.token_logprob),
                "student_prompt_ids": prompt_ids,
                "student_response_ids": response,
            }
        )


def load_teacher_tokenizer(path: str, client, shards):
    """The teacher server's tokenizer: `path` (onpolicy.teacher_tokenizer) when set, else the
    served model's folder when it is on this machine, else the teacher tokenizer a
    teacher-vocabulary folder carries; None when there is none (a remote server and ordinary
    shards: the teacher must then have the student's tokenizer). Raises ConfigError, one line,
    when the named one cannot be loaded."""
    from transformers import AutoTokenizer

    where = path or (client.root if client.root_is_local() else "")
    if where:
        what = "onpolicy.teacher_tokenizer" if path else "the teacher server's model folder"
        if path and not Path(path).exists():
            raise ConfigError(
                f"onpolicy.teacher_tokenizer={path}: teacher tokenizer not found (no such folder)"
            )
        try:
            return AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ConfigError(
                f"{what} {where}: cannot load the teacher's tokenizer: {first.strip()}"
            ) from None
    for part in shards.folders():
        if part.convert is not None:
            try:
                return teacher_vocabulary(part.reader.folder.path).tokenizer()
            except CrossTokError as e:
                raise ConfigError(str(e)) from None
    return None


def check_prompt_sources(shards, teacher_fingerprint: str | None, teacher_tokenizer=None):
    """Each source of on-policy prompts must give the teacher view in the server's tokens.

    teacher_fingerprint: the server's tokenizer's when it differs from the student's (then
    `teacher_tokenizer` renders a data file's prompts), None when it is the student's.
    Raises ConfigError (one line naming the folder) for a folder whose prompts are in
    another vocabulary than the server's."""
    if isinstance(shards, PromptBatches):
        if teacher_tokenizer is not None:
            shards.render_teacher(teacher_tokenizer)
        return
    for part in shards.folders():
        folder = part.reader.folder.path
        conv = part.convert
        if teacher_fingerprint is None and conv is not None:
            raise ConfigError(
                f"{folder}: teacher-vocabulary shards (their prompts are in their teacher's "
                "tokens), and the teacher server has the student's tokenizer: on-policy needs "
                "that folder's teacher, or shards of the student's tokenizer"
            )
        if teacher_fingerprint is not None and conv is None:
            raise ConfigError(
                f"{folder}: shards of the student's tokenizer, and the teacher server has "
                "another: its teacher views are not in the teacher's tokens; on-policy across "
                "tokenizers takes prompts from teacher-vocabulary shards of that teacher or "
                "from onpolicy.prompts"
            )
        if conv is not None and conv.t_fingerprint != teacher_fingerprint:
            raise ConfigError(
                f"{folder}: teacher-vocabulary shards of another teacher tokenizer "
                f"({conv.t_fingerprint[:19]}...) than the teacher server's "
                f"({teacher_fingerprint[:19]}...)"
            )


def same_tokenizer(a, b) -> bool:
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)

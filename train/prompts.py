"""On-policy prompts from a data file (`onpolicy.prompts`), for a run without shards.

A user with a remote teacher server needs no local precompute: the prompts come from a data
file in any format datafiles/ reads (kdshards' question/answer, TRL's `messages` and
`prompt`/`completion`; a completion or assistant turn is not used, the student answers
itself). Each row gives the student view Q (the chat template of its prompt) and the teacher
view Q+E (its `experience` added at `onpolicy.experience_position`, as precompute adds it);
the teacher scores the student's samples on Q+E.

`PromptBatches` is the prompt source `OnPolicyBatches` wraps in place of shard batches:
batches of `max_rows` prompts without responses, in an order drawn per epoch from
(seed, rank, epoch), each rank taking every world_size-th row. Resume is exact: a batch
carries (epoch, batch index), and the state is the next batch to give.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from datafiles.formats import Example, Fields, InputError, Reject, read_examples
from datafiles.views import render, teacher_messages
from train.batches import Batch, BatchSource, ShardBatches


class PromptBatches(BatchSource):
    """A BatchSource of prompt-only batches (ids, prompt_ids, teacher_prompt_ids; no
    trained tokens): what on-policy distillation samples from."""

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        *,
        split: str = "train",
        max_rows: int,
        max_length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        experience_position: str = "system",
    ):
        examples, rejects, total = read_examples(path, split, Fields(), "generate")
        if rejects:
            raise InputError(rejects, total)
        if len(examples) < world_size:
            raise ValueError(f"{path}: {len(examples)} prompt(s) cannot feed {world_size} ranks")
        self.path, self.max_rows, self.seed = str(path), max_rows, seed
        self.examples: list[Example] = examples[rank::world_size]
        self.rank = rank
        self.ids = [ex.id for ex in self.examples]
        # A prompt that alone fills max_length keeps its last tokens, as train.batches.collate
        # cuts a shard row's prompt.
        keep = max(max_length - 1, 0)
        self.prompt_ids = [
            torch.tensor(render(tokenizer, list(ex.messages))[-keep:], dtype=torch.long)
            for ex in self.examples
        ]
        self.experience_position = experience_position
        self.render_teacher(tokenizer)
        self.num_batches = -(-len(self.examples) // max_rows)
        self._epoch, self._next = 0, 0  # the next batch to give

    def __len__(self) -> int:
        return len(self.examples)

    def render_teacher(self, tokenizer) -> None:
        """The teacher views, rendered with `tokenizer`'s chat template: the student's, or a
        teacher's of another tokenizer (train/onpolicy_crosstok.py)."""
        self.teacher_prompt_ids = [
            torch.tensor(
                render(
                    tokenizer,
                    teacher_messages(list(ex.messages), ex.experience, self.experience_position),
                ),
                dtype=torch.long,
            )
            for ex in self.examples
        ]

    def check_room(self, max_model_len: int | None) -> None:
        """Refuse prompts whose teacher view leaves the teacher no room for a sampled token
        (and the one after it), each named FILE:LINE: FIELD, before any step is trained."""
        if not max_model_len:
            return
        bad = [
            Reject.of(
                ex.index,
                ex.where,
                ex.prompt_field,
                f"teacher view needs {len(t)} tokens, the teacher's max_model_len is "
                f"{max_model_len} (room for a response is needed)",
                "",
            )
            for ex, t in zip(self.examples, self.teacher_prompt_ids, strict=True)
            if len(t) + 2 > max_model_len
        ]
        if bad:
            raise InputError(bad, len(self.examples))

    def _batch(self, epoch: int, b: int, order: np.ndarray) -> Batch:
        rows = [int(i) for i in order[b * self.max_rows : (b + 1) * self.max_rows]]
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(
            input_ids=torch.zeros((0, 0), dtype=torch.long),
            attention_mask=torch.zeros((0, 0), dtype=torch.long),
            positions=empty,
            targets=empty,
            topk_ids=torch.zeros((0, 0), dtype=torch.long),
            topk_logprobs=torch.zeros((0, 0)),
            tail_logprob=torch.zeros(0),
            token_logprob=torch.zeros(0),
            ids=[self.ids[i] for i in rows],
            cursor=(self.rank, epoch, 0, b + 1),
            prompt_ids=[self.prompt_ids[i] for i in rows],
            teacher_prompt_ids=[self.teacher_prompt_ids[i] for i in rows],
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch, first = self._epoch, self._next
        while True:
            order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(
                len(self.examples)
            )
            for b in range(first, self.num_batches):
                yield self._batch(epoch, b, order)
            epoch, first = epoch + 1, 0

    # ---- BatchSource ---------------------------------------------------------------------

    def update(self, batch: Batch) -> None:
        """Record a batch the trainer consumed: the next one follows it."""
        _, epoch, _, done = batch.cursor
        self._epoch, self._next = (epoch + 1, 0) if done == self.num_batches else (epoch, done)

    def state_dict(self) -> dict:
        return {"prompts": self.path, "epoch": self._epoch, "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        if "prompts" not in state:
            raise ValueError(
                "the checkpoint's prompts came from shards, this run's from a data file "
                f"({self.path}): resume with the same onpolicy.prompts"
            )
        self._epoch, self._next = int(state["epoch"]), int(state["next"])

    def folders(self) -> list[ShardBatches]:
        """None: the prompts come from a data file, read in this process (no DataLoader)."""
        return []

"""Micro-batches from shards: length-aware, collated in the DataLoader worker, resumable.

The trainer pulls `Batch`es from a `BatchSource`. `ShardBatches` is the offline one: it
reads `sort_window` rows from a `ShardReader`, sorts them by length, cuts them into batches
under a padded-token budget, shuffles the batch order (seeded by the window), and collates
each batch inside the worker (one tensor hand-off per batch, not per row).

Resume stays exact with length sorting because a window is a pure function of where it
starts: a batch carries (shard, epoch, window start, batch index in window); after a restart
the reader re-reads the window from its start and the first `index + 1` batches are skipped.
A window never spans two epochs, so every batch belongs to one epoch (`num_epochs` stops at
an epoch's end exactly).

A row is a conversation (prompt_ids ++ response_ids) with trained spans (train/spans.py; a
row without spans trains its whole response). A row longer than `max_length` (its whole
conversation) follows the `overlong` policy: "skip" it, "truncate" it (see `collate`),
"drop_turns" (remove its earliest whole turns until it fits, train/spans.py `drop_turns`;
a row that cannot fit is skipped), or "error" (a ShardError naming the folder, row and
length). Such rows are counted, rows and tokens (skip: the row's tokens; truncate: the
tokens cut; drop_turns: the dropped turns' tokens, or the row's for a row skipped), and under
drop_turns the rows skipped, on the batch that follows them, and summed over the consumed
batches, so the counts survive a resume without double counting.

`keep="success"` trains on the rows of agent episodes the teacher solved (rollout rows record
the outcome in meta["episode"]), so SeqKD and SKD share one teacher run. The filter runs
before the windows, which are then made of kept rows only; a window still starts at a kept
row, so resume is unchanged. A row without the outcome is an error, and so is an epoch of a
rank's share without one kept row (the reader would loop forever).
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.errors import ShardError
from shards.reader import ShardReader
from shards.spans import trained_index
from train.spans import conversation_length, drop_turns

Overlong = Literal["skip", "truncate", "drop_turns", "error"]
Keep = Literal["all", "success"]


def solved_rows(rows: Iterator[dict], folder) -> Iterator[dict]:
    """The rows of episodes the teacher solved (meta["episode"]["success"]). Raises a
    ShardError for a row without that field, and for an epoch without one such row."""
    epoch, kept = None, 0
    for row in rows:
        if row["cursor"][1] != epoch:
            if epoch is not None and not kept:
                raise _none_solved(folder, row["cursor"][0])
            epoch, kept = row["cursor"][1], 0
        try:
            success = json.loads(row.get("meta") or "{}")["episode"]["success"]
        except (ValueError, KeyError, TypeError):
            raise ShardError(
                folder,
                "data.keep=success needs agent rollout rows (precompute mode rollout), which "
                "record the episode's outcome; this row does not",
                row=row.get("id"),
                field="meta.episode.success",
            ) from None
        if success:
            kept += 1
            yield row
    if epoch is not None and not kept:
        raise _none_solved(folder, None)


def _none_solved(folder, shard) -> ShardError:
    share = "" if shard is None else f" (the share of reader shard {shard})"
    return ShardError(
        folder,
        f"data.keep=success: no successful episode in an epoch{share}; nothing to train on",
        field="meta.episode.success",
    )


@dataclass
class Batch:
    """Right-padded student inputs and the teacher signal of every trained token.

    input_ids, attention_mask: (B, L) student view (each row's conversation: prompt Q +
    response).
    positions: (N,) flat indices into (B * L) of the positions whose next-token prediction is
    trained (the position before each span token), row by row, in span order.
    targets: (N,) the span tokens; topk_ids (N, K), topk_logprobs (N, K),
    tail_logprob (N,), token_logprob (N,): the teacher signal for each.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    token_logprob: torch.Tensor
    ids: list[str] = field(default_factory=list)
    cursor: tuple[int, int, int, int] | None = None  # (shard, epoch, window start, index)
    folder: int = 0  # which folder of a mixture (train/mixture.py) the rows came from
    # (rows, tokens, rows skipped under drop_turns) longer than max_length, skipped, truncated
    # or shortened since the previous batch
    overlong: tuple[int, int, int] = (0, 0, 0)
    # Per row, the (truncated) student prompt and the teacher's prompt: what on-policy
    # distillation samples from and sends to the teacher (train/onpolicy.py). For a
    # multi-span row, the conversation before its first span.
    prompt_ids: list[torch.Tensor] = field(default_factory=list)
    teacher_prompt_ids: list[torch.Tensor] = field(default_factory=list)
    # Teacher-vocabulary shards (train/crosstok_rows.py): per trained token its kind (0
    # mapped one-to-one, 1 first / 2 later token of a merged block) and, at kind 1, the
    # block's chain-rule teacher logprob; None for ordinary shards.
    ct_kind: torch.Tensor | None = None
    ct_block_logprob: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device) -> Batch:
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return Batch(**moved)


class BatchSource(ABC):
    """Where the trainer's batches come from: shards (`ShardBatches`), a weighted mixture of
    folders (train/mixture.py) or live student samples (train/onpolicy.py).

    Every source implements `__iter__`, `state_dict`, `load_state_dict`, `update` (each
    consumed batch, after its optimizer step) and `folders`. The hooks below have defaults
    here, so that the training loop calls them on any source without asking which it is.
    """

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def update(self, batch: Batch) -> None: ...

    def pop_metrics(self) -> dict:
        return {}

    @abstractmethod
    def folders(self) -> list[ShardBatches]:
        """The shard folders this source reads, one `ShardBatches` each."""

    def bind(self, load: Callable[[ShardBatches], Iterable[Batch]]) -> Iterable[Batch]:
        """What the trainer iterates: `load` turns each shard folder's `ShardBatches` into a
        loader (a DataLoader with its workers); the source reads through those loaders."""
        return self

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based). Shards have nothing to refresh."""
        return None

    def close(self) -> None:
        """Called once when training ends: release threads, engines, connections. Shard
        readers hold none between batches."""
        return None


def collate(rows: list[dict], max_length: int, pad_id: int = 0) -> Batch:
    """Rows (ShardReader's, or live ones without spans) -> Batch.

    Each row's sequence is its conversation, prompt_ids ++ response_ids, and its trained
    tokens are its span tokens (train/spans.py), the top-k rows 1:1 with them. A prompt that
    alone fills `max_length` keeps its last tokens (the question's end), shifting the spans;
    a conversation longer than the budget is then cut on the right, and the span tokens past
    the cut are not trained (nor their top-k rows).
    """
    seqs, trained, prompts = [], [], []
    for r in rows:
        p = len(r["prompt_ids"])
        shift = p - min(p, max(max_length - 1, 0))  # prompt tokens cut on the left
        conv = torch.cat([r["prompt_ids"], r["response_ids"]])
        end = min(len(conv), shift + max_length)
        index = trained_index(r)  # (N,) conversation coordinates, sorted
        if len(index) != len(r["topk_ids"]):
            raise ValueError(
                f"row {r['id']!r}: field 'topk_ids': {len(r['topk_ids'])} rows for "
                f"{len(index)} span tokens"
            )
        n = int(torch.searchsorted(index, end))  # the span tokens inside the budget
        if "ct_kind" in r:  # a cut inside a merged block: the whole block is not trained
            while 0 < n < len(index) and int(r["ct_kind"][n]) == 2:
                n -= 1
        seqs.append(conv[shift:end])
        trained.append((index[:n] - shift, conv[index[:n]], n))
        # On-policy samples from the conversation before the first span (drop_turns keeps
        # the row's original one; train/spans.py).
        prompt = r.get("sample_prompt_ids", r["prompt_ids"])
        prompts.append(prompt[len(prompt) - min(len(prompt), max(max_length - 1, 0)) :])
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    positions, parts = [], {k: [] for k in ("ids", "lps", "tail", "tok", "tgt", "kind", "blp")}
    for b, (s, (at, targets, n)) in enumerate(zip(seqs, trained, strict=True)):
        input_ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
        # The span token at sequence position i is predicted from position i - 1.
        positions.append(b * length + at - 1)
        r = rows[b]
        parts["ids"].append(r["topk_ids"][:n])
        parts["lps"].append(r["topk_logprobs"][:n])
        parts["tail"].append(r["tail_logprob"][:n])
        parts["tok"].append(r["token_logprob"][:n])
        parts["tgt"].append(targets)
        if "ct_kind" in r:
            parts["kind"].append(r["ct_kind"][:n])
            parts["blp"].append(r["ct_block_logprob"][:n])
    if parts["kind"] and len(parts["kind"]) != len(rows):
        raise ValueError("a batch mixes teacher-vocabulary rows with ordinary ones")
    crosstok = bool(parts["kind"])
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        positions=torch.cat(positions).long(),
        targets=torch.cat(parts["tgt"]).long(),
        topk_ids=torch.cat(parts["ids"]).long(),
        topk_logprobs=torch.cat(parts["lps"]).float(),
        tail_logprob=torch.cat(parts["tail"]).float(),
        token_logprob=torch.cat(parts["tok"]).float(),
        ids=[r["id"] for r in rows],
        prompt_ids=prompts,
        teacher_prompt_ids=[r.get("teacher_prompt_ids", r["prompt_ids"]) for r in rows],
        ct_kind=torch.cat(parts["kind"]).to(torch.int8) if crosstok else None,
        ct_block_logprob=torch.cat(parts["blp"]).float() if crosstok else None,
    )


def plan_batches(lengths: list[int], batch_tokens: int, max_rows: int) -> list[list[int]]:
    """Group row indices, sorted by length, so each batch's padded size stays in budget."""
    order = np.argsort(lengths, kind="stable")
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(longest, lengths[i])
        if cur and (n * (len(cur) + 1) > batch_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur, n = [], lengths[i]
        cur.append(int(i))
        longest = n
    if cur:
        batches.append(cur)
    return batches


class ShardBatches(IterableDataset, BatchSource):
    """Batches of one rank, for a DataLoader with `batch_size=None`."""

    def __init__(
        self,
        reader: ShardReader,
        *,
        batch_tokens: int,
        max_rows: int,
        max_length: int,
        sort_window: int,
        seed: int = 0,
        pad_id: int = 0,
        overlong: Overlong = "skip",
        convert: Callable[[dict], dict] | None = None,
        keep: Keep = "all",
    ):
        self.reader = reader
        self.keep = keep
        # Teacher-vocabulary folders: each row turned into a student row as it is read
        # (train/crosstok_rows.py), before length sorting, so everything after is unchanged.
        self.convert = convert
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        self.max_length, self.sort_window = max_length, sort_window
        self.seed, self.pad_id, self.overlong = seed, pad_id, overlong
        self._skip: dict[int, tuple[int, int, int]] = {}  # shard -> (epoch, start, batches)
        # rows, tokens, rows skipped (drop_turns): over the consumed batches (this rank)
        self.overlong_seen = [0, 0, 0]

    def _windows(self, rows: Iterator[dict]):
        window = []
        for row in rows:
            if window and row["cursor"][1] != window[0]["cursor"][1]:
                yield window  # the epoch's last rows: a window never spans two epochs
                window = []
            window.append(row)
            if len(window) == self.sort_window:
                yield window
                window = []
        if window:
            yield window

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        shard = self.reader.rank * (1 if info is None else info.num_workers)
        shard += 0 if info is None else info.id
        skip = self._skip.get(shard)
        if skip is not None:
            self.reader.seek(shard, skip[0], skip[1])
        pending, warned = (0, 0, 0), False
        rows = iter(self.reader)
        if self.keep == "success":
            rows = solved_rows(rows, self.reader.folder.path)
        if self.convert is not None:
            rows = map(self.convert, rows)
        for window in self._windows(rows):
            _, epoch, pos = window[0]["cursor"]
            start = pos - 1  # position of the window's first row
            window, cut = self._overlong(window)
            if cut[0] and not warned:
                warned = True
                print(
                    f"[train] data.overlong={self.overlong}: rows longer than data.max_length="
                    f"{self.max_length} in {self.reader.folder.path} (counted in metrics.jsonl "
                    "as overlong_rows, overlong_tokens)",
                    file=sys.stderr,
                    flush=True,
                )
            lengths = [min(conversation_length(r), self.max_length) for r in window]
            plan = plan_batches(lengths, self.batch_tokens, self.max_rows)
            order = np.random.default_rng([self.seed, shard, epoch, start]).permutation(len(plan))
            first = 0
            if skip is not None and (epoch, start) == skip[:2]:
                first, skip = skip[2], None
            if first == 0:  # else a batch of this window, with its counts, was consumed
                pending = tuple(a + b for a, b in zip(pending, cut, strict=True))
            for index in range(first, len(plan)):
                batch = collate(
                    [window[i] for i in plan[order[index]]], self.max_length, self.pad_id
                )
                if not batch.num_tokens:
                    continue  # rows with empty responses train nothing
                batch.cursor = (shard, epoch, start, index + 1)
                batch.overlong, pending = pending, (0, 0, 0)
                yield batch

    def _overlong(self, window: list[dict]) -> tuple[list[dict], tuple[int, int, int]]:
        """The window's rows under the `overlong` policy, and (rows, tokens, rows skipped
        by drop_turns) affected."""
        lengths = [conversation_length(r) for r in window]
        long = [i for i, n in enumerate(lengths) if n > self.max_length]
        if not long:
            return window, (0, 0, 0)
        if self.overlong == "error":
            row = window[long[0]]
            raise ShardError(
                self.reader.folder.path,
                f"prompt + response is {lengths[long[0]]} tokens, longer than data.max_length="
                f"{self.max_length} (data.overlong=error; raise data.max_length, or set "
                "data.overlong=skip, truncate or drop_turns)",
                row=repr(str(row["id"])),
                field="prompt_ids+response_ids",
            )
        if self.overlong == "truncate":
            return window, (len(long), sum(lengths[i] - self.max_length for i in long), 0)
        shorter = {}  # drop_turns: row index -> the row without its earliest turns
        if self.overlong == "drop_turns":
            for i in long:
                try:
                    row = drop_turns(window[i], self.max_length)
                except ValueError as e:
                    raise ShardError(
                        self.reader.folder.path,
                        f"data.overlong=drop_turns: {e}",
                        row=repr(str(window[i]["id"])),
                        field="turn_starts",
                    ) from None
                if row is not None:
                    shorter[i] = row
        kept = [shorter.get(i, r) for i, r in enumerate(window) if i in shorter or i not in long]
        tokens = sum(lengths[i] - conversation_length(shorter[i]) for i in shorter)
        tokens += sum(lengths[i] for i in long if i not in shorter)
        skipped = len(long) - len(shorter) if self.overlong == "drop_turns" else 0
        return kept, (len(long), tokens, skipped)

    def update(self, batch: Batch) -> None:
        """Record a batch the trainer consumed."""
        shard, epoch, start, done = batch.cursor
        self._skip[shard] = (epoch, start, done)
        seen = zip(self.overlong_seen, batch.overlong, strict=True)
        self.overlong_seen = [a + b for a, b in seen]

    def pop_metrics(self) -> dict:
        """Rows longer than max_length skipped, truncated or shortened so far, and their
        tokens; under drop_turns also the rows skipped (those that could not fit)."""
        rows, tokens, skipped = self.overlong_seen
        if not rows:
            return {}
        out = {"overlong_rows": rows, "overlong_tokens": tokens}
        if self.overlong == "drop_turns":
            out["overlong_skipped_rows"] = skipped
        return out

    def folders(self) -> list[ShardBatches]:
        return [self]

    def bind(self, load: Callable[[ShardBatches], Iterable[Batch]]) -> Iterable[Batch]:
        return load(self)

    def state_dict(self) -> dict:
        return {
            "reader": {**self.reader.state_dict(), "positions": {}},
            "batches": {str(s): list(v) for s, v in sorted(self._skip.items())},
            "overlong": list(self.overlong_seen),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self._skip = {int(s): tuple(v) for s, v in state["batches"].items()}
        # A checkpoint from before drop_turns holds (rows, tokens).
        seen = [int(x) for x in state.get("overlong", ())]
        self.overlong_seen = seen + [0] * (3 - len(seen))

"""On-policy distillation (GKD): a batch source of live student samples scored by a teacher.

`OnPolicyBatches` wraps the shard source (or, with `onpolicy.prompts`, the prompts of a data
file: train/prompts.py, every batch on-policy). For micro-batch b (step b // grad_accum, index
b % grad_accum) a draw seeded by (seed, step, index) decides, with probability `lmbda`,
whether the batch is on-policy: the student samples `n_samples` responses to the student
view of the shard batch's prompts (with `sampler=vllm` a vLLM engine in this process,
vllm_engine/student.py, whose weights `after_step` refreshes every `sync_every` optimizer
steps; with `sampler=hf` Hugging Face `generate` with KV cache), and the teacher server
scores each sample on the teacher view (teacher_prompt_ids + sample) with its top-k prompt
logprobs. Otherwise the shard batch is trained as is (the teacher's responses, or
the dataset's, whichever the shards hold). A conversation row with several trained spans
(train/spans.py) gives the conversation before its first span as its prompt, in both views
(with data.overlong=drop_turns too: the row's own prompt, which its teacher view is of); its
later turns are trained from the shards only. A sample is one live row without spans: its
whole response is trained. Either way the result is a `Batch` with the same
teacher signal the offline methods use, so the losses are the ones of train/losses.py.
A teacher server of another tokenizer (train/onpolicy_crosstok.py) gets each sample as text,
in its own tokens, and its answer is aligned as a teacher-vocabulary shard row is (the
losses of train/crosstok_loss.py); a sample it cannot take is skipped and counted.

All micro-batches of one optimizer step are sampled from the same weights, so the source
samples them in one generate call (a batch of grad_accum x max_prompts decodes in little
more time than one micro-batch), then sends them to the teacher one micro-batch at a time
(its requests concurrently, from a thread pool), the next as soon as the previous one's
scores are in: the teacher scores micro-batch i + 1 while the trainer trains on micro-batch
i. The time spent blocked on the teacher is reported as `teacher_wait_s` and its share of
wall time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crosstok.tokens import CrossTokError
from shards.codec import tail_logprob_of
from shards.errors import ShardError
from shards.fingerprint import tokenizer_fingerprint, weights_fingerprint
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter
from train.batches import Batch, BatchSource, ShardBatches, collate
from train.config import ConfigError, OnPolicyConfig
from train.onpolicy_crosstok import (
    CrossTokTeacher,
    Request,
    check_prompt_sources,
    load_teacher_tokenizer,
    same_tokenizer,
)
from train.prompts import PromptBatches
from vllm_engine.student import VLLMStudent, trainer_weights
from vllm_engine.teacher_client import TeacherClient

MIX, SAMPLE = 0, 1  # seed streams


@dataclass
class Rollout:
    """A micro-batch's samples: jobs are (prompt row, sample index, response ids, and the
    teacher request of a teacher of another tokenizer or None); futures, the teacher's
    answers to them once submitted."""

    batch: Batch
    step: int
    index: int
    jobs: list[tuple[int, int, torch.Tensor, Request | None]]
    futures: list = field(default_factory=list)


def is_onpolicy(seed: int, step: int, index: int, lmbda: float) -> bool:
    """The mixing draw of micro-batch `index` of `step`: on-policy with probability lmbda."""
    if lmbda >= 1.0:
        return True
    return bool(np.random.default_rng([seed, step, index, MIX]).random() < lmbda)


def sample_seed(seed: int, step: int, index: int, *sample: int) -> int:
    """The sampling seed of micro-batch (step, index), or of one sample of it."""
    return int(np.random.default_rng([seed, step, index, SAMPLE, *sample]).integers(2**62))


def eos_ids(lm, tokenizer) -> set[int]:
    """The student's end-of-sequence ids: its tokenizer's and its generation config's."""
    eos = tokenizer.eos_token_id
    gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    return {
        int(e)
        for e in ([eos] + (gen_eos if isinstance(gen_eos, list) else [gen_eos]))
        if e is not None
    }


def cut_at_eos(tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """Generated tokens up to and including the first end-of-sequence token."""
    hits = [i for i, t in enumerate(tokens.tolist()) if t in eos_ids]
    return tokens[: hits[0] + 1] if hits else tokens


class OnPolicyBatches(BatchSource):
    """A BatchSource: shard batches, or student samples with teacher scores (see above)."""

    def __init__(
        self,
        shards: ShardBatches,
        client: TeacherClient | None,
        cfg: OnPolicyConfig,
        *,
        student: Callable[[], torch.nn.Module],
        tokenizer,
        seed: int,
        grad_accum: int,
        max_length: int,
        device: torch.device | str = "cpu",
        writer=None,
        engine=None,
        episodes=None,
        crosstok: CrossTokTeacher | None = None,
    ):
        self.shards, self.client, self.cfg = shards, client, cfg
        # A teacher of another tokenizer (train/onpolicy_crosstok.py): samples go as text.
        self.crosstok, self._skip_told = crosstok, False
        # Live episodes (train/onpolicy_env.py LiveEpisodes), played with self.complete.
        self.episodes, self.tokenizer = episodes, tokenizer
        self.engine = engine  # a VLLMStudent (sampler=vllm), else None: HF generate
        self.student, self.seed, self.grad_accum = student, seed, grad_accum
        self.max_length, self.device, self.writer = max_length, torch.device(device), writer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_ids(student(), tokenizer)
        self.consumed = 0  # micro-batches the trainer has trained on
        self._stale = False  # the engine's weights are not the trainer's (after a resume)
        self._loader = None
        self._since = self._blank()

    def _blank(self) -> dict:
        out = {
            "t0": time.monotonic(),
            "onpolicy": 0,
            "gen_s": 0.0,
            "teacher_wait_s": 0.0,
            "sync_s": 0.0,
        }
        if self.crosstok is not None:
            out["ct_skipped"] = 0  # samples the teacher of another tokenizer could not take
        return out

    def _skip(self, sample_id: str, reason: str) -> None:
        """Count a sample left out (a teacher of another tokenizer); the first one is told."""
        self._since["ct_skipped"] += 1
        if not self._skip_told:
            self._skip_told = True
            print(
                f"[train] on-policy: sample {sample_id} skipped (counted as ct_skipped in "
                f"metrics.jsonl): {reason}",
                file=sys.stderr,
                flush=True,
            )

    def bind(self, load: Callable[[ShardBatches], Iterable[Batch]]) -> OnPolicyBatches:
        """Take prompts from the shard source's loader(s) (`load`, see BatchSource.bind)."""
        self._loader = self.shards.bind(load)
        self._since = self._blank()
        return self

    # ---- the batches -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self.episodes is not None:
            yield from self._iter_episodes()
            return
        shard_batches = iter(self._loader if self._loader is not None else self.shards)
        b = self.consumed
        while True:
            step = b // self.grad_accum
            # One optimizer step's micro-batches: all of them sampled in one generate call
            # (same weights; one batch of grad_accum x prompts decodes nearly as fast as one
            # micro-batch's). The teacher gets them one micro-batch at a time, the next one
            # as soon as the previous one's scores are in, so that it scores micro-batch i + 1
            # while the trainer trains on micro-batch i (sent all at once, they would be
            # scored as one batch and the first would wait for the last).
            indices = range(b % self.grad_accum, self.grad_accum)
            batches = [(i, next(shard_batches)) for i in indices]
            rollouts = self._rollout_step(
                [
                    (i, batch)
                    for i, batch in batches
                    if self.client is not None and is_onpolicy(self.seed, step, i, self.cfg.lmbda)
                ],
                step,
            )
            queue = list(rollouts.values())
            if queue:
                self._submit(queue[0])
            for index, batch in batches:
                if index in rollouts:
                    out = self._collect(queue.pop(0))
                    if queue:
                        self._submit(queue[0])
                    batch = out
                yield batch
                b += 1

    def _iter_episodes(self) -> Iterator[Batch]:
        """Live episodes: an on-policy micro-batch (the same lmbda draw) is the student's
        episodes, played, scored and collated by LiveEpisodes; the others are shard batches
        (the teacher's rollouts, or any shards). Not pipelined: the step waits for the game
        and the teacher in turn (both logged)."""
        shard_batches = iter(self._loader if self._loader is not None else self.shards)
        b = self.consumed
        while True:
            step, index = divmod(b, self.grad_accum)
            batch = next(shard_batches)
            if self.client is not None and is_onpolicy(self.seed, step, index, self.cfg.lmbda):
                live = self.episodes.batch(step, index)
                if live is not None:  # else every episode was left out: the shard batch
                    self._since["onpolicy"] += 1
                    live.cursor, live.overlong = batch.cursor, batch.overlong
                    batch = live
            yield batch
            b += 1

    def complete(self, prompts: list[list[int]], seeds: list[int]) -> list[str]:
        """envs.policy's complete(): one reply text per prompt, each sampled with its seed
        (vLLM: per request; HF: one generate call per prompt), cut after the first EOS."""
        if self.engine is not None:
            if self._stale:
                self.sync()
            out = self.engine.generate(
                prompts,
                seeds,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_new_tokens=[
                    max(1, min(self.cfg.max_new_tokens, self.max_length - len(p))) for p in prompts
                ],
                stop_ids=sorted(self.eos_ids),
            )
            tokens = [cut_at_eos(torch.tensor(t, dtype=torch.long), self.eos_ids) for t in out]
        else:
            tokens = [
                self._generate_hf([torch.tensor(p, dtype=torch.long)], s, n=1)[0]
                for p, s in zip(prompts, seeds, strict=True)
            ]
        return [self.tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in tokens]

    # ---- the student engine's weights ------------------------------------------------------

    def after_step(self, step: int) -> None:
        """Called by the training loop after optimizer step `step` (1-based): every
        `sync_every` steps the engine gets the trainer's current weights."""
        if self.engine is not None and step % self.cfg.sync_every == 0:
            self.sync()

    def sync(self) -> None:
        """Push the trainer's weights into the student engine, in place."""
        t0 = time.monotonic()
        self.engine.push(trainer_weights(self.student()))
        self._stale = False
        self._since["sync_s"] += time.monotonic() - t0

    # ---- sampling --------------------------------------------------------------------------

    def _generate(
        self, prompts: list[torch.Tensor], step: int, indices: list[int]
    ) -> list[torch.Tensor]:
        """n_samples responses per prompt (prompt-major), cut after the first EOS.

        indices: the micro-batch index of each prompt. The vLLM engine seeds each sample by
        (step, index, sample), so a sample does not depend on what it was batched with; HF
        generate draws the whole call from one seed, (step, first index).
        """
        if self.engine is None:
            return self._generate_hf(prompts, sample_seed(self.seed, step, indices[0]))
        if self._stale:  # resumed: the engine still has the weights it was started with
            self.sync()
        n = self.cfg.n_samples
        seeds, done = [], {}  # sample j of micro-batch `index`: seed (step, index, j)
        for index in indices:
            first = done.get(index, 0)
            seeds += [sample_seed(self.seed, step, index, first + j) for j in range(n)]
            done[index] = first + n
        out = self.engine.generate(
            [p.tolist() for p in prompts for _ in range(n)],
            seeds,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_new_tokens=[
                max(1, min(self.cfg.max_new_tokens, self.max_length - len(p)))
                for p in prompts
                for _ in range(n)
            ],
            stop_ids=sorted(self.eos_ids),
        )
        return [cut_at_eos(torch.tensor(t, dtype=torch.long), self.eos_ids) for t in out]

    @torch.no_grad()
    def _generate_hf(
        self, prompts: list[torch.Tensor], seed: int, n: int | None = None
    ) -> list[torch.Tensor]:
        lm = self.student()
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues every row
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        new_tokens = max(1, min(self.cfg.max_new_tokens, self.max_length - width))
        was_training = lm.training
        lm.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = lm.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    top_k=0,
                    max_new_tokens=new_tokens,
                    num_return_sequences=self.cfg.n_samples if n is None else n,
                    pad_token_id=self.pad_id,
                    eos_token_id=sorted(self.eos_ids),
                    use_cache=True,
                )
        finally:
            lm.train(was_training)
        return [cut_at_eos(row, self.eos_ids) for row in out[:, width:].cpu()]

    def _rollout_step(self, batches: list[tuple[int, Batch]], step: int) -> dict:
        """Sample the prompts of a step's on-policy micro-batches (index, batch) in one call:
        index -> a `Rollout` of its samples, in the order of `batches`."""
        if not batches:
            return {}
        prompts, indices = [], []
        counts = [min(len(batch.prompt_ids), self.cfg.max_prompts) for _, batch in batches]
        for (index, batch), n in zip(batches, counts, strict=True):
            prompts += batch.prompt_ids[:n]
            indices += [index] * n
        t0 = time.monotonic()
        samples = iter(self._generate(prompts, step, indices))
        self._since["gen_s"] += time.monotonic() - t0
        limit = self.client.max_model_len or 1 << 30
        out = {}
        for (index, batch), n in zip(batches, counts, strict=True):
            jobs = []
            for j in range(n * self.cfg.n_samples):
                resp = next(samples)
                p, s = divmod(j, self.cfg.n_samples)
                room = limit - 1 - len(batch.teacher_prompt_ids[p])
                if self.crosstok is None:
                    # The teacher's context must hold the teacher view, the sample and one
                    # more token.
                    resp = resp[: max(0, room)]
                    if len(resp) > 0:
                        jobs.append((p, s, resp, None))
                    continue
                if len(resp) == 0:
                    continue
                # Another tokenizer: the whole text or nothing (a cut in teacher tokens
                # would not be the student's text).
                sample_id = f"{batch.ids[p]}@{step}.{index}.{s}"
                try:
                    req = self.crosstok.request(resp)
                except CrossTokError as e:
                    self._skip(sample_id, str(e))
                    continue
                if len(req.teacher_ids) > room:
                    self._skip(
                        sample_id,
                        f"the teacher view and the sample are {len(req.teacher_ids) - room} "
                        f"tokens too long for the teacher's max_model_len ({limit})",
                    )
                    continue
                jobs.append((p, s, resp, req))
            out[index] = Rollout(batch, step, index, jobs)
        return out

    def _submit(self, r: Rollout) -> None:
        """Send a rollout's samples to the teacher (not waiting)."""
        r.futures = [
            self.client.submit(
                r.batch.teacher_prompt_ids[p].tolist(),
                resp.tolist() if req is None else req.teacher_ids,
            )
            for p, _, resp, req in r.jobs
        ]

    def _collect(self, r: Rollout) -> Batch:
        """Wait for the teacher's scores of a submitted rollout and build the training batch
        from them."""
        batch, step, index, jobs = r.batch, r.step, r.index, r.jobs
        t0 = time.monotonic()
        scores = [future.result() for future in r.futures]
        self._since["teacher_wait_s"] += time.monotonic() - t0
        self._since["onpolicy"] += 1
        rows, examples = [], {}
        for (p, s, resp, req), sc in zip(jobs, scores, strict=True):
            sample_id = f"{batch.ids[p]}@{step}.{index}.{s}"
            if req is not None:  # a teacher of another tokenizer: aligned as shard rows are
                try:
                    rows.append(
                        self.crosstok.row(
                            sample_id,
                            batch.prompt_ids[p],
                            batch.teacher_prompt_ids[p],
                            resp,
                            req,
                            sc,
                        )
                    )
                except ShardError as e:
                    self._skip(sample_id, e.message)
                continue
            rows.append(
                {
                    "id": sample_id,
                    "prompt_ids": batch.prompt_ids[p],
                    "teacher_prompt_ids": batch.teacher_prompt_ids[p],
                    "response_ids": resp,
                    "topk_ids": torch.from_numpy(sc.topk_ids),
                    "topk_logprobs": torch.from_numpy(sc.topk_logprobs),
                    "tail_logprob": torch.from_numpy(tail_logprob_of(sc.topk_logprobs)),
                    "token_logprob": torch.from_numpy(sc.token_logprob),
                }
            )
            examples.setdefault(p, []).append((s, rows[-1], sc))
        if self.writer is not None:
            self.writer.write(examples, batch.ids, f"{step}.{index}")
        if not rows and batch.num_tokens:
            return batch  # every sample was cut to nothing or skipped: train the shard batch
        if not rows:
            # Prompts without responses (onpolicy.prompts) cannot be trained: a batch of the
            # prompts that trains no token keeps every rank's step in line.
            rows = [self._nothing(batch, p) for p in range(len(batch.ids))]
        out = collate(rows, self.max_length, self.pad_id)
        out.cursor, out.overlong = batch.cursor, batch.overlong
        return out

    def _nothing(self, batch: Batch, p: int) -> dict:
        """A row of prompt p of `batch` that trains no token (of the batch kind the teacher
        gives: teacher-vocabulary rows with a teacher of another tokenizer)."""
        row = {
            "id": batch.ids[p],
            "prompt_ids": batch.prompt_ids[p],
            "teacher_prompt_ids": batch.teacher_prompt_ids[p],
            "response_ids": torch.zeros(0, dtype=torch.long),
            "topk_ids": torch.zeros((0, 1), dtype=torch.long),
            "topk_logprobs": torch.zeros((0, 1)),
            "tail_logprob": torch.zeros(0),
            "token_logprob": torch.zeros(0),
        }
        if self.crosstok is not None:
            row.update(ct_kind=torch.zeros(0, dtype=torch.int8), ct_block_logprob=torch.zeros(0))
        return row

    # ---- BatchSource ---------------------------------------------------------------------

    def folders(self) -> list[ShardBatches]:
        return self.shards.folders()

    def update(self, batch: Batch) -> None:
        self.consumed += 1
        self.shards.update(batch)

    def state_dict(self) -> dict:
        if self.writer is not None:
            self.writer.flush()  # samples are committed with each checkpoint
        return {"shards": self.shards.state_dict(), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.shards.load_state_dict(state["shards"])
        self.consumed = int(state["consumed"])
        self._stale = self.engine is not None

    def close(self) -> None:
        if self.episodes is not None:
            self.episodes.close()
        if self.client is not None:
            self.client.close()
        if self.engine is not None:
            self.engine.close()

    def pop_metrics(self) -> dict:
        """Since the last call: on-policy batches, generation, teacher-wait and weight-sync
        seconds, and the share of wall time spent waiting for the teacher."""
        s, self._since = self._since, self._blank()
        if self.episodes is not None:  # env_* counts and times; its teacher wait adds up
            for key, value in self.episodes.pop_metrics().items():
                s[key] = s.get(key, 0) + value
        wall = max(time.monotonic() - s.pop("t0"), 1e-9)
        s["teacher_share"] = s["teacher_wait_s"] / wall
        s["teacher_retries"] = self.client.num_retries if self.client else 0
        return {**s, **self.shards.pop_metrics()}  # the prompts' rows over max_length


class SampleWriter:
    """Writes on-policy samples with their teacher scores to shards (source = student), for
    inspection with tools.shards and re-use; files are committed at each checkpoint."""

    def __init__(self, folder: str | Path, metadata, writer_id: str = "r0"):
        self.writer = ShardWriter(folder, metadata, writer_id=writer_id)

    def write(self, examples: dict, ids: list[str], where: str) -> None:
        for p, samples in examples.items():
            self.writer.add(
                [
                    ShardRow(
                        id=f"{ids[p]}@{where}",
                        prompt_ids=row["prompt_ids"].numpy(),
                        teacher_prompt_ids=row["teacher_prompt_ids"].numpy(),
                        response_ids=row["response_ids"].numpy(),
                        topk_ids=sc.topk_ids,
                        topk_logprobs=sc.topk_logprobs,
                        token_logprobs=sc.token_logprob,
                        sample_index=s,
                        source="student",
                        meta={"step": int(where.split(".")[0])},
                    )
                    for s, row, sc in samples
                ]
            )

    def flush(self) -> None:
        self.writer.flush()


def build_onpolicy(
    cfg, shards: ShardBatches | PromptBatches, accelerator, module, tokenizer
) -> OnPolicyBatches:
    """The on-policy source of a run: connect to the teacher server and check it first."""
    op = cfg.onpolicy
    from_file = isinstance(shards, PromptBatches)
    k = op.k or shards.reader.metadata.k  # prompts from a data file: op.k, checked by the config
    api_key = None
    if op.teacher_api_key_env:
        api_key = os.environ.get(op.teacher_api_key_env)
        if not api_key:
            raise ValueError(
                f"onpolicy.teacher_api_key_env={op.teacher_api_key_env}: that environment "
                "variable is not set or empty; export the teacher server's API key in it"
            )
    client = TeacherClient(
        op.teacher_url,
        k,
        timeout_s=op.timeout_s,
        retries=op.retries,
        backoff_s=op.backoff_s,
        max_backoff_s=op.max_backoff_s,
        give_up_after_s=op.give_up_after_s,
        concurrency=op.concurrency,
        api_key=api_key,
        ca_file=op.teacher_ca_file or None,
    )
    # The server's tokenizer, when it can be found here: another than the student's makes
    # the run cross-tokenizer (train/onpolicy_crosstok.py).
    client.card()
    teacher_tok = load_teacher_tokenizer(op.teacher_tokenizer, client, shards)
    if teacher_tok is not None and same_tokenizer(teacher_tok, tokenizer):
        teacher_tok = None
    # Refuses a tokenizer other than the one found, and a remote server that reports another
    # model.
    described = client.connect(
        tokenizer,
        op.teacher_model or ("" if from_file else shards.reader.metadata.teacher),
        teacher_tokenizer=teacher_tok,
    )
    crosstok = None
    if teacher_tok is not None:
        for ok, what in [
            (not op.write_shards, "onpolicy.write_shards"),
            (not op.env_config, "onpolicy.env_config (live episodes)"),
            (cfg.loss.reverse_kl_estimator != "mc", "loss.reverse_kl_estimator=mc"),
        ]:
            if not ok:
                raise ConfigError(
                    f"{what} is not supported with a teacher of another tokenizer ({client.url})"
                )
        lm = accelerator.unwrap_model(module).lm
        crosstok = CrossTokTeacher(teacher_tok, tokenizer, eos_ids(lm, tokenizer), client.url)
        described += (
            f"; tokenizer {teacher_tok.name_or_path}, not the student's: samples go to it as "
            "text and are aligned"
        )
    check_prompt_sources(shards, crosstok and crosstok.fingerprint, teacher_tok)
    if from_file:
        shards.check_room(client.max_model_len)
    if accelerator.is_main_process:
        print(f"[train] on-policy: lmbda={op.lmbda}, k={k}, {described}", flush=True)
    writer = None
    if op.write_shards:
        root = Path(client.root)
        has_weights = root.is_dir() and any(root.glob("*.safetensors"))
        writer = SampleWriter(
            op.write_shards,
            ShardMetadata(
                k=k,
                vocab_size=(
                    accelerator.unwrap_model(module).lm.config.vocab_size
                    if from_file
                    else shards.reader.metadata.vocab_size
                ),
                teacher=client.root,
                teacher_fingerprint=(
                    weights_fingerprint(root) if has_weights else f"server:{client.model}"
                ),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                sampling={
                    "mode": "onpolicy",
                    "temperature": op.temperature,
                    "top_p": op.top_p,
                    "max_tokens": op.max_new_tokens,
                    "n": op.n_samples,
                },
            ),
            writer_id=f"r{accelerator.process_index}",
        )
    if op.env_config and from_file:
        raise ValueError("onpolicy.env_config: live episodes mix with shards, not prompts")
    engine = None
    if op.sampler == "vllm":
        lm = accelerator.unwrap_model(module).lm
        bf16 = accelerator.mixed_precision == "bf16" or cfg.model.dtype == "bfloat16"
        engine = VLLMStudent(
            cfg.model.path,
            dtype="bfloat16" if bf16 else "float32",
            max_model_len=cfg.data.max_length + 1,  # + 1: room for one token after a full prompt
            seed=cfg.seed + accelerator.process_index,
            gpu_memory_utilization=op.gpu_memory_utilization,
            cpu_kv_cache_gib=op.cpu_kv_cache_gib,
            distributed=accelerator.num_processes > 1,
        )
        if accelerator.is_main_process:
            print(
                f"[train] on-policy student engine: vLLM in this process, "
                f"{'bfloat16' if bf16 else 'float32'}, weights pushed every "
                f"{op.sync_every} step(s){' (LoRA merged)' if hasattr(lm, 'peft_config') else ''}",
                flush=True,
            )
    source = OnPolicyBatches(
        shards,
        client,
        op,
        student=lambda: accelerator.unwrap_model(module).lm,
        tokenizer=tokenizer,
        seed=cfg.seed,
        grad_accum=cfg.grad_accum,
        max_length=cfg.data.max_length,
        device=accelerator.device,
        writer=writer,
        engine=engine,
        crosstok=crosstok,
    )
    if op.env_config:
        from train.onpolicy_env import live_episodes  # the game engine only when asked

        source.episodes = live_episodes(cfg, tokenizer, source.complete, client, accelerator)
    return source

"""One precompute run: validate, split, skip what is done, run the teacher, commit shards.

Order matters for cost: everything that can refuse (config, tokenizer fingerprints, input
rows, prompt lengths, an existing folder made with other settings) is checked before the
teacher is loaded, and nothing is loaded at all when every example is already done.

Engine windows and commits: the engine gets `engine_window` examples per call (vLLM batches
best with many prompts at once; LLM.generate returns only at the end of a call), and their
rows are then committed every `commit_every` examples. Resume: at each commit the writer closes
a file and lists it in its manifest (the commit point). A run killed at any moment loses no
committed row, and at most one window of teacher work; the next run skips the examples of
committed files (`ShardWriter.completed_ids`) and never rewrites them. Commits are written
at a fast zstd level (COMMIT_LEVEL); at its end a run merges its own files into files of up
to 64 MiB at the writer's level, in one more commit (`ShardWriter.compact`): fewer bytes per
token, same rows.

Data parallelism: worker I of N takes the examples whose id hashes to I mod N and writes as
writer `w{I}` into the shared folder, committing in its own manifest; readers merge them.
`run` is one worker; precompute/jobs.py starts all of them (local processes, or Ray tasks).

A named student whose tokenizer differs from the teacher's gets teacher-vocabulary shards:
the teacher's ids plus what aligning them with the student's tokenizer at load needs
(precompute/teacher_vocab.py, docs/cross-tokenizer.md "What the shards keep").

The run's config and its rejected input rows are committed like shards, by the writer and
append-only (precompute_config-w{I}-<n>.yaml when the config changed, rejects-w{I}-<n>.jsonl
with the rows no earlier run rejected), so a refused or resumed run loses no earlier record.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from crosstok.folder import VOCABULARY_KEY
from crosstok.tokens import CrossTokError
from datafiles.reading import BadField
from precompute.backend import Backend
from precompute.config import ConfigError, PrecomputeConfig, content_dict
from precompute.inputs import (
    Example,
    InputError,
    Reject,
    data_fingerprint,
    raw_rows,
    raw_text_of,
    read_examples,
    rejects_jsonl,
)
from precompute.model_limits import ModelLimits, model_context, resolve_limits
from precompute.teacher_vocab import (
    META_KEY,
    TeacherVocab,
    commit_tokenizer,
    conversation_crosstok,
    row_meta,
    teacher_vocab,
    token_bytes,
)
from precompute.views import Views, make_views
from runtime.progress import progress as progress_bar
from runtime.seeds import derive_seed
from shards.fingerprint import tokenizer_fingerprint, weights_fingerprint
from shards.manifest import load_manifest, read_extra
from shards.schema import ShardMetadata
from shards.writer import ShardRow, ShardWriter

CONFIG_KIND = "precompute_config"  # committed as precompute_config-w<I>-<n>.yaml
REJECTS_KIND = "rejects"  # committed as rejects-w<I>-<n>.jsonl
# The field of a rejected sample (teacher-vocabulary shards: its tokens do not spell its
# text), "response (sample J)": the example counts as done on resume.
AFTER_TEACHER = "response (sample"
# Tags that go to the metadata's top level, under a rollout's keys (metadata_for).
EPISODE_KEYS = ("env", "experience")
# zstd level of the files committed during a run: faster than the writer's 12 for a few
# percent more bytes, which the merge at the end of the run takes back (figures in
# BENCHMARKS.md, "Precompute host path").
COMMIT_LEVEL = 3
# engine_window=0 with vLLM: examples per engine call. Large enough that the engine's batch
# stays full between calls (vLLM's max_num_seqs is 256 to 1024), small enough that one call's
# top-k (k=64: 512 bytes per token) stays in memory: 4096 responses of 1k tokens, 2 GiB.
VLLM_WINDOW = 4096


class TokenizerMismatch(ValueError):
    pass


def check_required(cfg: PrecomputeConfig) -> None:
    """The settings no default can stand for (the config names no model or data)."""
    needed = [("teacher", "--teacher DIR", cfg.teacher)]
    if cfg.mode != "rollout":  # a rollout's input is its environment (the `env` section)
        needed.append(("data.path", "--data FILE", cfg.data.path))
    for key, flag, value in needed:
        if not value:
            raise ConfigError(f"{key} is not set: {flag} or {key}=...")


def check_model_folder(role: str, path: str) -> None:
    """A local model folder, before transformers would take a missing path for a hub id
    ("Repo id must be in the form ...") and try to download it."""
    if not Path(path).is_dir():
        raise ConfigError(
            f"{role}={path}: {'not a folder' if Path(path).exists() else 'no such folder'}; "
            "precompute reads a local model folder and downloads nothing (fetch the model "
            "first, e.g. `huggingface-cli download REPO --local-dir DIR`)"
        )
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{role}={path}: no config.json, not a Hugging Face model folder")


@dataclass
class Summary:
    examples: int = 0  # examples written by this run
    skipped_done: int = 0  # examples already committed by an earlier run
    rows: int = 0
    tokens: int = 0
    files: int = 0
    bytes: int = 0
    rejects: int = 0
    retokenize_mismatches: int = 0
    cut: int = 0  # generate: responses cut at max_tokens (or the context), finish_reason "length"
    teacher_vocabulary: bool = False  # the student's tokenizer differs: teacher-vocabulary shards
    max_tokens: int = 0  # generate: the response limit the run used (0: score mode)
    wall_s: float = 0.0
    engine_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def text(self) -> str:
        tps = self.tokens / self.engine_s if self.engine_s else 0.0
        cut = f" ({self.cut} cut at max_tokens={self.max_tokens})" if self.max_tokens else ""
        vocab = (
            ", teacher-vocabulary shards (the student's tokenizer differs: training will align "
            "them)"
            if self.teacher_vocabulary
            else ""
        )
        return (
            f"precompute: {self.examples} examples ({self.skipped_done} already done), "
            f"{self.rows} rows{cut}, {self.tokens} tokens, {self.files} files, "
            f"{self.bytes_per_token:.1f} bytes/token, {self.rejects} rejected rows, "
            f"{self.retokenize_mismatches} re-tokenization mismatches, "
            f"teacher {tps:.0f} tokens/s, wall {self.wall_s:.1f} s{vocab}"
        )


def worker_of(example_id: str, num_workers: int) -> int:
    """Deterministic split by id: independent of input order and of the other workers."""
    h = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(h[:8], "little") % num_workers


def load_tokenizer(path: str):
    # transformers loads torch: a spawned worker imports this module before it sets its
    # devices (precompute/jobs.py), so torch may only load once a worker runs.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' several-line explanations
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"{path}: cannot load its tokenizer: {first.strip()}") from e


def check_tokenizers(cfg: PrecomputeConfig, tokenizer) -> tuple[str, TeacherVocab | None]:
    """The teacher's fingerprint, and for a named student whose tokenizer differs the
    teacher-vocabulary setup (precompute/teacher_vocab.py): such a student is trained by
    aligning the two tokenizations at load, so the shards keep what that needs. Without a
    named student the shards are ordinary, with the teacher's fingerprint. Refuses a
    teacher tokenizer whose tokens' bytes cannot be read (one line)."""
    fp = tokenizer_fingerprint(tokenizer)
    if not cfg.student:
        return fp, None
    sfp = tokenizer_fingerprint(load_tokenizer(cfg.student))
    if sfp == fp:
        return fp, None
    try:
        return fp, teacher_vocab(cfg.teacher, tokenizer, fp, sfp)
    except CrossTokError as e:
        raise TokenizerMismatch(
            f"tokenizer of student {cfg.student} ({sfp[:19]}...) differs from teacher "
            f"{cfg.teacher}'s ({fp[:19]}...), and teacher-vocabulary shards cannot be made: {e}"
        ) from None


def model_vocab_size(path: str) -> int:
    """The logit dimension from config.json (may exceed the tokenizer: padded vocabularies)."""
    from transformers import AutoConfig  # loads torch: see load_tokenizer

    conf = AutoConfig.from_pretrained(path)
    conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    return int(conf.vocab_size)


def response_ids(tokenizer, text: str, append_eos: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("score.append_eos: the tokenizer has no eos token")
        ids.append(int(tokenizer.eos_token_id))
    return ids


def retokenizes(tokenizer, ids) -> bool:
    """Does decode-then-encode give the same ids? Only then is the text an exact record
    of what the student trains on; either way the stored ids are the teacher's, which are
    what its logprobs refer to."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids


def started_backend(cfg: PrecomputeConfig, backend: Backend | None, vocab_size: int, log):
    """`backend` (a caller's started engine) or a new one for cfg, checked against the
    config's k and the teacher's logit dimension."""
    if backend is None:
        log(f"precompute: loading teacher {cfg.teacher} ({cfg.backend})")
        backend = make_backend(cfg)
    if backend.k != cfg.k:
        raise ValueError(f"the engine was started for k={backend.k}, config k={cfg.k}")
    if backend.vocab_size != vocab_size:
        raise ValueError(
            f"engine logit dimension {backend.vocab_size} != config vocab {vocab_size}"
        )
    return backend


def make_backend(cfg: PrecomputeConfig) -> Backend:
    if cfg.backend == "vllm":
        from vllm_engine.teacher import VLLMBackend

        engine = {"seed": cfg.sampling.seed, **cfg.engine}
        return VLLMBackend(cfg.teacher, cfg.k, engine, cfg.sampling.per_request_seed)
    from precompute.hf_backend import HFBackend  # loads torch: see load_tokenizer

    return HFBackend(cfg.teacher, cfg.k, cfg.hf.dtype, cfg.hf.device, cfg.hf.batch_size)


def metadata_for(
    cfg: PrecomputeConfig, tok_fp: str, vocab_size: int, vocab: TeacherVocab | None = None
) -> ShardMetadata:
    sampling = (
        asdict(cfg.sampling) if cfg.mode == "generate" else {"append_eos": cfg.score.append_eos}
    )
    extra = content_dict(cfg)
    # How the engine runs is not what the shards contain: a resume may use another
    # tensor-parallel size or batch size. The weights' dtype is, so it stays.
    extra.pop("engine"), extra.pop("hf"), extra.pop("backend")
    # Paths differ between machines and spellings; the fingerprints identify the input data,
    # the teacher's weights and the (student's = teacher's) tokenizer.
    extra["data"].pop("path"), extra.pop("teacher"), extra.pop("student")
    if teacher_path := extra["data"].pop("teacher_path"):
        # Left out when empty, so that folders made before two-file inputs keep resuming.
        extra["data"]["teacher_data_fingerprint"] = data_fingerprint(teacher_path)
    extra["teacher_dtype"] = teacher_dtype(cfg)
    tags = extra.pop("tags")
    # Scored episodes (tools/onpolicy/rounds.py passes tags.env and tags.experience) say
    # which game and experience under the keys of a rollout's metadata (extra["env"],
    # extra["experience"]), so that one reader finds both kinds of episode folder.
    episodes = {key: tags.pop(key) for key in EPISODE_KEYS if key in tags}
    vocabulary = {} if vocab is None else {VOCABULARY_KEY: vocab.metadata}
    return teacher_metadata(
        cfg,
        tok_fp,
        vocab_size,
        sampling={"mode": cfg.mode, **sampling},
        data_fp=data_fingerprint(cfg.data.path),
        extra={"precompute": extra, **episodes, **({"tags": tags} if tags else {}), **vocabulary},
    )


def teacher_dtype(cfg: PrecomputeConfig) -> str:
    """The dtype the teacher's weights ran in: part of what the shards contain."""
    return str(cfg.engine.get("dtype", "auto")) if cfg.backend == "vllm" else cfg.hf.dtype


def teacher_metadata(
    cfg: PrecomputeConfig, tok_fp: str, vocab_size: int, *, sampling: dict, data_fp: str, extra
) -> ShardMetadata:
    """The shard metadata of a run of this teacher (score, generate and rollout modes alike):
    the mode's sampling, data fingerprint and extra are the caller's."""
    return ShardMetadata(
        k=cfg.k,
        vocab_size=vocab_size,
        teacher=Path(cfg.teacher).name,
        teacher_fingerprint=weights_fingerprint(cfg.teacher),
        tokenizer_fingerprint=tok_fp,
        logprobs_mode="raw_logprobs",
        sampling=sampling,
        data_fingerprint=data_fp,
        extra=extra,
    )


def prepare(
    cfg: PrecomputeConfig, tokenizer, max_len: int | None, vocab: TeacherVocab | None = None
):
    """Read, validate and split the input and render both views of this worker's examples;
    with `vocab` (teacher-vocabulary shards) also what those rows need (`teacher_row_problem`).
    Returns ([(example, views)], this worker's rejects)."""
    examples, rejects, total = read_examples(cfg.data, cfg.mode)
    # num_workers 0 (auto) / worker_index -1 (every worker) reach here only for one worker.
    n, i = max(cfg.num_workers, 1), max(cfg.worker_index, 0)
    # Rejected rows have no trustworthy id: split them by row index instead.
    rejects = [r for r in rejects if r.index % n == i]
    work, bad = [], []
    # Score mode renders a conversation row whole with its spans (unless the response is
    # given as token ids: the single-turn path, prompt + those ids).
    spans = cfg.mode == "score" and not cfg.score.response_ids_field
    for ex in examples:
        if worker_of(ex.id, n) != i:
            continue
        try:
            views = make_views(tokenizer, ex, cfg.view, cfg.sampling.seed, spans)
        except BadField as b:
            bad.append((ex, b.field, b.reason))
            continue
        if vocab is not None and (problem := teacher_row_problem(cfg, tokenizer, vocab, ex, views)):
            bad.append((ex, *problem))
            continue
        if max_len is not None:
            need = len(generator_prompt(cfg, views)) + (
                scored_length(cfg, tokenizer, ex, views) if cfg.mode == "score" else 1
            )
            if need > max_len:
                why = f"teacher view needs {need} tokens, max_model_len is {max_len}"
                bad.append((ex, ex.prompt_field, why))
                continue
        work.append((ex, views))
    raws = raw_text_of(cfg.data, [ex.index for ex, _, _ in bad])
    rejects += [Reject.of(ex.index, ex.where, field, why, raws[ex.index]) for ex, field, why in bad]
    if rejects and not cfg.skip_invalid:
        raise InputError(sorted(rejects, key=lambda r: r.index), total)
    return work, rejects


def teacher_row_problem(
    cfg: PrecomputeConfig, tokenizer, vocab: TeacherVocab, ex: Example, views: Views
) -> tuple[str, str] | None:
    """(field, reason) when `ex` cannot be a row of teacher-vocabulary shards, before any
    teacher time: a conversation's trained turn whose tokens spell no text (an end-of-turn
    marker followed by more of the template, say), or in score mode a response text that
    does not round-trip through the teacher's tokenizer."""
    if views.conversation is not None:
        try:
            _conversation_crosstok(cfg, tokenizer, vocab, ex, views)
        except CrossTokError as e:
            return ex.prompt_field, str(e)
        return None
    if cfg.mode == "score" and views.conversation is None and not cfg.score.response_ids_field:
        try:
            ids = response_ids(tokenizer, ex.response, cfg.score.append_eos)
            token_bytes(vocab.table, ids, ex.response)
        except CrossTokError as e:
            return cfg.data.response_field or "response", str(e)
    return None


def scored_length(cfg: PrecomputeConfig, tokenizer, ex: Example, views: Views) -> int:
    """Score mode: the tokens after the teacher's prompt (a conversation's, from its first
    span through its last)."""
    if views.conversation is not None:
        return len(views.conversation.teacher_response_ids)
    return len(response_ids(tokenizer, ex.response, cfg.score.append_eos))


def generator_prompt(cfg: PrecomputeConfig, views: Views) -> list[int]:
    """What the model sees: the teacher view, or in generate mode with generator_view=student
    the student's (a student sampling its own responses)."""
    student = cfg.mode == "generate" and cfg.generator_view == "student"
    return views.prompt_ids if student else views.teacher_prompt_ids


def row_source(cfg: PrecomputeConfig) -> str:
    if cfg.source != "auto":
        return cfg.source
    return "teacher" if cfg.mode in ("generate", "rollout") else "dataset"


def given_response_ids(cfg: PrecomputeConfig, indices: set[int], vocab_size: int) -> dict:
    """Score mode with score.response_ids_field: the token ids of rows `indices`, by index."""
    name, out = cfg.score.response_ids_field, {}
    for index, (where, row, _) in enumerate(raw_rows(Path(cfg.data.path), cfg.data.split)):
        if index not in indices:
            continue
        ids = row.get(name)
        ok = isinstance(ids, list) and ids and all(type(i) is int for i in ids)
        if not ok or not all(0 <= i < vocab_size for i in ids):
            raise ValueError(
                f"{where}, field {name!r}: expected a non-empty list of token ids in "
                f"[0, {vocab_size}), got {str(ids)[:80]}"
            )
        out[index] = ids
    return out


def _conversation_row(cfg: PrecomputeConfig, ex: Example, views: Views, s, meta) -> ShardRow:
    """A conversation's row: the teacher's top-k kept at the span tokens only, gathered
    from the teacher's coordinates (its prompt has another length) in span order."""
    conv = views.conversation
    at = np.concatenate(
        [np.arange(o, o + n) for o, (_, n) in zip(conv.teacher_offsets, conv.spans, strict=True)]
    )
    conversation = np.asarray(views.prompt_ids + conv.response_ids)
    trained = np.concatenate([conversation[a : a + n] for a, n in conv.spans])
    if not np.array_equal(np.asarray(s.token_ids)[at], trained):
        raise RuntimeError(f"example {ex.id!r}: the teacher scored other tokens than the spans")
    meta.update(turns=len(ex.conversation), trained_turns=len(conv.spans))
    return ShardRow(
        id=ex.id,
        prompt_ids=views.prompt_ids,
        teacher_prompt_ids=views.teacher_prompt_ids,
        response_ids=conv.response_ids,
        topk_ids=np.asarray(s.topk_ids)[at],
        topk_logprobs=np.asarray(s.topk_logprobs)[at],
        token_logprobs=None if s.token_logprobs is None else np.asarray(s.token_logprobs)[at],
        source=row_source(cfg),
        thinking=views.thinking,
        meta=meta,
        sample_index=ex.sample_index,
        spans=conv.spans,
        turns=conv.turns,
    )


def _rows_for(
    cfg: PrecomputeConfig,
    tokenizer,
    ex: Example,
    views: Views,
    samples,
    summary: Summary,
    vocab: TeacherVocab | None = None,
    rejected: list | None = None,
) -> list[ShardRow]:
    """The rows of one example's samples. With `vocab` (teacher-vocabulary shards) each row
    also gets meta["crosstok"]; a sample whose tokens do not spell its text is left out and
    (example, field, reason) appended to `rejected`."""
    rows = []
    for j, s in enumerate(samples):
        meta = {"index": ex.index, **(ex.meta or {})}
        if ex.answer is not None:
            meta["answer"] = ex.answer
        if vocab is not None:
            try:
                meta[META_KEY] = _crosstok_meta(cfg, tokenizer, vocab, ex, views, s.token_ids)
            except CrossTokError as e:
                rejected.append((ex, f"{AFTER_TEACHER} {j})", str(e)))
                continue
        if views.conversation is not None:
            rows.append(_conversation_row(cfg, ex, views, s, meta))
            continue
        if s.finish_reason is not None:
            meta["finish_reason"] = s.finish_reason
            summary.cut += s.finish_reason == "length"
        if cfg.mode == "generate" and not retokenizes(tokenizer, s.token_ids):
            summary.retokenize_mismatches += 1
            meta["retokenize_mismatch"] = True
        rows.append(
            ShardRow(
                id=ex.id,
                prompt_ids=views.prompt_ids,
                teacher_prompt_ids=views.teacher_prompt_ids,
                response_ids=s.token_ids,
                topk_ids=s.topk_ids,
                topk_logprobs=s.topk_logprobs,
                token_logprobs=s.token_logprobs,
                sample_index=ex.sample_index + j,  # a given sample_index: score mode, j = 0
                source=row_source(cfg),
                thinking=views.thinking,
                meta=meta,
            )
        )
    return rows


def _crosstok_meta(
    cfg: PrecomputeConfig, tokenizer, vocab: TeacherVocab, ex: Example, views: Views, ids
):
    """meta["crosstok"] of a sample with teacher-forced or generated tokens `ids`: score mode
    keeps the given response text (checked to round-trip in `prepare`, checked again here);
    generated tokens and a conversation's trained turns give the text they spell."""
    if views.conversation is not None:
        return _conversation_crosstok(cfg, tokenizer, vocab, ex, views)
    text = ex.response if cfg.mode == "score" and not cfg.score.response_ids_field else None
    return row_meta(vocab.table, ex.messages, views.thinking, ids, text)


def _conversation_crosstok(cfg: PrecomputeConfig, tokenizer, vocab: TeacherVocab, ex, views):
    """A conversation row's meta["crosstok"] (teacher_vocab.conversation_crosstok), rendered
    with the views' template arguments."""
    kwargs = dict(cfg.view.chat_template_kwargs)
    if views.thinking is not None:
        kwargs["enable_thinking"] = views.thinking
    conv = views.conversation
    return conversation_crosstok(
        vocab.table,
        tokenizer,
        ex.conversation,
        ex.trained,
        kwargs,
        views.thinking,
        views.prompt_ids + conv.response_ids,
        conv.spans,
    )


def run(
    cfg: PrecomputeConfig,
    backend: Backend | None = None,
    log=None,
    progress: Callable[[Summary, int], None] | None = None,
) -> Summary:
    """Run worker `cfg.worker_index` of `cfg.num_workers` (-1 with at most one worker: the
    only one); `backend` reuses a started engine (tests, benchmarks). `progress(summary,
    todo)` is called once the examples left to do are known, then after every commit."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.worker_index < 0:
        if cfg.num_workers > 1:
            raise ValueError(
                f"num_workers={cfg.num_workers}: run() is one worker; set worker_index or "
                "start them all with precompute.jobs.run_job"
            )
        cfg = replace(cfg, num_workers=1, worker_index=0)
    if cfg.mode == "rollout":  # its input is an environment, not a data file
        raise ValueError("mode=rollout: run it with precompute.rollout.run_rollout (run_job does)")
    t0 = time.time()
    summary = Summary()
    out = cfg.out  # a folder or an fsspec URL (s3://...): the writer makes it
    check_required(cfg)
    check_model_folder("teacher", cfg.teacher)
    if cfg.student:
        check_model_folder("student", cfg.student)
    tokenizer, tok_fp, vocab, vocab_size = teacher_tokenizer(cfg)
    summary.teacher_vocabulary = vocab is not None
    cfg, limits = with_model_limits(cfg)
    if limits is not None:
        summary.max_tokens = limits.max_tokens
        if cfg.worker_index == 0:
            log(f"precompute: {limits.text()}")
    # The prompt-length check: vLLM refuses a prompt that fills its context; transformers
    # has no such limit here (as before).
    max_len = limits_context(cfg, limits) if cfg.backend == "vllm" else None
    work, rejects = prepare(cfg, tokenizer, max_len, vocab)
    summary.rejects = len(rejects)
    metadata = metadata_for(cfg, tok_fp, vocab_size, vocab)
    # The writer refuses a folder made with other settings before anything is written to it.
    # 64 MiB files at most between commits; commit_every usually closes them first.
    with ShardWriter(
        out,
        metadata,
        writer_id=f"w{cfg.worker_index}",
        target_file_bytes=64 << 20,
        # Commits at a fast zstd level while the teacher runs; the merge at the end of the run
        # (writer.compact below) writes at the writer's own level (12).
        commit_level=COMMIT_LEVEL,
    ) as writer:
        if vocab is not None:
            # Before any row: every row of the folder can be decoded by what it carries.
            commit_tokenizer(writer, vocab)
            if cfg.worker_index == 0:
                log(
                    f"precompute: student {cfg.student}'s tokenizer differs from the teacher's: "
                    "writing teacher-vocabulary shards (training will align them)"
                )
        done = writer.completed_ids()
        if vocab is not None:
            samples = cfg.sampling.n if cfg.mode == "generate" else 1
            done |= rejected_examples(writer.folder, work, samples)
        todo = [(ex, v) for ex, v in work if ex.id not in done]
        commit_records(writer, cfg, rejects, log, config=bool(todo))
        summary.skipped_done = len(work) - len(todo)
        if summary.skipped_done:
            log(f"precompute: resuming, {summary.skipped_done} of {len(work)} examples done")
        if progress is not None:
            progress(summary, len(todo))
        if todo:
            own_backend = backend is None
            backend = started_backend(cfg, backend, vocab_size, log)
            try:
                given = (
                    given_response_ids(cfg, {ex.index for ex, _ in todo}, vocab_size)
                    if cfg.mode == "score" and cfg.score.response_ids_field
                    else None
                )
                _loop(cfg, tokenizer, backend, writer, todo, summary, given, progress, vocab, log)
            finally:
                if own_backend:
                    backend.close()
            # Commits every commit_every examples make small files (resume granularity); one
            # file per run costs fewer bytes per token (one rank order, longer zstd streams).
            writer.compact(only={f.name for f in writer.files_written})
    _count_files(writer, summary)
    summary.wall_s = time.time() - t0
    log(summary.text())
    return summary


def teacher_tokenizer(cfg: PrecomputeConfig):
    """The teacher's tokenizer, its fingerprint, the teacher-vocabulary setup when a named
    student's tokenizer differs (check_tokenizers) and the model's logit dimension; refuses a
    k the vocabulary cannot give."""
    tokenizer = load_tokenizer(cfg.teacher)
    tok_fp, vocab = check_tokenizers(cfg, tokenizer)
    vocab_size = model_vocab_size(cfg.teacher)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{cfg.teacher}: tokenizer has {len(tokenizer)} tokens, the model's logits only "
            f"{vocab_size}"
        )
    if cfg.k > vocab_size:
        raise ConfigError(f"k={cfg.k} is above the teacher's vocabulary size ({vocab_size})")
    return tokenizer, tok_fp, vocab, vocab_size


def with_model_limits(cfg: PrecomputeConfig) -> tuple[PrecomputeConfig, ModelLimits | None]:
    """Generate mode: the config with its response limit resolved (sampling.max_tokens=0
    takes the model's, precompute/model_limits.py), so the shards' metadata and the committed
    config record the value used, and the limits; score mode: the config as is, None."""
    if cfg.mode != "generate":
        return cfg, None
    limits = resolve_limits(cfg.teacher, cfg.engine.get("max_model_len"), cfg.sampling.max_tokens)
    return replace(cfg, sampling=replace(cfg.sampling, max_tokens=limits.max_tokens)), limits


def limits_context(cfg: PrecomputeConfig, limits: ModelLimits | None) -> int | None:
    if limits is not None:
        return limits.context
    return cfg.engine.get("max_model_len") or model_context(cfg.teacher)


def engine_window(cfg: PrecomputeConfig) -> int:
    """Examples per engine call: engine_window, else (0) VLLM_WINDOW with vLLM and
    commit_every with transformers (which runs hf.batch_size prompts at a time whatever it
    gets: a larger window would only delay the commits). Never below commit_every."""
    window = cfg.engine_window or (VLLM_WINDOW if cfg.backend == "vllm" else cfg.commit_every)
    return max(window, cfg.commit_every)


def commit_records(
    writer: ShardWriter, cfg: PrecomputeConfig, rejects, log, config: bool = True
) -> None:
    """Commit the run's config (when `config`, the run has examples to do, and it differs
    from this writer's last) and the rejected rows that no earlier run of the folder
    committed. A run over a finished folder thus writes nothing."""
    text = yaml.safe_dump(asdict(cfg), sort_keys=False).encode()
    last = writer.extras(CONFIG_KIND)
    if config and (not last or last[-1].sha256 != hashlib.sha256(text).hexdigest()):
        writer.add_extra(CONFIG_KIND, text, ".yaml")
    if not rejects:
        return
    entry = commit_rejects(writer, rejects)
    where = f"listed in {writer.store.where(entry.name)}" if entry else "listed by an earlier run"
    log(f"precompute: {len(rejects)} invalid row(s) skipped, {where}")


def rejected_examples(folder, work, samples: int) -> set[str]:
    """The ids of the examples of `work` all of whose `samples` samples a run of `folder`
    rejected after the teacher ran: done like those with rows, so a resumed run neither
    redoes nor re-rejects them. An example with a sample rejected and another not is done
    once its rows are committed (its rejects are committed before them)."""
    fields: dict[str, set] = {}
    for e in load_manifest(folder).extras:
        if e.kind == REJECTS_KIND:
            for line in read_extra(folder, e).splitlines():
                rec = json.loads(line)
                if str(rec.get("field", "")).startswith(AFTER_TEACHER):
                    fields.setdefault(rec["where"], set()).add(rec["field"])
    return {ex.id for ex, _ in work if len(fields.get(str(ex.where), ())) >= samples}


def commit_rejects(writer: ShardWriter, rejects: list[Reject]):
    """Commit the rejected rows that no earlier run of the folder committed, as one
    append-only rejects file of this writer; returns its entry, or None."""
    earlier = set()
    for e in load_manifest(writer.folder).extras:
        if e.kind == REJECTS_KIND:
            earlier.update(read_extra(writer.folder, e).splitlines())
    new = [line for line in rejects_jsonl(rejects) if line not in earlier]
    if not new:
        return None
    return writer.add_extra(REJECTS_KIND, b"\n".join(new) + b"\n", ".jsonl")


def _count_files(writer: ShardWriter, summary: Summary) -> None:
    summary.files = len(writer.files_written)
    summary.bytes = sum(entry.bytes for entry in writer.files_written)


def _loop(
    cfg,
    tokenizer,
    backend: Backend,
    writer: ShardWriter,
    todo,
    summary: Summary,
    given=None,
    progress=None,
    vocab: TeacherVocab | None = None,
    log=None,
) -> None:
    bar = progress_bar(len(todo), "precompute", "ex", disable=not cfg.progress, file=sys.stderr)
    window = engine_window(cfg)
    try:
        for w in range(0, len(todo), window):
            part = todo[w : w + window]
            t = time.time()
            results = _engine_call(cfg, tokenizer, backend, part, given)
            summary.engine_s += time.time() - t
            # The window's rows, committed every commit_every examples as before: a kill
            # during these commits leaves whole committed chunks, which the next run skips.
            for b in range(0, len(part), cfg.commit_every):
                chunk = part[b : b + cfg.commit_every]
                rejected, built = [], []
                for (ex, views), samples in zip(chunk, results[b : b + len(chunk)], strict=True):
                    rows = _rows_for(cfg, tokenizer, ex, views, samples, summary, vocab, rejected)
                    for r in rows:
                        if np.asarray(r.response_ids).size == 0:
                            raise RuntimeError(f"example {ex.id!r}: the teacher returned no tokens")
                    built.append(rows)
                if rejected:
                    # Before the chunk's rows: a kill in between redoes the examples, and the
                    # rejects file takes each line once.
                    _commit_row_rejects(writer, cfg, rejected, summary, log or print)
                for rows in built:
                    writer.add(rows)
                    summary.examples += 1
                    summary.rows += len(rows)
                    # Trained tokens (a conversation's context tokens carry no top-k).
                    summary.tokens += sum(len(r.topk_ids) for r in rows)
                writer.flush()  # the commit point: a crash after this loses nothing of the chunk
                if progress is not None:
                    _count_files(writer, summary)
                    progress(summary, len(todo))
                bar.update(len(chunk))
                tps = summary.tokens / summary.engine_s if summary.engine_s else 0.0
                ex_s = summary.examples / summary.engine_s if summary.engine_s else 0.0
                bar.set_postfix(tok_s=f"{tps:.0f}", ex_s=f"{ex_s:.2f}")
    finally:
        bar.close()


def _commit_row_rejects(writer: ShardWriter, cfg: PrecomputeConfig, rejected, summary, log):
    """Commit rows rejected after the teacher ran ([(example, field, reason)]) like the input's
    rejects; the run goes on (the teacher's output, not the input, was at fault)."""
    raws = raw_text_of(cfg.data, [ex.index for ex, _, _ in rejected])
    rejects = [Reject.of(ex.index, ex.where, f, why, raws[ex.index]) for ex, f, why in rejected]
    summary.rejects += len(rejects)
    entry = commit_rejects(writer, rejects)
    where = f"listed in {writer.store.where(entry.name)}" if entry else "listed by an earlier run"
    for r in rejects:
        log(f"precompute: rejected {r.message()}")
    log(f"precompute: {len(rejects)} row(s) rejected, {where}")


def _engine_call(cfg, tokenizer, backend: Backend, part, given) -> list[list]:
    """One engine call over `part` [(example, views)]: per example its samples."""
    prompts = [generator_prompt(cfg, v) for _, v in part]
    if cfg.mode == "generate":
        seeds = [derive_seed(cfg.sampling.seed, "sample", ex.index) for ex, _ in part]
        return backend.generate(prompts, seeds, cfg.sampling)
    return [
        [s] for s in backend.score(prompts, [scored_ids(cfg, tokenizer, *p, given) for p in part])
    ]


def scored_ids(cfg: PrecomputeConfig, tokenizer, ex: Example, views: Views, given) -> list[int]:
    """Score mode: the tokens teacher-forced after the teacher's prompt."""
    if views.conversation is not None:
        return views.conversation.teacher_response_ids  # one pass over the whole conversation
    eos = [tokenizer.eos_token_id] if cfg.score.append_eos else []
    if given is not None:
        return given[ex.index] + eos
    return response_ids(tokenizer, ex.response, cfg.score.append_eos)

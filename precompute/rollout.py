"""precompute `mode: rollout`: the teacher plays the configured episodes; each finished episode
becomes one conversation row.

The teacher plays in its own view (envs.prompt with the experience in the system message),
sampled with the precompute backend's `generate` (cfg.sampling: temperature, top_p, seed;
rollout.max_tokens per reply) through an envs.policy.ChatPolicy, so each request is seeded
from (seed, game, params, fold, episode seed, sample, step). A finished episode is rebuilt as
two conversations (envs.prompt.episode_messages: the student view without the experience, the
teacher view with it), rendered and span-checked by the conversation machinery of score mode
(precompute/views.py), and scored in the teacher view by one teacher-forced pass over the
whole conversation: every action is a trained span with the teacher's top-k. Row: id =
Episode.id, sample_index = the episode's sample, source "teacher", meta["episode"] =
Episode.record() (score, success, steps, the replies as written).

What is committed, exactly once: every `commit_every` finished episodes, first their rows (one
shard file, the writer's commit), then one `episodes-w0-<n>.jsonl` extra listing every episode
of the batch with its outcome and status: kept (a row), filtered (keep=success and it failed:
no row), rejected (its environment died twice, or its spans did not hold: no row, the reason
given). A resumed run skips every episode listed or with a row, so none is played twice, and
the counts come from the lists. A kill between the two commits leaves rows that no list
names: the next run lists them first (from their meta["episode"]), and replays the batch's
filtered or rejected episodes, which were not committed anywhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pyarrow.feather as feather

from crosstok.folder import VOCABULARY_KEY
from crosstok.tokens import CrossTokError
from datafiles.formats import Example
from datafiles.reading import BadField
from datafiles.views import render
from envs.base import Episode, Rejected, episode_id
from envs.config import env_record
from envs.experience import Experience, ExperienceError, load_experience
from envs.java import JavaNotFound
from envs.policy import ChatPolicy
from envs.prompt import episode_messages
from envs.runner import EnvPool, EpisodeKey, play
from precompute.backend import Backend
from precompute.config import ConfigError, PrecomputeConfig
from precompute.run import (
    COMMIT_LEVEL,
    Summary,
    _conversation_crosstok,
    _conversation_row,
    _count_files,
    check_model_folder,
    check_required,
    commit_records,
    limits_context,
    started_backend,
    teacher_dtype,
    teacher_metadata,
    teacher_tokenizer,
)
from precompute.teacher_vocab import META_KEY, TeacherVocab, commit_tokenizer
from precompute.views import _conversation_views, thinking_for
from runtime.progress import progress as progress_bar
from shards.manifest import load_manifest, read_extra
from shards.schema import ShardMetadata
from shards.writer import ShardWriter

EPISODES_KIND = "episodes"  # committed as episodes-w0-<n>.jsonl: every played episode
WRITER = "w0"  # rollouts run as one worker


@dataclass
class RolloutSummary(Summary):
    """Summary's row counts (examples = episodes played by this run) and the episodes'."""

    episodes: int = 0  # configured: seeds x rollout.n
    kept: int = 0  # this run: committed as rows
    filtered: int = 0  # this run: keep=success and unsolved
    rejected: int = 0  # this run: environment died twice, or spans did not hold
    successes: int = 0  # this run, among played and not rejected
    score_sum: float = 0.0
    steps_sum: int = 0
    keep: str = "all"
    folder: dict = field(default_factory=dict)  # status -> count over the whole folder

    def text(self) -> str:
        done = self.kept + self.filtered
        rate = self.successes / done if done else 0.0
        eps = self.examples / self.wall_s if self.wall_s else 0.0
        mean_score = self.score_sum / done if done else 0.0
        mean_steps = self.steps_sum / done if done else 0.0
        folder = ", ".join(f"{v} {k}" for k, v in sorted(self.folder.items()))
        return (
            f"precompute rollout: {self.examples} episodes played ({self.skipped_done} of "
            f"{self.episodes} already done): {self.kept} kept, {self.filtered} filtered "
            f"(keep={self.keep}), {self.rejected} rejected; success {self.successes}/{done} "
            f"({rate:.3f}), mean score {mean_score:.3f}, mean steps {mean_steps:.1f}; "
            f"{self.rows} rows, {self.tokens} trained tokens, {self.files} files; "
            f"folder: {folder or 'empty'}; {eps:.2f} episodes/s, teacher {self.engine_s:.1f} s, "
            f"wall {self.wall_s:.1f} s"
            + (
                ", teacher-vocabulary shards (the student's tokenizer differs: training will "
                "align them)"
                if self.teacher_vocabulary
                else ""
            )
        )


def rollout_metadata(
    cfg: PrecomputeConfig,
    tok_fp: str,
    vocab_size: int,
    experience: Experience | None,
    vocab: TeacherVocab | None = None,
) -> ShardMetadata:
    """What the rows mean: the teacher, its sampling, the game and the experience; a folder
    made with any other value of these is refused by the writer. The data fingerprint is the
    experience text's (the one input besides the game), empty without experience. With
    `vocab` (a student of another tokenizer) the folder holds teacher-vocabulary shards
    (precompute/teacher_vocab.py): extra["vocabulary"] says so."""
    s = cfg.sampling
    sampling = {
        "mode": "rollout",
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "seed": s.seed,
        "max_tokens": cfg.rollout.max_tokens,
    }
    precompute = {
        "mode": "rollout",
        "k": cfg.k,
        "keep": cfg.rollout.keep,
        "n": cfg.rollout.n,
        "view": {
            "chat_template_kwargs": cfg.view.chat_template_kwargs,
            "thinking": cfg.view.thinking,
        },
        "source": cfg.source,
        "teacher_dtype": teacher_dtype(cfg),
    }
    extra = {
        "precompute": precompute,
        "env": env_record(cfg.env),
        "experience": None if experience is None else experience.source,
        **({"tags": cfg.tags} if cfg.tags else {}),
        **({} if vocab is None else {VOCABULARY_KEY: vocab.metadata}),
    }
    text = "" if experience is None else experience.text
    return teacher_metadata(
        cfg,
        tok_fp,
        vocab_size,
        sampling=sampling,
        data_fp=hashlib.sha256(text.encode()).hexdigest() if text else "",
        extra=extra,
    )


def episode_line(ep: Episode, status: str, reason: str = "") -> dict:
    """An episode's entry in an episodes file."""
    out = {"id": ep.id, "status": status}
    out.update({k: getattr(ep, k) for k in ("game", "params", "fold", "seed", "sample")})
    out.update(score=ep.score, success=ep.success, steps=ep.steps, restarts=ep.restarts)
    if reason:
        out["reason"] = reason
    return out


def rejected_line(r: Rejected) -> dict:
    out = {"id": episode_id(r.game, r.params, r.fold, r.seed, r.sample), "status": "rejected"}
    out.update(game=r.game, params=r.params, fold=r.fold, seed=r.seed, sample=r.sample)
    out["reason"] = r.reason
    return out


def listed_episodes(folder) -> dict[str, dict]:
    """Every episode the folder's episodes files list (all writers), by id."""
    manifest = load_manifest(folder, missing_ok=True)
    out = {}
    for e in [] if manifest is None else manifest.extras:
        if e.kind == EPISODES_KIND:
            for line in read_extra(folder, e).splitlines():
                if line.strip():
                    rec = json.loads(line)
                    out[rec["id"]] = rec
    return out


def unlisted_rows(writer: ShardWriter, listed: dict) -> list[dict]:
    """Episodes whose rows were committed but whose list was not (a kill between the two
    commits): their entries, read back from the rows' meta["episode"]."""
    out = []
    for entry in load_manifest(writer.store).files:
        table = feather.read_table(writer.store.open_input(entry.name), columns=["id", "meta"])
        for rid, meta in zip(
            table.column("id").to_pylist(), table.column("meta").to_pylist(), strict=True
        ):
            if rid in listed:
                continue
            ep = json.loads(meta)["episode"]
            rec = {"id": rid, "status": "kept"}
            rec.update({k: ep[k] for k in ("game", "params", "fold", "seed", "sample")})
            rec.update({k: ep[k] for k in ("score", "success", "steps", "restarts")})
            out.append(rec)
    return out


def commit_episodes(writer: ShardWriter, lines: list[dict]) -> None:
    data = b"".join(json.dumps(rec, sort_keys=True).encode() + b"\n" for rec in lines)
    writer.add_extra(EPISODES_KIND, data, ".jsonl")


def folder_counts(listed: dict) -> dict:
    out: dict[str, int] = {}
    for rec in listed.values():
        out[rec["status"]] = out.get(rec["status"], 0) + 1
    return out


def load_rollout_experience(cfg: PrecomputeConfig) -> Experience | None:
    if not cfg.rollout.experience:
        return None
    try:
        return load_experience(cfg.rollout.experience)
    except ExperienceError as e:
        raise ConfigError(f"rollout.experience: {e}") from None


def episode_keys(pool: EnvPool, cfg: PrecomputeConfig) -> list[EpisodeKey]:
    """The configured episodes; starts the first environment, so a missing Java runtime or
    a parameter value the engine refuses is reported before the teacher loads."""
    try:
        env = pool.take()
    except JavaNotFound as e:
        raise ConfigError(f"env: {e}") from None
    except ValueError as e:  # the engine refuses a parameter value (envs/textworld.py)
        raise ConfigError(f"env: {e}") from None
    try:
        seeds = env.seeds()
    except ValueError as e:
        raise ConfigError(f"env.{e}") from None
    finally:
        pool.give(env)
    return [EpisodeKey(s, i) for s in seeds for i in range(cfg.rollout.n)]


class _Rows:
    """Finished episodes -> conversation rows: views, one score call per commit batch; with
    `vocab` (teacher-vocabulary shards) each row's meta["crosstok"] too."""

    def __init__(
        self,
        cfg: PrecomputeConfig,
        tokenizer,
        experience: Experience | None,
        vocab: TeacherVocab | None = None,
    ):
        self.cfg, self.tokenizer, self.vocab = cfg, tokenizer, vocab
        self.experience = None if experience is None else experience.text
        self.thinking = thinking_for(cfg.view, cfg.sampling.seed, 0)
        self.kwargs = dict(cfg.view.chat_template_kwargs)
        if self.thinking is not None:
            self.kwargs["enable_thinking"] = self.thinking

    def example(self, ep: Episode) -> Example:
        student = episode_messages(ep)
        teacher = episode_messages(ep, self.experience)
        trained = tuple(j for j, m in enumerate(student) if m["role"] == "assistant")
        return Example(
            index=0,
            id=ep.id,
            messages=tuple(student[:2]),
            experience="",  # already in the teacher conversation
            answer=None,
            response=None,
            where=None,
            prompt_field="episode",
            conversation=tuple(student),
            trained=trained,
            teacher_conversation=tuple(teacher),
        )

    def views(self, ep: Episode):
        """(example, views, its meta) of a finished episode; BadField when its spans do not
        hold, or (teacher-vocabulary shards) when a reply's tokens spell no text."""
        if ep.steps == 0:
            raise BadField("episode", "no actions")
        ex = self.example(ep)
        views = _conversation_views(
            self.tokenizer, ex, self.cfg.view, self.kwargs, "", self.thinking
        )
        meta = {"episode": ep.record()}
        if self.vocab is not None:
            try:
                meta[META_KEY] = _conversation_crosstok(
                    self.cfg, self.tokenizer, self.vocab, ex, views
                )
            except CrossTokError as e:
                raise BadField("episode", str(e)) from None
        return ex, views, meta

    def rows(self, backend: Backend, items) -> list:
        """items [(episode, example, views, meta)] -> one row each, scored in one call."""
        if not items:
            return []
        scored = backend.score(
            [v.teacher_prompt_ids for _, _, v, _ in items],
            [v.conversation.teacher_response_ids for _, _, v, _ in items],
        )
        rows = []
        for (ep, ex, views, meta), s in zip(items, scored, strict=True):
            row = _conversation_row(self.cfg, ex, views, s, meta)
            rows.append(replace(row, sample_index=ep.sample))
        return rows


def run_rollout(
    cfg: PrecomputeConfig,
    backend: Backend | None = None,
    log=None,
    progress: Callable[[Summary, int], None] | None = None,
    make_env=None,
) -> RolloutSummary:
    """Play, score and commit cfg's episodes (module docstring); `backend` reuses a started
    engine, `make_env(EnvConfig) -> Environment` replaces TextWorldExpress (tests)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    summary = RolloutSummary(keep=cfg.rollout.keep)
    check_required(cfg)
    check_model_folder("teacher", cfg.teacher)
    if cfg.student:
        check_model_folder("student", cfg.student)
    experience = load_rollout_experience(cfg)
    with EnvPool(cfg.env, make_env) as pool:
        keys = episode_keys(pool, cfg)
        summary.episodes = len(keys)
        tokenizer, tok_fp, vocab, vocab_size = teacher_tokenizer(cfg)
        summary.teacher_vocabulary = vocab is not None
        metadata = rollout_metadata(cfg, tok_fp, vocab_size, experience, vocab)
        with ShardWriter(
            cfg.out,
            metadata,
            writer_id=WRITER,
            target_file_bytes=64 << 20,
            commit_level=COMMIT_LEVEL,
        ) as writer:
            if vocab is not None:
                # Before any row: every row of the folder can be decoded by what it carries.
                commit_tokenizer(writer, vocab)
                log(
                    f"precompute rollout: student {cfg.student}'s tokenizer differs from the "
                    "teacher's: writing teacher-vocabulary shards (training will align them)"
                )
            listed = listed_episodes(writer.folder)
            if repair := unlisted_rows(writer, listed):
                commit_episodes(writer, repair)
                listed.update((r["id"], r) for r in repair)
                log(
                    f"precompute rollout: {len(repair)} committed episode(s) listed (a kill "
                    "came between their rows and their list)"
                )
            c = cfg.env
            todo = [
                k
                for k in keys
                if episode_id(c.game, c.game_params(), c.fold, k.seed, k.sample) not in listed
            ]
            summary.skipped_done = len(keys) - len(todo)
            commit_records(writer, cfg, [], log, config=bool(todo))
            if summary.skipped_done:
                log(
                    f"precompute rollout: resuming, {summary.skipped_done} of {len(keys)} "
                    "episodes done"
                )
            if progress is not None:
                progress(summary, len(todo))
            if todo:
                own_backend = backend is None
                backend = started_backend(cfg, backend, vocab_size, log)
                try:
                    _play(
                        cfg,
                        tokenizer,
                        vocab,
                        backend,
                        writer,
                        pool,
                        todo,
                        experience,
                        summary,
                        log,
                        progress,
                    )
                finally:
                    if own_backend:
                        backend.close()
                writer.compact(only={f.name for f in writer.files_written})
            summary.folder = folder_counts(listed_episodes(writer.folder))
    _count_files(writer, summary)
    summary.wall_s = time.time() - t0
    log(summary.text())
    return summary


def _play(cfg, tokenizer, vocab, backend, writer, pool, todo, experience, summary, log, progress):
    sampling = replace(cfg.sampling, n=1, max_tokens=cfg.rollout.max_tokens)
    # vLLM refuses a prompt that fills its context: say which setting to change instead.
    context = limits_context(cfg, None) if cfg.backend == "vllm" else None

    def complete(prompts: list[list[int]], seeds: list[int]) -> list[str]:
        longest = max(map(len, prompts))
        if context is not None and longest >= context:
            raise ConfigError(
                f"rollout: a prompt of {longest} tokens fills max_model_len={context}: raise "
                "engine.max_model_len or lower env.step_limit"
            )
        t = time.time()
        out = backend.generate(prompts, seeds, sampling)
        summary.engine_s += time.time() - t
        return [tokenizer.decode(s[0].token_ids, skip_special_tokens=True) for s in out]

    rows = _Rows(cfg, tokenizer, experience, vocab)
    # The teacher plays in the view it scores in: the same template and arguments.
    policy = ChatPolicy(
        cfg.env, lambda m: render(tokenizer, m, rows.kwargs), complete, cfg.sampling.seed
    )
    batch: list = []  # finished episodes (Episode) and rejected ones (Rejected), in order
    bar = progress_bar(len(todo), "rollout", "ep", disable=not cfg.progress, file=sys.stderr)

    def commit() -> None:
        """The batch's rows (one commit), then its episodes list (a second one)."""
        lines, items = [], []
        for ep in batch:
            if isinstance(ep, Rejected):
                lines.append(rejected_line(ep))
                summary.rejected += 1
                continue
            if cfg.rollout.keep == "success" and not ep.success:
                lines.append(episode_line(ep, "filtered"))
                summary.filtered += 1
                _outcome(summary, ep)
                continue
            try:
                ex, views, meta = rows.views(ep)
            except BadField as b:
                reason = f"{b.field}: {b.reason}"
                log(f"precompute rollout: rejected episode {ep.name}: {reason}")
                lines.append(episode_line(ep, "rejected", reason))
                summary.rejected += 1
                continue
            items.append((ep, ex, views, meta))
            lines.append(episode_line(ep, "kept"))
        t = time.time()
        made = rows.rows(backend, items)
        summary.engine_s += time.time() - t
        for (ep, *_), row in zip(items, made, strict=True):
            writer.add(row)
            summary.kept += 1
            summary.rows += 1
            summary.tokens += len(row.topk_ids)
            _outcome(summary, ep)
        writer.flush()  # commit 1: the rows
        if lines:
            commit_episodes(writer, lines)  # commit 2: what was played
        summary.examples += len(batch)
        bar.update(len(batch))
        batch.clear()
        if progress is not None:
            _count_files(writer, summary)
            progress(summary, len(todo))

    def finished(ep) -> None:
        batch.append(ep)
        if len(batch) >= cfg.commit_every:
            commit()

    try:
        play(
            cfg.env,
            policy,
            keys=todo,
            batch_size=cfg.rollout.batch_size,
            experience=None if experience is None else experience.text,
            pool=pool,
            on_episode=finished,
            on_reject=finished,
            policy_keys=True,
            log=log,
        )
        if batch:
            commit()
    finally:
        bar.close()


def _outcome(summary: RolloutSummary, ep: Episode) -> None:
    summary.successes += ep.success
    summary.score_sum += ep.score
    summary.steps_sum += ep.steps

"""Everything the training loop needs, built from the config: the pieces behind train/__main__."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, set_seed
from torch.utils.data import DataLoader

from crosstok.folder import VOCABULARY_KEY
from shards.errors import ShardError
from shards.fingerprint import tokenizer_fingerprint
from shards.reader import ShardFolder, ShardReader
from train.batches import Batch, BatchSource, ShardBatches
from train.config import ConfigError, TrainConfig
from train.crosstok_rows import crosstok_rows
from train.logger import tracker_names
from train.mixture import MixtureBatches
from train.model import DistillModule, load_student, mixed_precision
from train.onpolicy import build_onpolicy
from train.prompts import PromptBatches
from train.step import global_sum


@dataclass
class Run:
    accelerator: object
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    source: BatchSource
    tokenizer: object
    out_dir: Path
    deepspeed: bool
    cfg: TrainConfig

    def describe(self) -> str:
        acc = self.accelerator
        plugin = acc.state.deepspeed_plugin
        engine = f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin else str(acc.distributed_type)
        # ds_numel: under ZeRO-3 a parameter holds only its partition.
        trainable = sum(
            getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad
        )
        return (
            f"{acc.num_processes} process(es), {engine}, mixed precision "
            f"{acc.mixed_precision}, device {acc.device}, {trainable:,} trainable parameters"
        )

    def loader(self, source: BatchSource | None = None) -> Iterable[Batch]:
        """What the training loop iterates: the source reading through one DataLoader (and
        its workers) per shard folder."""
        return (source if source is not None else self.source).bind(self._dataloader)

    def _dataloader(self, shards: ShardBatches) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            shards,
            batch_size=None,  # ShardBatches collates whole batches in the worker
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )


def shard_batches(cfg: TrainConfig, folder: str, accelerator, tokenizer, *, train: bool):
    # A teacher-vocabulary folder (issue #23) holds the teacher's ids: it is read with the
    # teacher tokenizer's fingerprint and each row is aligned to the student as it is read.
    # Any other folder must have the student's tokenizer, as before.
    convert = crosstok_rows(folder, tokenizer)
    if convert is not None and cfg.loss.reverse_kl_estimator == "mc":
        raise ConfigError(
            f"{folder}: teacher-vocabulary shards: loss.reverse_kl_estimator=mc needs the "
            "teacher's logprob of the student's token, which another vocabulary does not have"
        )
    expected = convert.t_fingerprint if convert is not None else tokenizer_fingerprint(tokenizer)
    reader = ShardReader(
        folder,
        seed=cfg.seed,
        shuffle=train,
        window_blocks=cfg.data.window_blocks,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=cfg.data.num_workers,
        epochs=None if train else 1,
        expected_tokenizer_fingerprint=expected,
        verify=cfg.data.verify,
    )
    if train and len(reader.folder.blocks) < reader.num_shards:
        raise ConfigError(
            f"{folder}: {len(reader.folder.blocks)} record batches cannot feed "
            f"{reader.num_shards} ranks x workers; write smaller batches or use fewer workers"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ShardBatches(
        reader,
        batch_tokens=cfg.data.batch_tokens,
        max_rows=cfg.data.max_rows,
        max_length=cfg.data.max_length,
        sort_window=cfg.data.sort_window,
        seed=cfg.seed,
        pad_id=pad,
        overlong=cfg.data.overlong,
        convert=convert,
        keep=cfg.data.keep,
    )


def is_teacher_vocabulary(folder: str) -> bool:
    """Does `folder`'s metadata say it holds teacher-vocabulary shards (crosstok/folder.py)?"""
    return VOCABULARY_KEY in ShardFolder(folder, verify="none").metadata.extra


def prompt_batches(cfg: TrainConfig, accelerator, tokenizer) -> PromptBatches:
    """On-policy prompts from the data file `onpolicy.prompts` (train/prompts.py)."""
    op = cfg.onpolicy
    source = PromptBatches(
        op.prompts,
        tokenizer,
        split=op.prompts_split,
        max_rows=op.max_prompts,
        max_length=cfg.data.max_length,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        experience_position=op.experience_position,
    )
    if accelerator.is_main_process:
        print(
            f"[train] on-policy prompts: {op.prompts} ({len(source)} on this rank; "
            "data.shards is not read)",
            flush=True,
        )
    return source


def training_source(
    cfg: TrainConfig, accelerator, tokenizer
) -> ShardBatches | MixtureBatches | PromptBatches:
    """The shard batches of `data.shards`: one folder, or a weighted mixture of several; or
    the prompts of `onpolicy.prompts`."""
    if cfg.onpolicy.prompts:
        return prompt_batches(cfg, accelerator, tokenizer)
    sources = cfg.data.shards
    if len(sources) == 1:
        return shard_batches(cfg, sources[0].path, accelerator, tokenizer, train=True)
    # Folders against each other first, so that the error names the two folders. A folder
    # of teacher-vocabulary shards (issue #23) holds another tokenizer's ids by design: each
    # is aligned to the student as it is read, and its batches never mix with another
    # folder's (train/mixture.py), so only the ordinary folders must share one tokenizer.
    ordinary = [s for s in sources if not is_teacher_vocabulary(s.path)]
    first = ShardFolder(ordinary[0].path, verify="none") if ordinary else None
    for s in ordinary[1:]:
        other = ShardFolder(s.path, verify="none")
        if other.metadata.tokenizer_fingerprint != first.metadata.tokenizer_fingerprint:
            raise ShardError(
                other.path,
                f"tokenizer fingerprint {other.metadata.tokenizer_fingerprint} differs from "
                f"{first.metadata.tokenizer_fingerprint} of {first.path}: a mixture's folders "
                "must share one tokenizer",
                field="tokenizer_fingerprint",
            )
    parts = [shard_batches(cfg, s.path, accelerator, tokenizer, train=True) for s in sources]
    mix = MixtureBatches(
        parts, [s.path for s in sources], [s.weight for s in sources], seed=cfg.seed
    )
    if accelerator.is_main_process:
        for s, w, part in zip(sources, mix.weights, parts, strict=True):
            m, man = part.reader.metadata, part.reader.folder.manifest
            print(
                f"[train] mixture: {s.path} weight {w:.3g}: {man.rows} rows, {man.tokens} "
                f"tokens, teacher {m.teacher}, k={m.k}, sampling {m.sampling}, "
                f"tags {m.extra.get('tags', {})}",
                flush=True,
            )
    return mix


def build_run(cfg: TrainConfig) -> Run:
    # transformers' optimization module pulls in peft and bitsandbytes (seconds): here, not at
    # the top, so that `python -m train --help` and config errors come back at once.
    from transformers import get_scheduler

    plugin = None
    if cfg.deepspeed:
        plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed)
        plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.grad_accum
    # step_scheduler_with_optimizer=False: one scheduler step per optimizer step; accelerate
    # would otherwise step it once per process, assuming per-process dataloader steps.
    acc = Accelerator(
        mixed_precision=mixed_precision(cfg.model.dtype),
        deepspeed_plugin=plugin,
        step_scheduler_with_optimizer=False,
        log_with=tracker_names(cfg.log_with) or None,  # train/logger.py starts them
        project_dir=cfg.out_dir,
    )
    set_seed(cfg.seed)
    lm, tokenizer = load_student(cfg.model, acc.device)
    source = training_source(cfg, acc, tokenizer)
    teacher_vocab = max(
        (p.reader.metadata.vocab_size for p in source.folders() if p.convert is None), default=0
    )  # prompts from a data file: no folder; the teacher client checks the ids
    head = lm.get_output_embeddings()
    # out_features, not weight.shape: under ZeRO-3 the weight is partitioned (shape 0).
    student_vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    if teacher_vocab > student_vocab:
        raise ConfigError(
            f"shards have teacher ids up to {teacher_vocab - 1} but the student's output head "
            f"has {student_vocab} rows"
        )
    module = DistillModule(lm, cfg.loss, cfg.loss.chunk_tokens, uld_weight=cfg.loss.uld_weight)
    # A mixture of teacher-vocabulary and ordinary folders: every batch logs the same stats
    # (an ordinary batch's tokens are one-to-one, its ULD 0), so that ranks agree on them.
    module.crosstok_stats = any(p.convert is not None for p in source.folders())
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = get_scheduler(
        cfg.optim.schedule,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.max_steps,
    )
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    deepspeed = acc.state.deepspeed_plugin is not None
    if cfg.deepspeed and not deepspeed:
        raise ConfigError(
            f"deepspeed={cfg.deepspeed} is set but accelerate did not start DeepSpeed "
            f"({acc.distributed_type}); launch with torchrun or accelerate launch on GPUs"
        )
    if deepspeed and acc.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed as ds  # optional: only ZeRO-3 runs on GPUs need it

        # The loss uses the head's weight outside the head's own forward: ZeRO-3 must gather
        # it whenever DistillModule runs.
        inner = acc.unwrap_model(module)
        ds.zero.register_external_parameter(inner, inner.head.weight)
    if cfg.onpolicy.teacher_url and cfg.onpolicy.lmbda > 0:
        source = build_onpolicy(cfg, source, acc, module, tokenizer)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Run(acc, module, optimizer, scheduler, source, tokenizer, out_dir, deepspeed, cfg)


@torch.no_grad()
def evaluate(run: Run, cfg: TrainConfig) -> float | None:
    """Mean loss per token over the first `eval_batches` batches of the held-out shards."""
    if not cfg.data.eval_shards:
        return None
    source = shard_batches(cfg, cfg.data.eval_shards, run.accelerator, run.tokenizer, train=False)
    total, tokens = 0.0, 0
    run.module.eval()
    for i, batch in enumerate(run.loader(source)):
        if i >= cfg.eval_batches:
            break
        with run.accelerator.autocast():
            total += float(run.module(batch.to(run.accelerator.device)).loss)
        tokens += batch.num_tokens
    run.module.train()
    return global_sum(run.accelerator, total) / max(global_sum(run.accelerator, tokens), 1)

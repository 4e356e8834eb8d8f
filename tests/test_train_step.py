"""The training step's scaling: how a step's tokens are split does not change the update.

The update is the per-token mean over every trained token of the step. Two micro-batches
(grad_accum = 2) must give the weights of one batch holding both, and 2 DDP processes on the
CPU (gloo) the weights of 1 process over the same global batch. SGD without clipping makes
the weights a linear function of the gradient, so a wrong scale (a mean over micro-batches or
ranks instead of over tokens) shows in the weights; a clipped step checks that the norm is
taken over the whole step's gradient.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from tests.fixtures.tiny_model import tiny_model_dir
from train.batches import Batch, collate
from train.losses import KDSpec
from train.model import DistillModule
from train.step import train_step

# KD and CE terms both, chunked in pieces smaller than a micro-batch.
SPEC = KDSpec(divergence="jsd", beta=0.5, alpha=0.7, temperature=1.5)
LR = 0.5


def make_rows(n: int, vocab: int, *, seed: int, k: int = 8) -> list[dict]:
    """Shard-like rows of different lengths, with a teacher top-k from random logits."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(0, vocab, (3 + i % 4,), generator=g)
        response = torch.randint(0, vocab, (2 + (5 * i) % 9,), generator=g)
        logp = (2.0 * torch.randn(len(response), vocab, generator=g)).log_softmax(-1)
        values, ids = logp.topk(k, dim=-1)
        rows.append(
            {
                "id": f"r{seed}-{i}",
                "prompt_ids": prompt,
                "response_ids": response,
                "topk_ids": ids,
                "topk_logprobs": values,
                "tail_logprob": torch.logsumexp(logp.scatter(1, ids, -math.inf), dim=-1),
                "token_logprob": logp.gather(1, response[:, None])[:, 0],
            }
        )
    return rows


class Consumed:
    """A batch source that only records what the step hands back after the update."""

    def __init__(self):
        self.batches: list[Batch] = []

    def update(self, batch: Batch) -> None:
        self.batches.append(batch)


def one_step(model_dir, micro: list[Batch], max_grad_norm: float):
    """Weights after one SGD step of `micro` on this process's accelerator, and the stats."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    acc = Accelerator(cpu=True)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    module = DistillModule(lm, SPEC, chunk_tokens=7)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    source = Consumed()
    stats = train_step(
        micro,
        accelerator=acc,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        source=source,
        max_grad_norm=max_grad_norm,
        deepspeed=False,
    )
    assert source.batches == micro  # handed back after the update, in order
    weights = {k: v.detach().clone() for k, v in acc.unwrap_model(module).state_dict().items()}
    return weights, stats.metrics(acc)


def assert_same_weights(a: dict, b: dict, start: dict) -> None:
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the step did something, 1000 times the tolerance
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def start_weights(model_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {f"lm.{k}": v for k, v in lm.state_dict().items()}


def vocab_of(model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


@pytest.mark.parametrize("max_grad_norm", [1e9, 0.2])  # unclipped, and clipped
def test_grad_accum_equals_one_batch_of_both(model_dir, start_weights, max_grad_norm):
    vocab = vocab_of(model_dir)
    first, second = make_rows(3, vocab, seed=1), make_rows(5, vocab, seed=2)
    micro = [collate(first, max_length=64), collate(second, max_length=64)]
    assert micro[0].num_tokens != micro[1].num_tokens  # a mean of means would differ
    whole = collate(first + second, max_length=64)
    accumulated, m_acc = one_step(model_dir, micro, max_grad_norm)
    at_once, m_one = one_step(model_dir, [whole], max_grad_norm)
    assert_same_weights(accumulated, at_once, start_weights)
    assert m_acc["tokens"] == m_one["tokens"] == whole.num_tokens
    if max_grad_norm < 1:
        assert m_acc["grad_norm"] > 2 * max_grad_norm  # this step was clipped
    for k in ("loss", "kd", "ce", "grad_norm"):
        assert m_acc[k] == pytest.approx(m_one[k], rel=1e-5), k


def _ddp_rank(rank: int, port: int, model_dir, micro_by_rank, out_path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        ACCELERATE_USE_CPU="1",
    )
    torch.set_num_threads(1)
    weights, metrics = one_step(model_dir, micro_by_rank[rank], max_grad_norm=1e9)
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics}, out_path)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes that each import transformers: about 20 s on 2 cores
def test_two_ddp_processes_equal_one_process(model_dir, start_weights, tmp_path):
    vocab = vocab_of(model_dir)
    # Per rank 2 micro-batches (grad_accum = 2, DDP's no_sync path), rank 1 with more tokens.
    parts = [make_rows(n, vocab, seed=10 + i) for i, n in enumerate((2, 3, 4, 6))]
    micro_by_rank = [
        [collate(parts[0], max_length=64), collate(parts[1], max_length=64)],
        [collate(parts[2], max_length=64), collate(parts[3], max_length=64)],
    ]
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(
        _ddp_rank, args=(free_port(), model_dir, micro_by_rank, out), nprocs=2, join=True
    )
    ddp = torch.load(out)
    whole = collate([r for p in parts for r in p], max_length=64)
    single, metrics = one_step(model_dir, [whole], max_grad_norm=1e9)
    assert_same_weights(ddp["weights"], single, start_weights)
    assert ddp["metrics"]["tokens"] == whole.num_tokens
    for k in ("loss", "kd", "ce", "grad_norm"):
        assert ddp["metrics"][k] == pytest.approx(metrics[k], rel=1e-5), k

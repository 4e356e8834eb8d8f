"""The loss of a batch from teacher-vocabulary shards (docs/cross-tokenizer.md, "Losses").

Every trained student token has a kind (train/crosstok_rows.py): 0 mapped one-to-one, 1 the
first and 2 a later token of a merged block. The loss is a SUM (the trainer divides once by
the step's trained-token count, every student token counted once):

* kind 0 tokens: `kd_loss_mapped` with the teacher's top-k mapped onto student ids (the
  loss's own alpha * T^2 * KD + CE weight * CE per token; with the same tokenizer on both
  sides every token is kind 0 and nothing is -1, so this IS `kd_loss`).
* each merged block b (tokens of kinds 1, 2, ...): the chain-rule span logprobs, the
  student's s_b = sum of log q(its tokens) (crosstok.spans.block_logprobs) against the
  teacher's t_b, compared as two buckets {the span, anything else} with the loss's
  divergence (the tail_bucket rule whatever `tail` says: a renormalized single bucket would
  be 0), alpha * T^2 * D_b once per block; plus the CE weight * -log q(token) for each of its
  tokens.
* ULD at the first token of each merged block (where both models predict from the same text
  and the tokens do not map one to one): uld_weight * uld_loss(student logits, the teacher's
  raw top-k logprobs at the block's first teacher token).

Stats: "kd" (mapped KD + span divergences), "ce", "gate" (dual_kl), "uld" (unweighted), and
"one_to_one" (the count of kind-0 tokens; divided by "tokens" in the logs: their share).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from crosstok.spans import block_logprobs
from train.chunked import LinearHead, StudentLogprobs
from train.losses import KDSpec, LossOutput, kd_loss_mapped, token_loss_fn, uld_loss

# Span logprobs at most this (probability 1 - 1e-7): log(1 - p) stays finite with a finite
# gradient when a model is certain of a span.
_SPAN_MAX_LOGPROB = -1.0e-7


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler's two branches)."""
    x = x.clamp_max(_SPAN_MAX_LOGPROB)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-x.exp()))


def _dense_terms(
    head: LinearHead,
    targets: Tensor,
    first: Tensor,
    teacher_first: Tensor,
    want_uld: bool,
    chunk_tokens: int,
) -> tuple[Tensor, Tensor]:
    """(log q(target) (M,), ULD sum at the `first` rows) for M merged-block tokens, a chunk
    of logits at a time, recomputed in the backward (checkpoint) so that one (chunk, V)
    buffer lives at a time."""

    def part(h: Tensor, y: Tensor, f: Tensor, t: Tensor):
        z = F.linear(h, head.weight, head.bias).float()
        lp = torch.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0]
        uld = uld_loss(z[f], t) if want_uld and bool(f.any()) else z.new_zeros(())
        return lp, uld

    lps, uld = [], head.hidden.new_zeros((), dtype=torch.float32)
    n = head.hidden.shape[0]
    t_rows = torch.zeros(n, dtype=torch.long, device=first.device)
    t_rows[first] = torch.arange(int(first.sum()), device=first.device)
    for a in range(0, n, chunk_tokens):
        b = min(n, a + chunk_tokens)
        f = first[a:b]
        t = teacher_first[t_rows[a:b][f]]
        lp, u = checkpoint(part, head.hidden[a:b], targets[a:b], f, t, use_reentrant=False)
        lps.append(lp)
        uld = uld + u
    return torch.cat(lps), uld


def crosstok_loss(
    head: LinearHead,
    targets: Tensor,
    kind: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail_logprob: Tensor,
    token_logprob: Tensor,
    block_logprob: Tensor,
    *,
    spec: KDSpec,
    uld_weight: float,
    chunk_tokens: int,
) -> LossOutput:
    """The loss of N trained student tokens of teacher-vocabulary rows (see the module).

    head: LinearHead with hidden (N, H). targets (N,) student ids. kind (N,) int (0, 1, 2).
    ids (N, K) mapped student ids (-1: unmapped) and logprobs (N, K): the mapped top-k at kind
    0, the raw teacher top-k at kind 1. tail_logprob, token_logprob (N,): at kind 0.
    block_logprob (N,): the teacher's chain-rule block logprob at kind 1.
    """
    n = head.num_tokens
    kind = kind.long()
    mapped = kind == 0
    dev = head.hidden.device
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    loss, kd, ce, gate, uld = zero, zero, zero, zero, zero
    n_mapped = int(mapped.sum())
    if n_mapped:
        everything = n_mapped == n  # the same tokenizer: no copy, exactly kd_loss's inputs
        sel = (lambda t: t) if everything else (lambda t: t[mapped])
        out = kd_loss_mapped(
            LinearHead(sel(head.hidden), head.weight, head.bias),
            sel(ids),
            sel(logprobs),
            sel(tail_logprob),
            spec=spec,
            token_logprob=sel(token_logprob),
            targets=sel(targets),
            chunk_tokens=chunk_tokens,
        )
        loss = out.loss
        kd = out.stats.get("kd", zero)
        ce = out.stats.get("ce", zero)
        gate = out.stats.get("gate", zero)
    if n_mapped < n:
        rest = ~mapped
        k_rest = kind[rest]
        first = k_rest == 1
        if not bool(first[0]):
            raise ValueError("a merged block's tokens must start with its first token (kind 1)")
        t_first = logprobs[rest][first].float()
        s_lp, uld = _dense_terms(
            LinearHead(head.hidden[rest], head.weight, head.bias),
            targets[rest],
            first,
            t_first,
            uld_weight > 0,
            chunk_tokens,
        )
        # Block b: rest-tokens [starts[b], starts[b + 1]).
        starts = first.nonzero()[:, 0]
        ends = torch.cat([starts[1:], starts.new_tensor([len(k_rest)])])
        ranges = torch.stack([starts, ends], dim=1).cpu().numpy()
        s_block = block_logprobs(s_lp, ranges)  # (B,)
        t_block = block_logprob[rest][first].float()
        span_fn = token_loss_fn(replace(spec, tail="tail_bucket"))
        span_loss, span_stats = span_fn(
            StudentLogprobs(s_block[:, None], log1mexp(s_block), None),
            t_block[:, None],
            log1mexp(t_block),
            None,
        )
        ce_rest = -s_lp.sum()
        loss = loss + span_loss.sum() + spec.ce_weight * ce_rest + uld_weight * uld
        kd = kd + span_stats[:, 0].sum()
        ce = ce + ce_rest.detach()
        gate = gate + span_stats[:, 2].sum()
        uld = uld.detach()
    if n == 0:  # nothing trained: a zero that still reaches the model (its backward runs)
        loss = head.hidden.float().sum() * 0.0
    stats = {
        "tokens": torch.tensor(float(n), device=dev),
        "kd": kd,
        "ce": ce,
        "uld": uld,
        "one_to_one": torch.tensor(float(n_mapped), device=dev),
    }
    if spec.divergence == "dual_kl":
        stats["gate"] = gate
    return LossOutput(loss, stats)

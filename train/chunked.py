"""Chunked student log-probabilities with fused gradients: the memory-bounded half of the losses.

A distillation loss only needs a few numbers per token from the student's full-vocabulary
distribution q = softmax(z) (z: the (V,) logits of one token):

* ``topk``   (n, K): log q at the teacher's K top-k ids,
* ``tail``   (n,):   log of q's mass outside those ids (log sum_{j not in ids} q_j),
* ``target`` (n,):   log q at the response token (CE / SFT, Monte Carlo reverse KL).

`chunked_loss` computes them for a chunk of tokens at a time, hands them to a per-token loss
function (the divergence, passed in: the chunking is written once, Liger-Kernel's
``chunked_loss`` design), and back-propagates that loss to the chunk's logits *in the same
pass*, analytically, then on to the hidden states and the output head. Only the gradients of
the inputs are kept, so peak memory is about one (chunk, V) float32 buffer (plus its copy in
the head's dtype while it is cast) and the float32 gradient of the head weight, however many
tokens there are, and the logits are never recomputed: backward just scales the stored
gradients by the incoming scalar (a custom `torch.autograd.Function`; cheaper than
`torch.utils.checkpoint` per chunk, which runs the head matmul twice; measured by
`bench/loss_memory.py`).

The gradient through the vocabulary is written by hand, so autograd only ever sees the small
(n, K) tensors. With lse = logsumexp(z), lse_rest = logsumexp(z outside ids), p = softmax(z),
r_j = exp(z_j - lse_rest) (the distribution renormalized outside ids) and the loss's
gradients g_k = dL/dtopk_k, g_t = dL/dtail, g_y = dL/dtarget, G = sum_k g_k + g_t + g_y:

    dL/dz_j = g_k - G p_j                          j = ids_k
            = r_j (g_t - G exp(tail))              j not in ids   (p_j = r_j exp(tail))
            + g_y [j = y]                          the target, wherever it is

The exp computed for the tail's logsumexp (e_j = exp(z_j - max), max over the non-top-k) is
reused in place for r_j = e_j / sum e, so a chunk costs one (n, V) float32 buffer and one exp
pass, with no division by the tail mass: a tail of e^-100 or an empty tail (K = V) is safe.
The tail itself is thus a logsumexp over the logits with the top-k masked out, exact to
float32 rounding of the logits, rather than log(1 - sum(top-k probs)), which loses every
digit once the tail is below ~1e-7.

Inputs are row-selected per chunk (`rows`: the valid tokens), so masked tokens are never
computed and cannot put NaN into the result. Teacher ids must be distinct within a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024


class StudentLogprobs(NamedTuple):
    """Student log-probabilities (temperature 1, full vocabulary) for n tokens, float32.

    topk: (n, K) log q(ids[:, k]), aligned with the teacher's (unsorted) top-k ids.
    tail: (n,) log of the student mass outside the K ids; -inf when K = V.
    target: (n,) log q(response token), or None when no targets were given.
    """

    topk: Tensor
    tail: Tensor
    target: Tensor | None


# loss_fn(student, *row_inputs_of_the_chunk) -> (per-token loss (n,), per-token stats (n, S)).
# Stats are summed over tokens and returned detached, for logging.
TokenLossFn = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LinearHead:
    """The student's output head and its inputs, so the logits never exist for all tokens.

    hidden: (N, H) final hidden states of the N tokens (any float dtype).
    weight: (V, H) output embedding (lm_head) weight; the matmul runs in its dtype.
    bias: (V,) or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]


Student = Tensor | LinearHead  # logits (N, V), or the head inputs


def student_logprobs(logits: Tensor, ids: Tensor, targets: Tensor | None = None) -> StudentLogprobs:
    """Plain differentiable `StudentLogprobs` from full logits (N, V): the straightforward way.

    Materializes float32 copies of the logits (log_softmax and a masked copy for the tail):
    fine for small vocabularies, and the dense baseline of the memory benchmark.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    topk = z.gather(1, ids) - lse[:, None]
    tail = torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=1) - lse
    target = None if targets is None else z.gather(1, targets[:, None])[:, 0] - lse
    return StudentLogprobs(topk, tail, target)


def _chunk_loss_and_grad(
    z: Tensor,
    ids: Tensor,
    targets: Tensor | None,
    loss_fn: TokenLossFn,
    row_inputs: Sequence[Tensor | None],
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Loss sum, stats sum and dL/dz of one chunk. `z` (n, V) float32 is overwritten."""
    z_ids = z.gather(1, ids)
    z_y = None if targets is None else z.gather(1, targets[:, None])[:, 0]
    # The tail's logsumexp, in place: z becomes e = exp(z - m) outside the ids (0 at the ids),
    # which is also what the gradient needs (r_j = e_j / sum e), so no second (n, V) buffer.
    z.scatter_(1, ids, float("-inf"))
    shift = z.amax(dim=1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # K = V: empty
    e = z.sub_(shift[:, None]).exp_()
    rest_sum = e.sum(dim=1)
    lse_rest = rest_sum.log() + shift  # -inf when nothing is outside the ids
    lse = torch.logaddexp(lse_rest, torch.logsumexp(z_ids, dim=1))

    leaves = [z_ids - lse[:, None], lse_rest - lse]
    if z_y is not None:
        leaves.append(z_y - lse)
    with torch.enable_grad():
        for leaf in leaves:
            leaf.requires_grad_(need_grad)
        student = StudentLogprobs(leaves[0], leaves[1], leaves[2] if z_y is not None else None)
        loss_tok, stats_tok = loss_fn(student, *row_inputs)
        loss = loss_tok.sum()
        if not need_grad:
            return loss.detach(), stats_tok.detach().sum(0), None
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
        else:  # the loss does not depend on the student (e.g. K = 1 renormalized)
            grads = [torch.zeros_like(leaf) for leaf in leaves]
    loss = loss.detach()
    s_ids, s_tail = leaves[0].detach(), leaves[1].detach()
    g_ids, g_tail = grads[0], grads[1]
    g_y = grads[2] if z_y is not None else None

    g_total = g_ids.sum(1) + g_tail + (g_y if g_y is not None else 0.0)
    coef = g_tail - g_total * s_tail.exp()
    scale = torch.where(rest_sum > 0, coef / rest_sum, torch.zeros_like(coef))
    grad = e.mul_(scale[:, None])  # r_j * coef outside the ids, 0 at the ids
    grad.scatter_(1, ids, g_ids - g_total[:, None] * s_ids.exp())
    if g_y is not None:
        grad.scatter_add_(1, targets[:, None], g_y[:, None])
    return loss, stats_tok.detach().sum(0), grad


@dataclass(frozen=True)
class _Config:
    loss_fn: TokenLossFn
    num_stats: int
    chunk_tokens: int
    need_grad: bool
    num_row_inputs: int


def _take(t: Tensor | None, rows: Tensor, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    return t.index_select(0, rows.to(t.device)).to(device, non_blocking=True)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, rows, ids, targets, x, weight, bias, *row_inputs):
        device = x.device
        loss = torch.zeros((), dtype=torch.float32, device=device)
        stats = torch.zeros(cfg.num_stats, dtype=torch.float32, device=device)
        want_x = cfg.need_grad and ctx.needs_input_grad[4]
        want_w = cfg.need_grad and weight is not None and ctx.needs_input_grad[5]
        want_b = cfg.need_grad and bias is not None and ctx.needs_input_grad[6]
        grad_x = torch.zeros_like(x) if want_x else None
        # Head gradients accumulate in float32 across chunks, whatever the weight's dtype.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=device) if want_b else None
        need_grad = want_x or want_w or want_b

        for start in range(0, rows.numel(), cfg.chunk_tokens):
            r = rows[start : start + cfg.chunk_tokens]
            if weight is None:
                z = x.index_select(0, r).to(torch.float32)  # index_select copies: z is ours
                h = None
            else:
                h = x.index_select(0, r).to(weight.dtype)
                z = torch.nn.functional.linear(h, weight, bias).to(torch.float32)
            ids_c = _take(ids, r, device).long()
            tgt_c = None if targets is None else _take(targets, r, device).long()
            inputs_c = [_take(t, r, device) for t in row_inputs]
            loss_c, stats_c, grad_z = _chunk_loss_and_grad(
                z, ids_c, tgt_c, cfg.loss_fn, inputs_c, need_grad
            )
            del z  # grad_z is the same buffer: let the cast below free it
            loss += loss_c
            stats += stats_c
            if grad_z is None:
                continue
            if weight is None:
                grad_x.index_copy_(0, r, grad_z.to(x.dtype))
                continue
            if want_b:
                grad_b += grad_z.sum(0)
            grad_z = grad_z.to(weight.dtype)
            if want_x:
                grad_x.index_copy_(0, r, (grad_z @ weight).to(x.dtype))
            if want_w:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(grad_z.t(), h)
                else:
                    grad_w += grad_z.t() @ h
            del grad_z, h

        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.num_row_inputs = cfg.num_row_inputs
        ctx.backward_done = False
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, weight, bias))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # The stored gradients are scaled in place (no second (V, H) buffer), so this
        # backward can run only once per forward, retain_graph or not.
        if ctx.backward_done:
            raise RuntimeError("backward through a chunked loss can run only once per forward")
        ctx.backward_done = True
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            grads.append(None if g is None else g.mul_(grad_loss).to(dtype))
        return (None, None, None, None, *grads, *([None] * ctx.num_row_inputs))


def chunked_loss(
    student: Student,
    loss_fn: TokenLossFn,
    *,
    ids: Tensor | None,
    row_inputs: Sequence[Tensor | None] = (),
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    num_stats: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """Sum over valid tokens of ``loss_fn(StudentLogprobs, *row_inputs)``, chunk by chunk.

    student: logits (N, V), or a `LinearHead` (hidden (N, H), weight (V, H), bias).
    ids: (N, K) distinct token ids per row whose student logprobs `loss_fn` gets (K may be
        0; None means K = 0).
    row_inputs: tensors with N rows (or None), sliced per chunk and passed to `loss_fn`
        after the student logprobs (e.g. the teacher's logprobs and tail).
    targets: (N,) response token ids, or None.
    mask: (N,) bool, True for the tokens to count; None counts all. Masked rows are skipped
        entirely: their inputs may hold anything.
    num_stats: S, the width of the per-token stats that `loss_fn` returns.

    Returns (loss, stats): a float32 scalar, differentiable w.r.t. the logits or the hidden
    states, weight and bias, and the (S,) float32 sums of the stats (no gradient).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if isinstance(student, LinearHead):
        x, weight, bias = student.hidden, student.weight, student.bias
        if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"hidden {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
        vocab = weight.shape[0]
    else:
        x, weight, bias = student, None, None
        if x.dim() != 2:
            raise ValueError(f"logits must be (N, V), got {tuple(x.shape)}")
        vocab = x.shape[1]
    n = x.shape[0]
    if ids is None:
        ids = torch.zeros((n, 0), dtype=torch.long, device=x.device)
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] > vocab:
        raise ValueError(f"ids {tuple(ids.shape)} do not fit {n} tokens and vocabulary {vocab}")
    for t in (targets, mask, *row_inputs):
        if t is not None and t.shape[0] != n:
            raise ValueError(f"an input has {t.shape[0]} rows, the student has {n}")
    if mask is None:
        rows = torch.arange(n, device=x.device)
    else:
        rows = torch.nonzero(mask.to(x.device).bool(), as_tuple=True)[0]
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    cfg = _Config(loss_fn, num_stats, chunk_tokens, need_grad, len(row_inputs))
    return _ChunkedLoss.apply(cfg, rows, ids, targets, x, weight, bias, *row_inputs)

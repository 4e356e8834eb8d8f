"""Distillation losses from the teacher's precomputed top-k: pure tensor functions.

Conventions (read these before wiring a loss into a trainer)
-------------------------------------------------------------

* **Sums, not means.** Every function returns the SUM over the valid tokens, as a float32
  scalar. The trainer divides once, by the global number of valid tokens (across gradient
  accumulation steps and ranks), so long and short sequences weigh the same per token.
* **float32 inside.** Student logits (bf16 or float32) and teacher logprobs are upcast to
  float32 chunk by chunk; the result is float32 whatever the input dtype.
* **Student input.** Either plain logits (N, V), for small models and tests, or a
  `LinearHead` (hidden (N, H), lm_head weight (V, H), optional bias): the memory-bounded path,
  which never materializes the logits of more than `chunk_tokens` tokens (see train/chunked.py).
  Both go through the same chunking and the same divergence code. `mask` (N,) bool selects the
  tokens that count; passing only the valid tokens' hidden states (mask None) is cheaper.
* **Teacher signal** (`TeacherSignal`): per token the K top-k ids (unsorted), their raw
  (temperature 1) logprobs over the full teacher vocabulary, the log of the teacher mass
  outside the top-k, and the teacher logprob of the response token. Ids must be distinct.

Supports: the tail policy (`TailPolicy`)
----------------------------------------

Both distributions are compared on B buckets built from the teacher's top-k ids:

* ``"renormalize"`` (B = K): teacher and student restricted to the teacher's top-k ids and
  renormalized there. Ignores how much mass the student puts outside the top-k. K = 1 gives a
  loss of exactly 0.
* ``"tail_bucket"`` (B = K + 1): the K top-k entries plus one bucket for everything else;
  teacher: exp(tail_logprob); student: its exact mass outside the top-k ids (a logsumexp over
  the non-top-k logits, not log(1 - sum(top-k probs)), which is lost to rounding once the
  tail is below ~1e-7). Penalizes student mass spread outside the teacher's top-k.

The teacher buckets are renormalized (log_softmax) after tempering, which also absorbs the
small quantization error of stored logprobs. When K = V the tail is empty (log 0 = -inf on
both sides, handled without NaN) and both policies equal the full-vocabulary divergence.

Temperature
-----------

The KD term is computed at temperature T on both sides and multiplied by T^2 (Hinton et al.:
the gradients of a tempered KL w.r.t. the logits shrink like 1/T^2, so the factor keeps the
KD term's gradient scale independent of T and comparable with the CE term). The CE / SFT term
is always at T = 1, unscaled. How T enters each policy:

* ``renormalize``: bucket b gets p_T(b) = p(b)^(1/T) / sum_b' p(b')^(1/T), likewise q_T.
  This is EXACTLY softmax(logits / T) restricted to the top-k ids and renormalized, for the
  student and for the teacher (the top-k logprobs are logits up to a constant). No
  approximation.
* ``tail_bucket``: the same tempering applied to the K + 1 buckets, the tail treated as ONE
  bucket: p_T(tail) proportional to p(tail)^(1/T) = exp(tail_logprob / T). For the teacher this
  is an APPROXIMATION: its true tempered tail is sum_{j outside} p_j^(1/T) / Z_T, which the
  stored signal cannot give (only the sum of the p_j is stored). Since x^(1/T) is concave for
  T > 1, one bucket under-estimates the tempered tail mass for T > 1 (over-estimates for
  T < 1); ratios between top-k entries are exact. The student's tail is tempered the same way
  (as one bucket, not as its exact logsumexp(logits / T) outside the top-k, which we could
  compute) so that both sides see the same coarsening: the loss is then 0 exactly when the
  student's buckets equal the teacher's, instead of pulling the student's tail towards a
  biased teacher tail. At T = 1 nothing is approximated.

Divergences (per token, on the buckets; P = teacher, Q = student)
-----------------------------------------------------------------

`KDSpec.divergence` names one of them: ``forward_kl``, ``reverse_kl``, ``jsd``, ``dual_kl``.
These names, and every other `KDSpec` field name, are also the keys of the training config's
`loss:` section (train/config.py's `LossConfig` is a `KDSpec`), so one knob has one name from
the YAML to this file. The recipes are values of them: SeqKD is ``alpha: 0`` (CE on the
teacher's responses, no KD term; the divergence is unused), SKD is ``forward_kl`` (or
``reverse_kl``) with 0 < alpha <= 1.

* forward KL  KL(P || Q) = sum_b P_b (log P_b - log Q_b): mass-covering.
* reverse KL  KL(Q || P) = sum_b Q_b (log Q_b - log P_b): mode-seeking.
* generalized JSD(beta): M = beta P + (1 - beta) Q,
  JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M); beta = 0.5 is the symmetric JSD.
  The mixture formula goes to 0 at both ends (JSD_beta ~ beta FKL as beta -> 0 and
  ~ (1 - beta) RKL as beta -> 1), so the endpoints are defined by branching: beta = 0 IS the
  forward KL and beta = 1 IS the reverse KL, computed by the same code as ``forward_kl`` /
  ``reverse_kl`` (bitwise equal). The loss is therefore discontinuous at the endpoints
  (JSD_0.01 is about 100x smaller than JSD_0) and is not rescaled in between.
  This is TRL's convention: `GKDTrainer.generalized_jsd_loss` (and the GKD paper, Agarwal et
  al. 2024, eq. 1) uses the same M = beta * teacher + (1 - beta) * student, the same weights
  beta KL(teacher || M) + (1 - beta) KL(student || M), and the same branches (beta == 0:
  KL(teacher || student), beta == 1: KL(student || teacher)), so beta means the same here
  and there. Differences: TRL tempers full-vocabulary logits (we temper the buckets, above),
  applies no T^2 factor (we do), and reduces with "batchmean" (sum / valid tokens of the
  batch; we return the sum and the trainer divides by the global count).
* dual KL: per token a gate lambda_t, loss_t = lambda_t RKL_t + (1 - lambda_t) FKL_t, with
  lambda_t = sigmoid(gate_alpha (tau - D_t)) ("soft") or 1[D_t < tau] ("hard"), where D_t is
  the EXACT reverse KL on the buckets, detached (the gate is a weight, not something to
  optimize; the single-sample Monte Carlo estimate is too noisy to gate on and can be
  negative). The gate favours REVERSE KL where the student is already close to the teacher
  (D_t < tau): there mode-seeking refinement is safe and sharpens the student onto the
  teacher's modes. Where the student is far, it falls back to FORWARD KL, whose gradient
  covers all of the teacher's mass and pulls the student towards it; reverse KL there is
  zero-forcing and can lock the student onto one wrong mode. For logging, `kd_loss` returns the
  sum of the gate and the token count (stats "gate" and "tokens"; mean gate = their ratio).

  Reverse KL (``reverse_kl_estimator``) can be exact on the buckets (``"exact"``) or a Monte
  Carlo estimate on the response token y (``"mc"``): RKL_t ~ log q(y) - log p(y) with the
  student's and teacher's FULL-vocabulary logprobs (`token_logprob`), so it estimates the
  full-vocabulary reverse KL, not the bucketed one, and it is unbiased only if y was sampled
  from the current student (on-policy data; with teacher-written or stale responses it is not
  the reverse KL). The plain difference has the wrong gradient: d/dtheta of log q(y) has
  expectation 0 under y ~ q. The gradient of KL(q || p) is
  E_{y~q}[(log q(y) - log p(y)) grad log q(y)] (score function; the extra term E[grad log q]
  is 0), so the per-token term is built as d + d * (log q(y) - stop_grad(log q(y))) with
  d = stop_grad(log q(y) - log p(y)): its value is the estimate d and its gradient is
  d grad log q(y), unbiased. No baseline is subtracted. MC needs T = 1 (the teacher's
  tempered token logprob is unknown).

  Forward KL (``forward_kl_support``) can use the whole top-k (``"topk"``) or the teacher's
  argmax only (``"argmax"``): the bucket distributions collapsed to two buckets, {argmax,
  everything else} (a binary KL; by data processing it is <= the top-k forward KL).

SKD mix: the CE weight
----------------------

loss_t = alpha * T^2 * KD_t + ((1 - alpha) + sft_alpha) * CE_t, CE_t = -log q(response token)
at T = 1. alpha = 1 (default) is pure KD, alpha = 0 pure CE (SeqKD / SFT on the responses);
sft_alpha adds an SFT term to any KD loss without reweighting the KD term. WARNING: other
tools use the opposite convention (alpha weighting the CE / hard-label term, e.g. some
Hinton-style recipes); check before copying a value across.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.typed_config import option
from train.chunked import (
    DEFAULT_CHUNK_TOKENS,
    LinearHead,
    Student,
    StudentLogprobs,
    TokenLossFn,
    chunked_loss,
)

if TYPE_CHECKING:
    from shards.codec import TeacherTopK

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "LOG_FLOOR",
    "KDSpec",
    "LinearHead",
    "LossOutput",
    "Student",
    "Divergence",
    "ForwardKLSupport",
    "GateKind",
    "ReverseKLEstimator",
    "TailPolicy",
    "TeacherSignal",
    "bucket_logprobs",
    "collapse_to_argmax",
    "dual_gate",
    "generalized_jsd_tokens",
    "kd_loss",
    "kd_loss_mapped",
    "kl_tokens",
    "mc_reverse_kl_tokens",
    "token_loss_fn",
    "uld_loss",
    "uld_tokens",
]

TailPolicy = Literal["renormalize", "tail_bucket"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "dual_kl"]
ReverseKLEstimator = Literal["exact", "mc"]
ForwardKLSupport = Literal["topk", "argmax"]
GateKind = Literal["soft", "hard"]

# Log-probabilities are clamped here: exp(LOG_FLOOR) is exactly 0 in float32, so an empty
# bucket (log 0 = -inf) contributes 0 to every sum and no NaN reaches the gradients.
LOG_FLOOR = -1.0e4

STAT_NAMES = ("kd", "ce", "gate")


# ---- the teacher signal ----------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSignal:
    """The teacher's signal for N tokens (torch tensors; see shards.codec.TeacherTopK).

    ids: (N, K) int, the teacher's top-k token ids, distinct, in no particular order.
    logprobs: (N, K) float, raw (temperature 1) logprobs over the full teacher vocabulary,
        aligned with `ids`.
    tail_logprob: (N,) float, log of the teacher mass outside the top-k (-inf allowed).
    token_logprob: (N,) float or None, the teacher logprob of the response token (needed by
        the Monte Carlo reverse KL only).
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor
    token_logprob: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                "must both be (N, K)"
            )
        n = self.ids.shape[0]
        if self.tail_logprob.shape != (n,):
            raise ValueError(f"tail_logprob must be ({n},), got {tuple(self.tail_logprob.shape)}")
        if self.token_logprob is not None and self.token_logprob.shape != (n,):
            raise ValueError(f"token_logprob must be ({n},), got {tuple(self.token_logprob.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def from_topk(
        cls, topk: TeacherTopK, device: torch.device | str | None = None
    ) -> TeacherSignal:
        """From the decoded shard arrays (numpy), as int64 ids and float32 logprobs."""

        def tensor(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        return cls(
            ids=tensor(topk.ids, torch.long),
            logprobs=tensor(topk.logprobs, torch.float32),
            tail_logprob=tensor(topk.tail_logprob, torch.float32),
            token_logprob=tensor(topk.token_logprob, torch.float32),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherSignal:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return TeacherSignal(
            move(self.ids), move(self.logprobs), move(self.tail_logprob), move(self.token_logprob)
        )


# ---- per-token divergences on bucket distributions -------------------------------------------


def bucket_logprobs(
    student_topk: Tensor,
    student_tail: Tensor,
    teacher_topk: Tensor,
    teacher_tail: Tensor,
    *,
    tail: TailPolicy,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The tempered bucket distributions (log_q, log_p) of student and teacher, each (n, B).

    student_topk, teacher_topk: (n, K) temperature-1 logprobs at the teacher's top-k ids.
    student_tail, teacher_tail: (n,) log of the mass outside them (unused by "renormalize").
    B = K for "renormalize", K + 1 for "tail_bucket" (the tail is the last bucket). Both are
    tempered as B-category distributions (see the module docstring) and clamped at LOG_FLOOR.
    """
    if tail == "renormalize":
        q, p = student_topk, teacher_topk
    elif tail == "tail_bucket":
        q = torch.cat([student_topk, student_tail[:, None]], dim=1)
        p = torch.cat([teacher_topk, teacher_tail[:, None]], dim=1)
    else:
        raise ValueError(f"unknown tail policy {tail!r}; expected one of {get_args(TailPolicy)}")
    if temperature != 1.0:
        q, p = q / temperature, p / temperature
    return (
        F.log_softmax(q, dim=1).clamp_min(LOG_FLOOR),
        F.log_softmax(p, dim=1).clamp_min(LOG_FLOOR),
    )


def kl_tokens(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(A || B) per row: sum_b A_b (log A_b - log B_b). (n, B), (n, B) -> (n,).

    Inputs are log-probabilities clamped at LOG_FLOOR (as `bucket_logprobs` returns them):
    an empty bucket of A then adds exactly 0.
    """
    return (log_a.exp() * (log_a - log_b)).sum(dim=1)


def generalized_jsd_tokens(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Generalized JSD per row, P = teacher, Q = student. (n, B), (n, B) -> (n,).

    M = beta P + (1 - beta) Q; JSD = beta KL(P || M) + (1 - beta) KL(Q || M). beta = 0 returns
    KL(P || Q) (forward) and beta = 1 returns KL(Q || P) (reverse), computed directly.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_tokens(log_p, log_q)
    if beta == 1.0:
        return kl_tokens(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl_tokens(log_p, log_m) + (1.0 - beta) * kl_tokens(log_q, log_m)


def collapse_to_argmax(log_q: Tensor, log_p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Two buckets per row, {teacher argmax among the first k buckets, the rest}: (n, 2) each.

    The rest is a logsumexp over the other buckets (no 1 - p cancellation).
    """
    argmax = log_p[:, :k].argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, argmax, True)

    def collapse(lp: Tensor) -> Tensor:
        top = lp.gather(1, argmax)[:, 0]
        rest = torch.logsumexp(lp.masked_fill(is_top, LOG_FLOOR), dim=1)
        return torch.stack([top, rest], dim=1).clamp_min(LOG_FLOOR)

    return collapse(log_q), collapse(log_p)


def dual_gate(d_rkl: Tensor, *, tau: float, kind: GateKind = "soft", alpha: float = 10.0):
    """lambda_t: sigmoid(alpha (tau - D_t)) or 1[D_t < tau]; close to 1 = trust reverse KL."""
    if kind == "hard":
        return (d_rkl < tau).to(d_rkl.dtype)
    if kind == "soft":
        return torch.sigmoid(alpha * (tau - d_rkl))
    raise ValueError(f"unknown gate {kind!r}; expected one of {get_args(GateKind)}")


def mc_reverse_kl_tokens(student_token_logprob: Tensor, teacher_token_logprob: Tensor) -> Tensor:
    """One-sample reverse KL estimate per token, with the score-function gradient. (n,) -> (n,).

    Value: d = log q(y) - log p(y). Gradient w.r.t. log q(y): d (detached), so that
    E_{y~q}[d grad log q(y)] = grad KL(q || p). Unbiased only for y sampled from q.
    """
    d = (student_token_logprob - teacher_token_logprob).detach()
    return d + d * (student_token_logprob - student_token_logprob.detach())


# ---- the loss specification ------------------------------------------------------------------


@dataclass(frozen=True)
class KDSpec:
    """What to compute per token. See the module docstring for every convention.

    The training config's `loss:` section is this dataclass (plus chunk_tokens): its field
    names are the YAML keys, and `__post_init__` is the one place they are checked.

    divergence: "forward_kl" | "reverse_kl" | "jsd" | "dual_kl".
    tail: the tail policy, "renormalize" | "tail_bucket".
    temperature: T > 0, for the KD term only (which is multiplied by T^2).
    beta: generalized JSD mixture weight of the teacher (0 = FKL, 1 = RKL, 0.5 symmetric).
    alpha: SKD mix, loss = alpha * KD + (1 - alpha) * CE; 1 = pure KD. Other tools use the
        opposite convention.
    sft_alpha: extra CE (SFT) weight added to any KD loss.
    reverse_kl_estimator: "exact" on the buckets, or "mc" on the response token
        (reverse_kl, dual_kl).
    forward_kl_support: "topk", or "argmax" (binary {teacher argmax, rest})
        (forward_kl, dual_kl).
    gate, gate_tau, gate_alpha: dual-KL gate; lambda = sigmoid(gate_alpha (gate_tau - RKL))
        ("soft") or 1[RKL < gate_tau] ("hard"); tau in nats of per-token bucket RKL. The
        defaults are placeholders: tune them.
    """

    # The help texts are what `python -m train --help` lists for the loss section.
    divergence: Divergence = option("forward_kl", "the KD divergence on the top-k buckets")
    tail: TailPolicy = option(
        "tail_bucket", "teacher mass outside the top-k: one extra bucket, or renormalize"
    )
    temperature: float = option(1.0, "KD temperature T > 0 (the KD term is scaled by T^2)")
    beta: float = option(0.5, "jsd: teacher weight of the mixture (0 = forward, 1 = reverse KL)")
    alpha: float = option(1.0, "loss = alpha * KD + (1 - alpha) * CE; 0 = SeqKD, 1 = pure KD")
    sft_alpha: float = option(0.0, "extra CE (SFT) weight added to any KD loss")
    reverse_kl_estimator: ReverseKLEstimator = option(
        "exact", "reverse_kl, dual_kl: exact on the buckets, or mc on the response token"
    )
    forward_kl_support: ForwardKLSupport = option(
        "topk", "forward_kl, dual_kl: the top-k buckets, or argmax ({teacher argmax, rest})"
    )
    gate: GateKind = option("soft", "dual_kl gate: soft (sigmoid) or hard (threshold)")
    gate_tau: float = option(0.5, "dual_kl gate threshold, in nats of per-token reverse KL")
    gate_alpha: float = option(10.0, "dual_kl soft gate steepness")

    def __post_init__(self) -> None:
        for name, lit in (
            ("divergence", Divergence),
            ("tail", TailPolicy),
            ("reverse_kl_estimator", ReverseKLEstimator),
            ("forward_kl_support", ForwardKLSupport),
            ("gate", GateKind),
        ):
            if getattr(self, name) not in get_args(lit):
                allowed = " | ".join(get_args(lit))
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.sft_alpha < 0:
            raise ValueError(f"sft_alpha must be >= 0, got {self.sft_alpha}")
        if self.reverse_kl_estimator == "mc":
            if self.divergence not in ("reverse_kl", "dual_kl"):
                raise ValueError(
                    "reverse_kl_estimator=mc applies to divergence reverse_kl or dual_kl only"
                )
            if self.temperature != 1.0:
                raise ValueError("reverse_kl_estimator=mc (Monte Carlo) needs temperature 1")
        if self.forward_kl_support == "argmax" and self.divergence not in ("forward_kl", "dual_kl"):
            raise ValueError(
                "forward_kl_support=argmax applies to divergence forward_kl or dual_kl only"
            )

    @property
    def kd_weight(self) -> float:
        return self.alpha * self.temperature**2

    @property
    def ce_weight(self) -> float:
        return (1.0 - self.alpha) + self.sft_alpha

    @property
    def needs_targets(self) -> bool:
        return self.ce_weight > 0 or (self.reverse_kl_estimator == "mc" and self.alpha > 0)


def _forward_kl(spec: KDSpec, log_q: Tensor, log_p: Tensor, k: int) -> Tensor:
    if spec.forward_kl_support == "argmax":
        log_q, log_p = collapse_to_argmax(log_q, log_p, k)
    return kl_tokens(log_p, log_q)


def _reverse_kl(spec, log_q, log_p, student_target, teacher_token) -> Tensor:
    if spec.reverse_kl_estimator == "mc":
        return mc_reverse_kl_tokens(student_target, teacher_token.float())
    return kl_tokens(log_q, log_p)


def token_loss_fn(spec: KDSpec) -> TokenLossFn:
    """The per-token loss of `spec`, for `train.chunked.chunked_loss`.

    Called as fn(StudentLogprobs, teacher_logprobs (n, K) | None, teacher_tail (n,) | None,
    teacher_token_logprob (n,) | None); returns (loss (n,), stats (n, 3)) with stats
    [divergence at T (before T^2 and alpha), CE, gate] per token.
    """
    kd_weight, ce_weight = spec.kd_weight, spec.ce_weight

    def fn(s: StudentLogprobs, t_logprobs=None, t_tail=None, t_token=None):
        zero = torch.zeros_like(s.tail)
        kd, gate = zero, zero
        if t_logprobs is not None:
            log_q, log_p = bucket_logprobs(
                s.topk,
                s.tail,
                t_logprobs.float(),
                t_tail.float(),
                tail=spec.tail,
                temperature=spec.temperature,
            )
            k = t_logprobs.shape[1]
            if spec.divergence == "forward_kl":
                kd = _forward_kl(spec, log_q, log_p, k)
            elif spec.divergence == "reverse_kl":
                kd = _reverse_kl(spec, log_q, log_p, s.target, t_token)
            elif spec.divergence == "jsd":
                kd = generalized_jsd_tokens(log_p, log_q, spec.beta)
            else:
                gate = dual_gate(
                    kl_tokens(log_q, log_p).detach(),
                    tau=spec.gate_tau,
                    kind=spec.gate,
                    alpha=spec.gate_alpha,
                )
                rkl = _reverse_kl(spec, log_q, log_p, s.target, t_token)
                kd = gate * rkl + (1.0 - gate) * _forward_kl(spec, log_q, log_p, k)
        ce = -s.target if s.target is not None else zero
        loss = zero
        if kd_weight > 0 and t_logprobs is not None:
            loss = loss + kd_weight * kd
        if ce_weight > 0:
            loss = loss + ce_weight * ce
        return loss, torch.stack([kd.detach(), ce.detach(), gate.detach()], dim=1)

    return fn


# ---- entry points ----------------------------------------------------------------------------


class LossOutput(NamedTuple):
    """loss: float32 scalar, the SUM over valid tokens (divide by the global token count).

    stats: detached float32 sums for logging: "tokens" (count), "kd" (the divergence at T,
    before T^2 and alpha; with a teacher), "ce" (with targets), "gate" (dual KL).
    """

    loss: Tensor
    stats: dict[str, Tensor]


def kd_loss(
    student: Student,
    teacher: TeacherSignal | None,
    *,
    spec: KDSpec,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> LossOutput:
    """The loss of `spec` summed over the valid tokens, with logging stats.

    student: logits (N, V), or `LinearHead(hidden (N, H), weight (V, H), bias (V,) | None)`.
    teacher: the teacher signal for the same N tokens (None only for a pure CE spec).
    targets: (N,) response token ids; needed when spec's CE weight > 0 or for MC reverse KL.
    mask: (N,) bool, the tokens that count (None: all).
    chunk_tokens: tokens per chunk. Peak memory is about one (chunk_tokens, V) float32 buffer
        (plus its copy in the head's dtype) and, for a `LinearHead`, a (V, H) float32
        gradient accumulator for the weight.
    """
    if teacher is None and spec.alpha > 0:
        raise ValueError("a KD loss (alpha > 0) needs the teacher signal")
    if spec.needs_targets and targets is None:
        raise ValueError("this loss needs targets (CE weight > 0 or Monte Carlo reverse KL)")
    if teacher is not None and spec.reverse_kl_estimator == "mc" and teacher.token_logprob is None:
        raise ValueError("the Monte Carlo reverse KL needs teacher.token_logprob")
    if teacher is None:
        ids, row_inputs = None, ()
    else:
        ids = teacher.ids
        row_inputs = (teacher.logprobs, teacher.tail_logprob, teacher.token_logprob)
    loss, sums = chunked_loss(
        student,
        token_loss_fn(spec),
        ids=ids,
        row_inputs=row_inputs,
        targets=targets,
        mask=mask,
        num_stats=len(STAT_NAMES),
        chunk_tokens=chunk_tokens,
    )
    n = student.num_tokens if isinstance(student, LinearHead) else student.shape[0]
    count = mask.sum() if mask is not None else torch.tensor(n)
    stats = {"tokens": count.to(device=loss.device, dtype=torch.float32)}
    if teacher is not None:
        stats["kd"] = sums[0]
    if targets is not None:
        stats["ce"] = sums[1]
    if teacher is not None and spec.divergence == "dual_kl":
        stats["gate"] = sums[2]
    return LossOutput(loss, stats)


# ---- cross-tokenizer: a teacher top-k with unmapped entries, and the ULD term ----------------


def _fill_unmapped(ids: Tensor, vocab: int) -> Tensor:
    """ids (N, K) with -1 slots -> (N, K) distinct ids per row: each -1 gets a student id that is
    not in its row (the smallest free ones among the first min(V, 2K) ids)."""
    n, k = ids.shape
    cand = torch.arange(min(vocab, 2 * k), device=ids.device)
    used = (ids[:, :, None] == cand[None, None, :]).any(dim=1)  # (N, C)
    free_first = torch.sort(used.to(torch.int8), dim=1, stable=True).indices  # free ids first
    pad = ids < 0
    rank = (pad.cumsum(dim=1) - 1).clamp_min(0)
    return torch.where(pad, cand[free_first.gather(1, rank)], ids)


def _mapped_loss_fn(spec: KDSpec) -> TokenLossFn:
    """token_loss_fn(spec) for a top-k whose pad slots (teacher probability 0) are not buckets:
    the student's probability at a pad id is moved into its tail, so the student's buckets are
    {mapped ids, everything else}, exactly as for a top-k of only the mapped entries."""
    base = token_loss_fn(spec)

    def fn(s: StudentLogprobs, t_logprobs, t_tail, t_token, pad):
        pad = pad.bool()
        # LOG_FLOOR rather than -inf: a row without pads must not put NaN into the gradient.
        moved = torch.logsumexp(s.topk.masked_fill(~pad, LOG_FLOOR), dim=1)
        tail = torch.where(pad.any(dim=1), torch.logaddexp(s.tail, moved), s.tail)
        topk = s.topk.masked_fill(pad, LOG_FLOOR)
        return base(StudentLogprobs(topk, tail, s.target), t_logprobs, t_tail, t_token)

    return fn


def kd_loss_mapped(
    student: Student,
    ids: Tensor,
    logprobs: Tensor,
    tail_logprob: Tensor,
    *,
    spec: KDSpec,
    token_logprob: Tensor | None = None,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> LossOutput:
    """`kd_loss` for a teacher top-k mapped onto student ids (crosstok.vocab.map_topk).

    ids: (N, K) student ids, -1 for entries that did not map (their teacher mass is already in
    tail_logprob); logprobs (N, K) (any value at -1 slots), tail_logprob (N,). Equals
    `kd_loss` on a signal holding only the mapped entries of each row (bitwise `kd_loss` when
    nothing is -1). Needs a divergence on the buckets (not the "mc" reverse-KL estimator).
    """
    if spec.reverse_kl_estimator == "mc":
        raise ValueError("kd_loss_mapped: the Monte Carlo reverse KL needs the token's own logprob")
    pad = ids < 0
    if not bool(pad.any()):
        teacher = TeacherSignal(ids, logprobs, tail_logprob, token_logprob)
        return kd_loss(
            student, teacher, spec=spec, targets=targets, mask=mask, chunk_tokens=chunk_tokens
        )
    if spec.needs_targets and targets is None:
        raise ValueError("this loss needs targets (CE weight > 0)")
    vocab = student.weight.shape[0] if isinstance(student, LinearHead) else student.shape[1]
    if ids.shape[1] > vocab:
        raise ValueError(f"a top-k of {ids.shape[1]} entries does not fit a vocabulary of {vocab}")
    filled = _fill_unmapped(ids, vocab)
    t_lp = logprobs.float().masked_fill(pad, -torch.inf)
    loss, sums = chunked_loss(
        student,
        _mapped_loss_fn(spec),
        ids=filled,
        row_inputs=(t_lp, tail_logprob, token_logprob, pad),
        targets=targets,
        mask=mask,
        num_stats=len(STAT_NAMES),
        chunk_tokens=chunk_tokens,
    )
    n = student.num_tokens if isinstance(student, LinearHead) else student.shape[0]
    count = mask.sum() if mask is not None else torch.tensor(n)
    stats = {"tokens": count.to(device=loss.device, dtype=torch.float32), "kd": sums[0]}
    if targets is not None:
        stats["ce"] = sums[1]
    if spec.divergence == "dual_kl":
        stats["gate"] = sums[2]
    return LossOutput(loss, stats)


def uld_tokens(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """ULD per position: (n, Vs), (n, Vt) probabilities -> (n,) float32.

    sum_i |q_(i) - p_(i)|, q_(i) and p_(i) the i-th largest probabilities of each row, the
    shorter row padded with zeros (both sorted in decreasing order, then compared rank by rank).
    """
    q = torch.sort(student_probs.float(), dim=1, descending=True).values
    p = torch.sort(teacher_probs.float(), dim=1, descending=True).values
    width = max(q.shape[1], p.shape[1])
    q = F.pad(q, (0, width - q.shape[1]))
    p = F.pad(p, (0, width - p.shape[1]))
    return (q - p).abs().sum(dim=1)


def uld_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    mask: Tensor | None = None,
    student_top_k: int | None = None,
) -> Tensor:
    """Universal logit distillation term, the SUM over the valid positions, float32.

    Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
    Loss for LLMs" (arXiv 2402.12030): with no shared vocabulary, compare the two
    distributions as sorted vectors. Their closed form of the Wasserstein distance (uniform
    support and cost) is, per position t, sum_i |p^S_(i) - p^T_(i)| with each model's
    probabilities sorted in decreasing order and the smaller vocabulary padded with zeros
    (their code, llm-recipes models/distillation_model.py: softmax, sort descending, F.pad with
    0, abs difference summed over the vocabulary). Exactly what this computes:

        ULD_t = sum_{i=1..max(Vs, Kt)} |sort_desc(q_t)_i - sort_desc(p_t)_i|   (0-padded)
        q_t = softmax(student_logits_t) (float32), p_t = exp(teacher_logprobs_t)

    Differences from the paper, stated: temperature 1 on both sides (the paper allows tau);
    positions are paired by the caller (the paper pairs the i-th answer token of each model
    and truncates to the shorter answer; crosstok pairs aligned positions) and SUMMED here (the
    trainer divides by its token count; the paper averages); the teacher side may be a top-k
    (exp of the stored logprobs, the tail mass not spread over unknown tokens, so it counts as
    zeros); no CE term here and no weight lambda: the caller adds `weight * uld_loss`.

    student_logits: (N, Vs). teacher_logprobs: (N, Kt) (top-k or full vocabulary).
    mask: (N,) bool, positions that count (None: all).
    student_top_k: compare only the student's k largest probabilities (not renormalized).
    """
    if student_logits.dim() != 2 or teacher_logprobs.dim() != 2:
        raise ValueError("student_logits (N, Vs) and teacher_logprobs (N, Kt) must be 2-D")
    if student_logits.shape[0] != teacher_logprobs.shape[0]:
        raise ValueError(
            f"{student_logits.shape[0]} student positions, {teacher_logprobs.shape[0]} teacher"
        )
    if mask is not None:
        student_logits, teacher_logprobs = student_logits[mask], teacher_logprobs[mask]
    q = F.softmax(student_logits.float(), dim=1)
    if student_top_k is not None:
        if not 0 < student_top_k <= q.shape[1]:
            raise ValueError(f"student_top_k must be in 1..{q.shape[1]}, got {student_top_k}")
        q = torch.topk(q, student_top_k, dim=1).values
    return uld_tokens(q, teacher_logprobs.float().exp()).sum()

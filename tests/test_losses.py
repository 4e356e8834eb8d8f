"""Tests for train/losses.py and train/chunked.py against naive dense float64 references.

Every case builds a full-vocabulary teacher distribution from random logits, derives the
top-k + tail signal from it (ids shuffled, as in the shards), and compares the losses and
their gradients (w.r.t. logits, or hidden states / head weight / bias) with a reference
written here in plain float64 probability space, independently of the code under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch

from train.chunked import DEFAULT_CHUNK_TOKENS, LinearHead, chunked_loss, student_logprobs
from train.losses import KDSpec, TeacherSignal, generalized_jsd_tokens, kd_loss

F64 = torch.float64


# ---- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """A student (head and logits) and a teacher signal for n tokens over vocabulary v."""

    teacher_logp: torch.Tensor  # (n, v) float64, full teacher distribution
    teacher: TeacherSignal  # its top-k signal (float32, as a shard would give it)
    targets: torch.Tensor  # (n,) response tokens
    hidden: torch.Tensor  # (n, h)
    weight: torch.Tensor  # (v, h)
    bias: torch.Tensor  # (v,)

    @property
    def ids(self) -> torch.Tensor:
        return self.teacher.ids

    def leaves(self, dtype=torch.float32):
        """Fresh leaf copies of hidden, weight, bias in `dtype`, requiring grad."""
        return [
            t.detach().to(dtype).requires_grad_() for t in (self.hidden, self.weight, self.bias)
        ]

    def logits64(self, hidden, weight, bias) -> torch.Tensor:
        return hidden.to(F64) @ weight.to(F64).T + bias.to(F64)


def make_case(n: int, v: int, k: int, *, seed: int = 0, h: int = 8) -> Case:
    g = torch.Generator().manual_seed(seed)
    teacher_logits = 3.0 * torch.randn(n, v, generator=g, dtype=F64)
    logp = teacher_logits.log_softmax(1)
    ids = logp.topk(k, dim=1).indices
    ids = ids.gather(1, torch.argsort(torch.rand(n, k, generator=g), dim=1))  # unsorted
    rest = logp.scatter(1, ids, -math.inf)
    tail = torch.logsumexp(rest, 1)  # -inf when k == v
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = TeacherSignal(
        ids=ids,
        logprobs=logp.gather(1, ids).float(),
        tail_logprob=tail.float(),
        token_logprob=logp.gather(1, targets[:, None])[:, 0].float(),
    )
    hidden = torch.randn(n, h, generator=g)
    weight = 2.0 * torch.randn(v, h, generator=g) / math.sqrt(h)
    bias = 0.5 * torch.randn(v, generator=g)
    return Case(logp, teacher, targets, hidden, weight, bias)


# ---- the float64 reference -------------------------------------------------------------------


def ref_buckets(q_logp, p_logp, ids, tail: str, temperature: float):
    """Tempered bucket probabilities (q, p), float64, built in probability space."""
    q, p = q_logp.exp(), p_logp.exp()
    qb, pb = q.gather(1, ids), p.gather(1, ids)
    if tail == "tail_bucket" and ids.shape[1] < q.shape[1]:  # K = V: the tail bucket is empty
        outside = torch.ones_like(q, dtype=torch.bool).scatter(1, ids, False)
        qb = torch.cat([qb, (q * outside).sum(1, keepdim=True)], 1)
        pb = torch.cat([pb, (p * outside).sum(1, keepdim=True)], 1)
    qb, pb = qb ** (1 / temperature), pb ** (1 / temperature)
    return qb / qb.sum(1, keepdim=True), pb / pb.sum(1, keepdim=True)


def ref_kl(a, b):
    return (a * (a.log() - b.log())).sum(1)


def ref_jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_divergence(q, p, divergence: str, beta: float = 0.5):
    """JSD's endpoints are the KLs by definition (the mixture formula would give 0)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return ref_kl(p, q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return ref_kl(q, p)
    return ref_jsd(p, q, beta)


def ref_argmax_fkl(q, p, k):
    a = p[:, :k].argmax(1, keepdim=True)
    pa, qa = p.gather(1, a)[:, 0], q.gather(1, a)[:, 0]
    p2 = torch.stack([pa, p.sum(1) - pa], 1)
    q2 = torch.stack([qa, q.sum(1) - qa], 1)
    return ref_kl(p2, q2)


def ref_loss(case, student_logits64, divergence, tail, temperature, beta=0.5, mask=None):
    q, p = ref_buckets(
        student_logits64.log_softmax(1), case.teacher_logp, case.ids, tail, temperature
    )
    per_token = temperature**2 * ref_divergence(q, p, divergence, beta)
    if mask is not None:
        per_token = per_token[mask]
    return per_token.sum()


# ---- helpers ---------------------------------------------------------------------------------


def kd_sum(student, teacher, mask=None, *, targets=None, chunk_tokens=DEFAULT_CHUNK_TOKENS, **spec):
    """The loss sum of KDSpec(**spec), computed the way the trainer does: kd_loss(...).loss."""
    out = kd_loss(
        student, teacher, spec=KDSpec(**spec), targets=targets, mask=mask, chunk_tokens=chunk_tokens
    )
    return out.loss


forward_kl_sum = partial(kd_sum, divergence="forward_kl")
reverse_kl_sum = partial(kd_sum, divergence="reverse_kl")
jsd_sum = partial(kd_sum, divergence="jsd")


def dual_kl(student, teacher, *, tau, targets=None, chunk_tokens=DEFAULT_CHUNK_TOKENS, **spec):
    """kd_loss of the dual KL with gate_tau = tau: the loss and its "gate" / "tokens" stats."""
    spec = KDSpec(divergence="dual_kl", gate_tau=tau, **spec)
    return kd_loss(student, teacher, spec=spec, targets=targets, chunk_tokens=chunk_tokens)


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def assert_close64(actual, expected, rtol, atol):
    torch.testing.assert_close(
        actual.detach().to(F64), expected.detach().to(F64), rtol=rtol, atol=atol
    )


def run_ours(case, student_kind, fn, dtype=torch.float32, **kw):
    """fn(student, teacher, **kw) on logits or a LinearHead; returns (loss, grads, ref inputs)."""
    h, w, b = case.leaves(dtype)
    if student_kind == "logits":
        logits = case.logits64(h, w, b).to(dtype).detach().requires_grad_()
        loss = fn(logits, case.teacher, **kw)
        loss = loss[0] if isinstance(loss, tuple) else loss
        ref_in = [logits.detach().to(F64).requires_grad_()]
        return loss, grads(loss, [logits]), ref_in, lambda x: x[0]
    loss = fn(LinearHead(h, w, b), case.teacher, **kw)
    loss = loss[0] if isinstance(loss, tuple) else loss
    ref_in = [t.detach().to(F64).requires_grad_() for t in (h, w, b)]
    return loss, grads(loss, [h, w, b]), ref_in, lambda x: case.logits64(*x)


def check_against_ref(loss, our_grads, ref_loss_value, ref_in, rtol=2e-5, atol=2e-5):
    assert_close64(loss, ref_loss_value, rtol=rtol, atol=atol)
    for ours, ref in zip(our_grads, grads(ref_loss_value, ref_in), strict=True):
        scale = ref.abs().max().item() + 1e-12
        assert_close64(ours, ref, rtol=rtol, atol=atol * scale)


SHAPES = [(1, 11, 1), (7, 11, 3), (13, 11, 11), (7, 257, 1), (13, 257, 3)]
DIVERGENCES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.2)]


def divergence_fn(divergence, beta):
    kw = {} if beta is None else {"beta": beta}
    return partial(kd_sum, divergence=divergence), kw


# ---- divergences vs the reference ------------------------------------------------------------


@pytest.mark.parametrize("n,v,k", SHAPES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_divergence_matches_reference(n, v, k, divergence, beta, tail, student_kind):
    case = make_case(n, v, k, seed=n * 1000 + v + k)
    fn, kw = divergence_fn(divergence, beta)
    temperature = 1.0 if student_kind == "logits" else 2.0
    loss, our_grads, ref_in, to_logits = run_ours(
        case, student_kind, fn, tail=tail, temperature=temperature, chunk_tokens=5, **kw
    )
    ref = ref_loss(case, to_logits(ref_in), divergence, tail, temperature, beta or 0.5)
    check_against_ref(loss, our_grads, ref, ref_in)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
def test_temperature_matches_reference(temperature, divergence, beta, tail):
    case = make_case(7, 257, 3, seed=11)
    fn, kw = divergence_fn(divergence, beta)
    loss, our_grads, ref_in, to_logits = run_ours(
        case, "logits", fn, tail=tail, temperature=temperature, **kw
    )
    ref = ref_loss(case, to_logits(ref_in), divergence, tail, temperature, beta or 0.5)
    check_against_ref(loss, our_grads, ref, ref_in)


def test_renormalize_temperature_is_exactly_tempered_logits():
    """On the top-k, 'renormalize' at T equals softmax(logits / T) restricted and renormalized."""
    case = make_case(7, 257, 3, seed=3)
    logits = case.logits64(case.hidden, case.weight, case.bias)
    t = 1.7
    q = (logits / t).softmax(1).gather(1, case.ids)
    p = (case.teacher_logp.exp() ** (1 / t)).gather(1, case.ids)  # teacher logits up to a constant
    q, p = q / q.sum(1, keepdim=True), p / p.sum(1, keepdim=True)
    expected = t * t * ref_kl(p, q).sum()
    ours = forward_kl_sum(logits.float(), case.teacher, tail="renormalize", temperature=t)
    assert_close64(ours, expected, rtol=2e-5, atol=1e-6)


def test_tail_bucket_temperature_is_the_one_bucket_approximation():
    """The tempered tail is exp(tail / T), renormalized: not the teacher's exact tempered tail."""
    case = make_case(1, 257, 3, seed=5)
    t = 2.0
    exact = (case.teacher_logp / t).softmax(1)
    exact_tail = 1 - exact.gather(1, case.ids).sum()
    _, pb = ref_buckets(case.teacher_logp, case.teacher_logp, case.ids, "tail_bucket", t)
    assert pb[0, -1] < exact_tail  # T > 1: one bucket under-estimates the tempered tail
    # and the student equal to the teacher gets a loss of 0 (both sides coarsened alike)
    loss = forward_kl_sum(case.teacher_logp.float(), case.teacher, temperature=t)
    assert abs(loss.item()) < 1e-6


# ---- JSD endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_jsd_endpoints_are_exactly_the_kls(tail, student_kind):
    case = make_case(13, 257, 3, seed=21)
    kw = dict(tail=tail, temperature=1.5, chunk_tokens=4)
    for beta, kl_fn in ((0.0, forward_kl_sum), (1.0, reverse_kl_sum)):
        jsd, jsd_grads, _, _ = run_ours(case, student_kind, jsd_sum, beta=beta, **kw)
        kl, kl_grads, _, _ = run_ours(case, student_kind, kl_fn, **kw)
        assert torch.equal(jsd, kl)
        for a, b in zip(jsd_grads, kl_grads, strict=True):
            assert torch.equal(a, b)


def test_jsd_mixture_vanishes_at_the_endpoints():
    """The convention the docstring states: JSD_beta ~ beta FKL near 0, (1 - beta) RKL near 1."""
    g = torch.Generator().manual_seed(0)
    log_p = torch.randn(5, 9, generator=g, dtype=F64).log_softmax(1)
    log_q = torch.randn(5, 9, generator=g, dtype=F64).log_softmax(1)
    eps = 1e-5
    fkl = generalized_jsd_tokens(log_p, log_q, 0.0)
    rkl = generalized_jsd_tokens(log_p, log_q, 1.0)
    torch.testing.assert_close(
        generalized_jsd_tokens(log_p, log_q, eps) / eps, fkl, rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        generalized_jsd_tokens(log_p, log_q, 1 - eps) / eps, rkl, rtol=1e-3, atol=0
    )
    sym = generalized_jsd_tokens(log_p, log_q, 0.5)
    torch.testing.assert_close(sym, generalized_jsd_tokens(log_q, log_p, 0.5))


# ---- chunking, masking -----------------------------------------------------------------------


@pytest.mark.parametrize("student_kind", ["logits", "head"])
@pytest.mark.parametrize("spec", [
    KDSpec(divergence="jsd", beta=0.3, temperature=2.0),
    KDSpec(divergence="dual_kl", reverse_kl_estimator="mc", alpha=0.7, sft_alpha=0.1),
    KDSpec(divergence="forward_kl", tail="renormalize", forward_kl_support="argmax"),
])  # fmt: skip
def test_chunked_equals_unchunked(student_kind, spec):
    case = make_case(13, 257, 3, seed=31)
    mask = torch.ones(13, dtype=torch.bool)
    mask[[2, 9]] = False

    def run(chunk_tokens):
        return run_ours(
            case,
            student_kind,
            lambda s, t: kd_loss(
                s, t, spec=spec, targets=case.targets, mask=mask, chunk_tokens=chunk_tokens
            ),
        )[:2]

    whole, whole_grads = run(13)
    for chunk_tokens in (1, 4, 5, 11, 64):
        loss, our_grads = run(chunk_tokens)
        torch.testing.assert_close(loss, whole, rtol=1e-6, atol=1e-6)
        for a, b in zip(our_grads, whole_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


ALL_SPECS = [
    KDSpec(divergence="forward_kl"),
    KDSpec(divergence="reverse_kl", tail="renormalize", temperature=2.0),
    KDSpec(divergence="jsd", beta=0.5),
    KDSpec(divergence="dual_kl", gate="hard", forward_kl_support="argmax"),
    KDSpec(divergence="reverse_kl", reverse_kl_estimator="mc"),
    KDSpec(alpha=0.0),  # pure CE
    KDSpec(divergence="jsd", alpha=0.5, sft_alpha=1.0),
]


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_all_masked_is_zero_without_nan(spec, student_kind):
    case = make_case(7, 11, 3, seed=41)
    # garbage in the masked rows must not matter
    teacher = TeacherSignal(
        case.ids,
        torch.full_like(case.teacher.logprobs, math.nan),
        torch.full_like(case.teacher.tail_logprob, math.inf),
        torch.full_like(case.teacher.token_logprob, math.nan),
    )
    case.teacher = teacher
    mask = torch.zeros(7, dtype=torch.bool)
    out = None

    def fn(s, t):
        nonlocal out
        out = kd_loss(s, t, spec=spec, targets=case.targets, mask=mask, chunk_tokens=3)
        return out.loss

    loss, our_grads, _, _ = run_ours(case, student_kind, fn)
    assert loss.item() == 0.0
    for g in our_grads:
        assert torch.equal(g, torch.zeros_like(g))
    for value in out.stats.values():
        assert value.item() == 0.0


@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_masked_rows_equal_the_subset(student_kind):
    case = make_case(13, 257, 3, seed=43)
    mask = torch.rand(13, generator=torch.Generator().manual_seed(1)) < 0.6
    spec = KDSpec(divergence="jsd", beta=0.4, temperature=1.3)
    loss, our_grads, ref_in, to_logits = run_ours(
        case,
        student_kind,
        lambda s, t: kd_loss(s, t, spec=spec, mask=mask, chunk_tokens=4).loss,
    )
    ref = ref_loss(case, to_logits(ref_in), "jsd", "tail_bucket", 1.3, 0.4, mask=mask)
    check_against_ref(loss, our_grads, ref, ref_in)
    if student_kind == "logits":  # masked rows get exactly zero gradient
        assert torch.equal(our_grads[0][~mask], torch.zeros_like(our_grads[0][~mask]))


def test_empty_input():
    case = make_case(1, 11, 3, seed=0)
    logits = torch.zeros(0, 11, requires_grad=True)
    teacher = TeacherSignal(
        case.ids[:0], case.teacher.logprobs[:0], case.teacher.tail_logprob[:0], None
    )
    loss = jsd_sum(logits, teacher)
    (g,) = grads(loss, [logits])
    assert loss.item() == 0.0 and g.shape == (0, 11)


# ---- full support: K == V equals the dense full-vocabulary divergence ------------------------


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("v", [11, 257])
def test_full_support_equals_dense(divergence, beta, tail, temperature, v):
    case = make_case(7, v, v, seed=51 + v)
    assert torch.isinf(case.teacher.tail_logprob).all()  # log(0): the empty tail
    fn, kw = divergence_fn(divergence, beta)
    loss, our_grads, ref_in, to_logits = run_ours(
        case, "logits", fn, tail=tail, temperature=temperature, **kw
    )
    q = (to_logits(ref_in) / temperature).softmax(1)  # dense, full vocabulary
    p = (case.teacher_logp / temperature).softmax(1)
    ref = temperature**2 * ref_divergence(q, p, divergence, 0.5 if beta is None else beta).sum()
    check_against_ref(loss, our_grads, ref, ref_in)
    assert all(torch.isfinite(g).all() for g in our_grads)


@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_tiny_student_tail_is_exact(student_kind):
    """A student tail of ~1e-11: log(1 - sum(top-k probs)) in float32 would give log(0)."""
    case = make_case(7, 257, 3, seed=55)
    outside = torch.ones(7, 257, dtype=torch.bool).scatter(1, case.ids, False)
    logits64 = case.logits64(case.hidden, case.weight, case.bias)
    logits64 = torch.where(outside, logits64 - 30.0, logits64)  # tail ~ 250 e^-30 ~ 2e-11
    logits = logits64.float().requires_grad_()
    loss = forward_kl_sum(logits, case.teacher)
    ref_in = logits.detach().to(F64).requires_grad_()
    q = ref_in.log_softmax(1)
    assert (torch.logsumexp(q.masked_fill(~outside, -math.inf), 1) < -20).all()
    ref = ref_loss(case, ref_in, "forward_kl", "tail_bucket", 1.0)
    check_against_ref(loss, grads(loss, [logits]), ref, [ref_in])


# ---- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 3e-2, 3e-2)]
)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", None), ("jsd", 0.5)])
def test_head_dtypes(dtype, rtol, atol, divergence, beta):
    """bf16 hidden / weight: the head matmul rounds the logits to bf16, hence looser tolerances.

    The reference takes the same bf16-rounded inputs, in float64.
    """
    case = make_case(13, 257, 3, seed=61, h=32)
    fn, kw = divergence_fn(divergence, beta)
    loss, our_grads, ref_in, to_logits = run_ours(
        case, "head", fn, dtype=dtype, chunk_tokens=6, **kw
    )
    assert loss.dtype == torch.float32
    assert [g.dtype for g in our_grads] == [dtype] * 3
    ref = ref_loss(case, to_logits(ref_in), divergence, "tail_bucket", 1.0, beta or 0.5)
    check_against_ref(loss, our_grads, ref, ref_in, rtol=rtol, atol=atol)


def test_bf16_logits_input():
    case = make_case(7, 257, 3, seed=63)
    logits = case.logits64(case.hidden, case.weight, case.bias).to(torch.bfloat16)
    logits.requires_grad_()
    loss = jsd_sum(logits, case.teacher)
    (g,) = grads(loss, [logits])
    ref_in = logits.detach().to(F64).requires_grad_()
    ref = ref_loss(case, ref_in, "jsd", "tail_bucket", 1.0)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    check_against_ref(loss, [g], ref, [ref_in], rtol=1e-2, atol=1e-2)


# ---- dual KL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["soft", "hard"])
@pytest.mark.parametrize("fkl", ["topk", "argmax"])
@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_dual_kl_matches_reference(gate, fkl, tail, student_kind):
    case = make_case(13, 257, 3, seed=71)
    temperature, gate_alpha = 1.5, 3.0
    logits64 = case.logits64(case.hidden, case.weight, case.bias)
    q, p = ref_buckets(logits64.log_softmax(1), case.teacher_logp, case.ids, tail, temperature)
    rkl = ref_kl(q, p)
    tau = rkl.median().item() + 1e-3  # a mix of both sides of the gate, no ties
    kw = dict(tau=tau, gate=gate, gate_alpha=gate_alpha, forward_kl_support=fkl, tail=tail)
    out = None

    def fn(s, t):
        nonlocal out
        out = dual_kl(s, t, temperature=temperature, chunk_tokens=4, **kw)
        return out.loss

    loss, our_grads, ref_in, to_logits = run_ours(case, student_kind, fn)

    q, p = ref_buckets(
        to_logits(ref_in).log_softmax(1), case.teacher_logp, case.ids, tail, temperature
    )
    rkl = ref_kl(q, p)
    d = rkl.detach()
    lam = torch.sigmoid(gate_alpha * (tau - d)) if gate == "soft" else (d < tau).to(F64)
    fkl_t = ref_argmax_fkl(q, p, 3) if fkl == "argmax" else ref_kl(p, q)
    ref = temperature**2 * (lam * rkl + (1 - lam) * fkl_t).sum()
    check_against_ref(loss, our_grads, ref, ref_in)
    assert_close64(out.stats["gate"], lam.sum(), rtol=1e-5, atol=1e-5)
    assert out.stats["tokens"].item() == 13
    if gate == "hard":
        assert 0 < out.stats["gate"].item() < 13


def test_dual_kl_gate_extremes():
    case = make_case(7, 257, 3, seed=73)
    logits = case.logits64(case.hidden, case.weight, case.bias).float()
    always_rkl = dual_kl(logits, case.teacher, tau=math.inf, gate="hard")
    never_rkl = dual_kl(logits, case.teacher, tau=-math.inf, gate="hard")
    assert always_rkl.stats["gate"].item() == 7 and never_rkl.stats["gate"].item() == 0
    torch.testing.assert_close(always_rkl.loss, reverse_kl_sum(logits, case.teacher))
    torch.testing.assert_close(never_rkl.loss, forward_kl_sum(logits, case.teacher))


# ---- the Monte Carlo reverse KL --------------------------------------------------------------


def test_mc_reverse_kl_is_unbiased_in_value_and_gradient():
    """Sample tokens from the student; average estimate and gradient vs the exact full-vocab RKL."""
    v, samples = 11, 40_000
    g = torch.Generator().manual_seed(81)
    teacher_logp = (2.0 * torch.randn(v, generator=g, dtype=F64)).log_softmax(0)
    row = (1.5 * torch.randn(v, generator=g, dtype=F64)).requires_grad_()
    q_logp = row.log_softmax(0)
    exact = (q_logp.exp() * (q_logp - teacher_logp)).sum()
    (exact_grad,) = torch.autograd.grad(exact, [row])

    y = torch.multinomial(q_logp.detach().exp(), samples, replacement=True, generator=g)
    ids = teacher_logp.topk(3).indices.expand(samples, 3)
    teacher = TeacherSignal(
        ids=ids,
        logprobs=teacher_logp[ids].float(),
        tail_logprob=torch.zeros(samples),  # unused by the MC estimate
        token_logprob=teacher_logp[y].float(),
    )
    row32 = row.detach().float().requires_grad_()
    logits = row32.expand(samples, v)
    loss = reverse_kl_sum(logits, teacher, reverse_kl_estimator="mc", targets=y, chunk_tokens=8192)
    (grad,) = grads(loss, [row32])
    mean, mean_grad = loss.item() / samples, grad.to(F64) / samples

    # per-sample values and score-function gradients, float64
    d = (q_logp.detach()[y] - teacher_logp[y]).to(F64)
    per_grad = d[:, None] * (torch.nn.functional.one_hot(y, v).to(F64) - q_logp.detach().exp())
    assert abs(mean - d.mean().item()) < 1e-4  # ours is the estimator we think it is
    assert abs(mean - exact.item()) < 5 * d.std().item() / math.sqrt(samples)
    tol = 5 * per_grad.std(0) / math.sqrt(samples) + 1e-6
    assert ((mean_grad - exact_grad).abs() <= tol).all(), (mean_grad, exact_grad, tol)
    # the naive pathwise gradient of log q(y) - log p(y) would average to ~0, not to the RKL's
    assert exact_grad.abs().max() > 10 * tol.max()

    # the same estimator inside dual KL with the gate pinned to reverse KL
    dual = dual_kl(logits, teacher, tau=math.inf, gate="hard", reverse_kl_estimator="mc", targets=y)
    torch.testing.assert_close(dual.loss, loss)


# ---- CE and the SKD mix ----------------------------------------------------------------------


@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_ce_matches_reference(student_kind):
    case = make_case(13, 257, 3, seed=91)
    mask = torch.ones(13, dtype=torch.bool)
    mask[0] = False
    loss, our_grads, ref_in, to_logits = run_ours(
        case,
        student_kind,
        lambda s, t: kd_sum(s, None, mask, alpha=0.0, targets=case.targets, chunk_tokens=5),
    )
    logp = to_logits(ref_in).log_softmax(1)
    ref = -logp.gather(1, case.targets[:, None])[:, 0][mask].sum()
    check_against_ref(loss, our_grads, ref, ref_in)


@pytest.mark.parametrize("student_kind", ["logits", "head"])
def test_skd_mix_and_stats(student_kind):
    case = make_case(13, 257, 3, seed=93)
    t, alpha, sft_alpha = 2.0, 0.3, 0.25
    spec = KDSpec(divergence="jsd", beta=0.5, temperature=t, alpha=alpha, sft_alpha=sft_alpha)
    out = None

    def fn(s, teacher):
        nonlocal out
        out = kd_loss(s, teacher, spec=spec, targets=case.targets, chunk_tokens=4)
        return out.loss

    loss, our_grads, ref_in, to_logits = run_ours(case, student_kind, fn)
    logits = to_logits(ref_in)
    kd = ref_loss(case, logits, "jsd", "tail_bucket", t) / t**2
    ce = -logits.log_softmax(1).gather(1, case.targets[:, None]).sum()
    ref = alpha * t**2 * kd + (1 - alpha + sft_alpha) * ce
    check_against_ref(loss, our_grads, ref, ref_in)
    assert_close64(out.stats["kd"], kd, rtol=2e-5, atol=1e-5)
    assert_close64(out.stats["ce"], ce, rtol=2e-5, atol=1e-5)
    assert out.stats["tokens"].item() == 13 and "gate" not in out.stats


def test_pure_kd_needs_no_targets_and_pure_ce_no_teacher():
    case = make_case(7, 11, 3)
    logits = case.logits64(case.hidden, case.weight, case.bias).float()
    kd = kd_loss(logits, case.teacher, spec=KDSpec())
    assert set(kd.stats) == {"tokens", "kd"}
    ce = kd_loss(logits, None, spec=KDSpec(alpha=0.0), targets=case.targets)
    torch.testing.assert_close(ce.loss, kd_sum(logits, None, alpha=0.0, targets=case.targets))
    with pytest.raises(ValueError, match="targets"):
        kd_loss(logits, case.teacher, spec=KDSpec(alpha=0.5))
    with pytest.raises(ValueError, match="teacher"):
        kd_loss(logits, None, spec=KDSpec())


# ---- misc ------------------------------------------------------------------------------------


def test_no_grad_and_frozen_inputs():
    case = make_case(7, 257, 3, seed=95)
    h, w, b = case.leaves()
    with torch.no_grad():
        value = jsd_sum(LinearHead(h, w, b), case.teacher, chunk_tokens=3)
    assert not value.requires_grad
    w_frozen = w.detach()
    loss = jsd_sum(LinearHead(h, w_frozen), case.teacher, chunk_tokens=3)
    (gh,) = grads(loss, [h])
    ref_in = [h.detach().to(F64).requires_grad_()]
    ref = ref_loss(case, ref_in[0].to(F64) @ w_frozen.to(F64).T, "jsd", "tail_bucket", 1.0)
    check_against_ref(loss, [gh], ref, ref_in)
    torch.testing.assert_close(
        value, jsd_sum(LinearHead(h, w, b), case.teacher, chunk_tokens=7).detach()
    )


def test_backward_scales_with_the_upstream_gradient():
    case = make_case(7, 257, 3, seed=97)
    h, w, b = case.leaves()
    loss = forward_kl_sum(LinearHead(h, w, b), case.teacher, chunk_tokens=3)
    (g1,) = grads(loss, [w])
    loss = forward_kl_sum(LinearHead(h, w, b), case.teacher, chunk_tokens=3)
    (g2,) = grads(loss / 7.0, [w])
    torch.testing.assert_close(g2, g1 / 7.0)


def test_second_backward_is_refused():
    case = make_case(7, 11, 3, seed=98)
    h, w, b = case.leaves()
    loss = forward_kl_sum(LinearHead(h, w, b), case.teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_chunked_loss_with_a_custom_divergence():
    """The chunking takes any per-token function of the student logprobs (Liger-style)."""
    case = make_case(7, 257, 3, seed=99)
    logits = case.logits64(case.hidden, case.weight, case.bias).float().requires_grad_()

    def top1_nll(s, _):  # -log q at the first listed id, plus the tail, as a toy divergence
        per_token = -s.topk[:, 0] + s.tail.exp()
        return per_token, per_token.detach()[:, None]

    loss, stats = chunked_loss(
        logits,
        top1_nll,
        ids=case.ids,
        row_inputs=[case.teacher.logprobs],
        num_stats=1,
        chunk_tokens=3,
    )
    ref_logits = logits.detach().to(F64).requires_grad_()
    s = student_logprobs(ref_logits, case.ids)
    ref = (-s.topk[:, 0] + s.tail.exp()).sum()
    check_against_ref(loss, grads(loss, [logits]), ref, [ref_logits])
    assert_close64(stats[0], ref, rtol=1e-5, atol=1e-5)


def test_teacher_signal_from_shard_arrays():
    from shards.codec import TeacherTopK

    case = make_case(7, 257, 3, seed=7)
    topk = TeacherTopK(
        ids=case.ids.numpy().astype(np.int32),
        logprobs=case.teacher.logprobs.numpy(),
        tail_logprob=case.teacher.tail_logprob.numpy(),
        token_logprob=case.teacher.token_logprob.numpy(),
    )
    signal = TeacherSignal.from_topk(topk)
    assert signal.ids.dtype == torch.long and signal.k == 3 and signal.num_tokens == 7
    torch.testing.assert_close(signal.logprobs, case.teacher.logprobs)
    with pytest.raises(ValueError):
        TeacherSignal(case.ids, case.teacher.logprobs[:, :2], case.teacher.tail_logprob)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(divergence="nope"),
        dict(tail="drop"),
        dict(temperature=0.0),
        dict(beta=1.5),
        dict(alpha=-0.1),
        dict(sft_alpha=-1.0),
        dict(divergence="jsd", reverse_kl_estimator="mc"),
        dict(divergence="reverse_kl", reverse_kl_estimator="mc", temperature=2.0),
        dict(divergence="reverse_kl", forward_kl_support="argmax"),
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        KDSpec(**kwargs)

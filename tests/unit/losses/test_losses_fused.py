"""fused_linear_kd_loss: chunked value and gradients equal the dense computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import LOSSES, SparseTargets, fused_linear_kd_loss, generalized_jsd, kd_loss
from distill.losses.fused import default_chunk_size

KWARGS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.2}}


def _problem(n, h, v, seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    teacher = (2 * torch.randn(n, v, generator=g)).to(dtype)
    mask = torch.rand(n, generator=g) > 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) > 0.7] = -100
    return hidden, weight, b, teacher, mask, labels


def _dense(hidden, weight, bias, teacher, *, ce_weight=0.0, labels=None, **kw):
    """The plain computation: materialise the logits, then kd_loss (+ CE on unscaled logits)."""
    logits = F.linear(hidden, weight, bias)
    out = kd_loss(logits, teacher, **kw)
    if ce_weight:
        counted = labels != -100
        nll = F.cross_entropy(
            logits.float() if logits.dtype != torch.float64 else logits,
            labels,
            reduction="sum",
            ignore_index=-100,
        )
        out = out + ce_weight * nll / max(int(counted.sum()), 1)
    return out


def _grads(value, params):
    return torch.autograd.grad(value, [p for p in params if p is not None])


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_equals_dense_every_loss(name, sparse):
    hidden, weight, bias, teacher, mask, labels = _problem(11, 6, 29, seed=1)
    kw = KWARGS.get(name, {})
    t = SparseTargets.from_logits(teacher, 5, temperature=1.5) if sparse else teacher
    args = dict(loss=name, temperature=2.0, mask=mask, **kw)
    dense = _dense(hidden, weight, bias, t, ce_weight=0.4, labels=labels, **args)
    g_dense = _grads(dense, (hidden, weight, bias))
    for chunk in (1, 3, 4, 11, 64, None):
        fused = fused_linear_kd_loss(
            hidden, weight, t, chunk_size=chunk, labels=labels, ce_weight=0.4, lm_head_bias=bias, **args
        )
        assert fused.item() == pytest.approx(dense.item(), rel=1e-12, abs=1e-14), chunk
        for a, b in zip(_grads(fused, (hidden, weight, bias)), g_dense):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 17),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["dense", "topk", "sampled"]),
    tail=st.sampled_from(["bucket", "renormalize"]),
)
def test_chunked_equals_dense_any_chunk_size(n, chunk, seed, kind, tail):
    hidden, weight, bias, teacher, mask, _ = _problem(n, 4, 13, seed=seed)
    if kind == "topk":
        teacher = SparseTargets.from_logits(teacher, 3)
    elif kind == "sampled":
        teacher = SparseTargets.sample_from_logits(teacher, 4, generator=torch.Generator().manual_seed(seed))
    dense = _dense(hidden, weight, bias, teacher, mask=mask, tail=tail)
    fused = fused_linear_kd_loss(
        hidden, weight, teacher, chunk_size=chunk, mask=mask, tail=tail, lm_head_bias=bias
    )
    assert fused.item() == pytest.approx(dense.item(), rel=1e-11, abs=1e-13)
    for a, b in zip(_grads(fused, (hidden, weight, bias)), _grads(dense, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradcheck_float64():
    hidden, weight, bias, teacher, mask, labels = _problem(5, 2, 7, seed=2)
    sparse = SparseTargets.from_logits(teacher, 3, temperature=0.8)

    def f(h, w, b):
        return fused_linear_kd_loss(
            h,
            w,
            teacher,
            loss="generalized_jsd",
            beta=0.4,
            chunk_size=3,
            mask=mask,
            labels=labels,
            ce_weight=0.5,
            lm_head_bias=b,
            temperature=1.3,
        )

    def g(h, w, b):
        return fused_linear_kd_loss(h, w, sparse, loss="reverse_kl", chunk_size=2, mask=mask, lm_head_bias=b)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))
    assert torch.autograd.gradcheck(g, (hidden, weight, bias))


def test_float32_large_vocabulary_32k():
    hidden, weight, _, teacher, mask, labels = _problem(
        40, 16, 32_000, seed=3, dtype=torch.float32, bias=False
    )
    dense = _dense(hidden, weight, None, teacher, mask=mask, ce_weight=1.0, labels=labels)
    fused = fused_linear_kd_loss(
        hidden, weight, teacher, mask=mask, labels=labels, ce_weight=1.0, chunk_size=7
    )
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(dense.item(), rel=1e-5)
    for a, b in zip(_grads(fused, (hidden, weight)), _grads(dense, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert (
        default_chunk_size(32_000) == 131
        and default_chunk_size(128_256) == 32
        and default_chunk_size(2**30) == 1
    )


def test_liger_weighting_reproduced():
    """Liger: w_hard * NLL(unscaled logits) + w_soft * JSD_beta(z / T), both per token, no T² (0.5 / 0.5)."""
    hidden, weight, _, teacher, _, labels = _problem(9, 5, 21, seed=4, bias=False)
    labels[:] = labels.clamp(min=0)  # Liger counts tokens by labels; every position labelled here
    logits = hidden @ weight.T
    liger = 0.5 * F.cross_entropy(logits, labels) + 0.5 * generalized_jsd(
        logits, teacher, beta=0.5, temperature=2.0
    )
    ours = 0.5 * fused_linear_kd_loss(
        hidden,
        weight,
        teacher,
        loss="generalized_jsd",
        beta=0.5,
        temperature=2.0,
        labels=labels,
        ce_weight=1.0,
    )
    assert ours.item() == pytest.approx(liger.item(), rel=1e-12)


def test_nothing_counts_gives_zero_and_zero_gradient():
    hidden, weight, bias, teacher, _, labels = _problem(6, 4, 10, seed=5)
    none = torch.zeros(6, dtype=torch.bool)
    value = fused_linear_kd_loss(
        hidden,
        weight,
        teacher,
        mask=none,
        labels=torch.full_like(labels, -100),
        ce_weight=1.0,
        lm_head_bias=bias,
    )
    grads = _grads(value, (hidden, weight, bias))
    assert value.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)
    # masked rows are never read: NaN teacher logits there change nothing
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False
    bad = teacher.clone()
    bad[2] = float("nan")
    a = fused_linear_kd_loss(hidden, weight, bad, mask=mask, chunk_size=4)
    b = _dense(hidden, weight, None, teacher, mask=mask)
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-12)


def test_extreme_hidden_states_stay_finite():
    hidden, weight, _, teacher, _, labels = _problem(5, 4, 12, seed=6, dtype=torch.float32, bias=False)
    with torch.no_grad():
        hidden.mul_(1e4)
    for t in (teacher, SparseTargets.from_logits(teacher, 3)):
        for name in ("forward_kl", "reverse_kl"):
            value = fused_linear_kd_loss(
                hidden, weight, t, loss=name, labels=labels, ce_weight=0.5, chunk_size=2
            )
            grads = _grads(value, (hidden, weight))
            assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)


def test_teacher_with_minus_inf_logits():
    # A teacher that bans tokens (logit -inf): p_T = 0 there, and those entries contribute 0.
    hidden, weight, _, teacher, _, _ = _problem(6, 4, 12, seed=9, bias=False)
    teacher[:, :3] = float("-inf")
    for name in ("forward_kl", "soft_cross_entropy", "generalized_jsd"):
        fused = fused_linear_kd_loss(hidden, weight, teacher, loss=name, chunk_size=4, temperature=1.5)
        dense = _dense(hidden, weight, None, teacher, loss=name, temperature=1.5)
        assert torch.isfinite(fused) and fused.item() == pytest.approx(dense.item(), rel=1e-12)
        for a, b in zip(_grads(fused, (hidden, weight)), _grads(dense, (hidden, weight))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_batched_shapes_frozen_head_and_bf16():
    hidden, weight, _, teacher, mask, labels = _problem(12, 8, 20, seed=7, dtype=torch.float32, bias=False)
    frozen = weight.detach()
    value = fused_linear_kd_loss(
        hidden.view(3, 4, 8), frozen, teacher.view(3, 4, 20), mask=mask.view(3, 4), chunk_size=5
    )
    (g,) = torch.autograd.grad(value, hidden)
    dense = _dense(hidden, frozen, None, teacher, mask=mask)
    (gd,) = torch.autograd.grad(dense, hidden)
    assert value.item() == pytest.approx(dense.item(), rel=1e-6)
    torch.testing.assert_close(g, gd)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    vb = fused_linear_kd_loss(hb, wb, teacher.bfloat16(), chunk_size=5)
    gh, gw = torch.autograd.grad(vb, (hb, wb))
    assert vb.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    ref = _dense(hb, wb, None, teacher.bfloat16())
    assert vb.item() == pytest.approx(ref.item(), rel=1e-3)


def test_bad_input_is_named():
    hidden, weight, _, teacher, _, labels = _problem(4, 3, 8, seed=8, bias=False)
    with pytest.raises(ValueError, match=r"student_hidden must be \(N, 3\)"):
        fused_linear_kd_loss(hidden[:, :2], weight, teacher)
    with pytest.raises(ValueError, match=r"teacher logits must have shape \(4, 8\)"):
        fused_linear_kd_loss(hidden, weight, teacher[:, :7])
    with pytest.raises(ValueError, match="labels are required when ce_weight > 0"):
        fused_linear_kd_loss(hidden, weight, teacher, ce_weight=1.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\] or -100, got 8"):
        fused_linear_kd_loss(hidden, weight, teacher, ce_weight=1.0, labels=torch.full((4,), 8))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1 or None, got 0"):
        fused_linear_kd_loss(hidden, weight, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="ce_weight must be a finite number >= 0"):
        fused_linear_kd_loss(hidden, weight, teacher, ce_weight=-1.0, labels=labels)
    with pytest.raises(ValueError, match=r"lm_head_bias must have shape \(8,\)"):
        fused_linear_kd_loss(hidden, weight, teacher, lm_head_bias=torch.zeros(7))
    with pytest.raises(ValueError, match="unknown loss 'jsd'"):
        fused_linear_kd_loss(hidden, weight, teacher, loss="jsd")

"""Dense divergences in distill.losses against independent float64 references and other libraries' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import (
    LOSSES,
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)

NAMES = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "soft_cross_entropy",
    "uld",
]
KWARGS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.2}}


# --- references written from the formulas, numpy float64, one position at a time -----------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def _ref_row(name: str, zs: np.ndarray, zt: np.ndarray, temperature: float, **kw) -> float:
    p_s, p_t = _softmax(zs / temperature), _softmax(zt / temperature)
    if name == "forward_kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "generalized_jsd":
        b = kw["beta"]
        if b == 0:
            return _kl(p_t, p_s)
        if b == 1:
            return _kl(p_s, p_t)
        m = b * p_t + (1 - b) * p_s
        return b * _kl(p_t, m) + (1 - b) * _kl(p_s, m)
    if name == "skew_kl":
        return _kl(p_t, kw["skew"] * p_t + (1 - kw["skew"]) * p_s)
    if name == "skew_reverse_kl":
        return _kl(p_s, kw["skew"] * p_s + (1 - kw["skew"]) * p_t)
    if name == "tvd":
        return 0.5 * float(np.abs(p_t - p_s).sum())
    if name == "soft_cross_entropy":
        return float(-(p_t * np.log(p_s)).sum())
    if name == "uld":  # Boizard et al.: L1 distance of the probability vectors sorted descending
        return float(np.abs(np.sort(p_s)[::-1] - np.sort(p_t)[::-1]).sum())
    raise AssertionError(name)


def _reference(name, zs, zt, temperature=1.0, mask=None, **kw) -> float:
    zs = zs.detach().double().numpy().reshape(-1, zs.shape[-1])
    zt = zt.detach().double().numpy().reshape(-1, zt.shape[-1])
    keep = np.ones(len(zs), bool) if mask is None else mask.numpy().reshape(-1)
    vals = [_ref_row(name, a, b, temperature, **kw) for a, b, k in zip(zs, zt, keep) if k]
    return float(np.mean(vals)) if vals else 0.0


def _logits(*shape, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
def test_matches_float64_reference(name, temperature):
    zs, zt = _logits(3, 4, 17, seed=1), _logits(3, 4, 17, seed=2)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) > 0.3
    kw = KWARGS.get(name, {})
    got = LOSSES[name](zs, zt, temperature=temperature, mask=mask, **kw)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(
        _reference(name, zs, zt, temperature, mask, **kw), rel=1e-10, abs=1e-12
    )
    # float32 input: computed in float32, same number to float32 precision
    got32 = LOSSES[name](zs.float(), zt.float(), temperature=temperature, mask=mask, **kw)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-4, abs=1e-6)


def test_losses_dict_is_the_uniform_call():
    assert set(LOSSES) == set(NAMES)
    assert "hinton" not in LOSSES  # different signature (labels, alpha, T²)
    zs, zt = _logits(2, 9, seed=4), _logits(2, 9, seed=5)
    for name, fn in LOSSES.items():
        value = fn(zs, zt, temperature=1.3, mask=None, **KWARGS.get(name, {}))
        assert torch.isfinite(value)
        # kd_loss with a dense teacher is exactly LOSSES[name]
        assert kd_loss(zs, zt, loss=name, temperature=1.3, **KWARGS.get(name, {})).item() == value.item()


def test_trl_generalized_jsd_loss_reimplemented():
    """TRL's GKD `generalized_jsd_loss` (KD-NOTES), reduction batchmean with labels, rewritten here."""

    def trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
        student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
        if beta == 0:
            jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
        elif beta == 1:
            jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
        else:
            b = torch.tensor(beta, dtype=student_log_probs.dtype)
            mixture = torch.logsumexp(
                torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]), dim=0
            )
            kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
            kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
            jsd = b * kl_teacher + (1 - b) * kl_student
        mask = labels != -100
        return jsd[mask].sum() / mask.sum()

    zs, zt = _logits(2, 6, 23, seed=6), _logits(2, 6, 23, seed=7)
    labels = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(8))
    labels[0, :2] = -100
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temperature in (1.0, 2.0):
            trl = trl_generalized_jsd_loss(zs, zt, labels, beta, temperature)
            ours = generalized_jsd(zs, zt, beta=beta, temperature=temperature, mask=labels != -100)
            assert ours.item() == pytest.approx(trl.item(), rel=1e-10, abs=1e-13)


def test_torchtune_and_distillkit_conventions():
    zs, zt = _logits(3, 5, 11, seed=9), _logits(3, 5, 11, seed=10)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    # torchtune ForwardKLLoss: -sum_tokens sum_v p_T log p_S / #tokens (soft cross-entropy)
    p_t = F.softmax(zt, -1)
    tt_forward = -((p_t * F.log_softmax(zs, -1)).sum(-1) * mask).sum() / mask.sum()
    assert soft_cross_entropy(zs, zt, mask=mask).item() == pytest.approx(tt_forward.item(), rel=1e-12)
    # ... which is forward KL plus the teacher's entropy
    h_t = (-(p_t * F.log_softmax(zt, -1)).sum(-1) * mask).sum() / mask.sum()
    fkl = forward_kl(zs, zt, mask=mask)
    assert (fkl + h_t).item() == pytest.approx(tt_forward.item(), rel=1e-12)
    # torchtune ReverseKLLoss: the true KL(S || T)
    p_s = F.softmax(zs, -1)
    tt_reverse = ((p_s * (F.log_softmax(zs, -1) - F.log_softmax(zt, -1))).sum(-1) * mask).sum() / mask.sum()
    assert reverse_kl(zs, zt, mask=mask).item() == pytest.approx(tt_reverse.item(), rel=1e-12)
    # DistillKit: sum_tokens KL * T² / #tokens = T² x ours (we apply no T²)
    t = 3.0
    dk = F.kl_div(F.log_softmax(zs / t, -1), F.log_softmax(zt / t, -1), reduction="none", log_target=True)
    dk = (dk.sum(-1) * mask).sum() * t**2 / mask.sum()
    assert (t**2 * forward_kl(zs, zt, temperature=t, mask=mask)).item() == pytest.approx(dk.item(), rel=1e-12)


def test_jsd_and_skew_endpoints():
    zs, zt = _logits(4, 13, seed=11), _logits(4, 13, seed=12)
    fkl, rkl = forward_kl(zs, zt), reverse_kl(zs, zt)
    assert generalized_jsd(zs, zt, beta=0.0).item() == fkl.item()
    assert generalized_jsd(zs, zt, beta=1.0).item() == rkl.item()
    # the documented jump: the interior tends to 0 at both ends
    assert generalized_jsd(zs, zt, beta=1e-4).item() < 1e-3 * fkl.item()
    assert generalized_jsd(zs, zt, beta=1 - 1e-4).item() < 1e-3 * rkl.item()
    assert generalized_jsd(zs, zt, beta=0.5).item() <= math.log(2)
    assert skew_kl(zs, zt, skew=0.0).item() == fkl.item()
    assert skew_reverse_kl(zs, zt, skew=0.0).item() == rkl.item()
    assert skew_kl(zs, zt, skew=1.0).item() == pytest.approx(0.0, abs=1e-15)
    assert skew_reverse_kl(zs, zt, skew=1.0).item() == pytest.approx(0.0, abs=1e-15)
    assert 0.0 <= tvd(zs, zt).item() <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    zs = _logits(2, 3, 7, seed=13).requires_grad_()
    zt = _logits(2, 3, 7, seed=14)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    kw = KWARGS.get(name, {})
    assert torch.autograd.gradcheck(lambda z: LOSSES[name](z, zt, temperature=1.7, mask=mask, **kw), (zs,))


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_is_zero_with_zero_gradient_and_masked_rows_are_never_read(name):
    zs = _logits(2, 3, 7, seed=15).requires_grad_()
    zt = _logits(2, 3, 7, seed=16)
    kw = KWARGS.get(name, {})
    value = LOSSES[name](zs, zt, mask=torch.zeros(2, 3, dtype=torch.bool), **kw)
    value.backward()
    assert value.item() == 0.0 and zs.grad is not None and torch.count_nonzero(zs.grad) == 0
    # garbage at masked positions (padding) does not leak into the value or the gradient
    zt_bad, mask = zt.clone(), torch.ones(2, 3, dtype=torch.bool)
    zt_bad[1, 2] = float("nan")
    mask[1, 2] = False
    zs.grad = None
    value = LOSSES[name](zs, zt_bad, mask=mask, **kw)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all() and torch.count_nonzero(zs.grad[1, 2]) == 0
    assert value.item() == pytest.approx(_reference(name, zs, zt, 1.0, mask, **kw), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_stay_finite(name):
    g = torch.Generator().manual_seed(17)
    zs = (1e4 * torch.randint(-1, 2, (4, 33), generator=g)).float().requires_grad_()
    zt = (1e4 * torch.randint(-1, 2, (4, 33), generator=g)).float()
    value = LOSSES[name](zs, zt, temperature=0.5, **KWARGS.get(name, {}))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


def test_teacher_is_constant_and_half_precision_is_upcast():
    zs = _logits(3, 10, seed=18, dtype=torch.bfloat16).requires_grad_()
    zt = _logits(3, 10, seed=19, dtype=torch.bfloat16).requires_grad_()
    value = forward_kl(zs, zt)
    assert value.dtype == torch.float32
    value.backward()
    assert zt.grad is None and zs.grad is not None and zs.grad.dtype == torch.bfloat16
    ref = _reference("forward_kl", zs.float(), zt.float())
    assert value.item() == pytest.approx(ref, rel=1e-5)


def test_large_vocabulary_32k():
    v = 32_000
    zs, zt = (
        _logits(3, v, scale=3.0, seed=20, dtype=torch.float32),
        _logits(3, v, scale=3.0, seed=21, dtype=torch.float32),
    )
    for name in NAMES:
        kw = KWARGS.get(name, {})
        got = LOSSES[name](zs, zt, temperature=2.0, **kw).item()
        assert got == pytest.approx(_reference(name, zs, zt, 2.0, **kw), rel=2e-4, abs=1e-5), name


def test_bad_input_is_named():
    zs, zt = _logits(2, 5, seed=22), _logits(2, 5, seed=23)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 5\).*\(2, 6\)"):
        forward_kl(zs, _logits(2, 6))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        forward_kl(zs, zt, temperature=0)
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\)"):
        forward_kl(zs, zt, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        forward_kl(zs, zt, mask=torch.ones(2))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        generalized_jsd(zs, zt, beta=1.5)
    with pytest.raises(ValueError, match=r"skew must be in \[0, 1\]"):
        skew_kl(zs, zt, skew=-0.1)
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        kd_loss(zs, zt, loss="kl")
    with pytest.raises(ValueError, match=r"loss 'forward_kl' takes no argument\(s\) \['beta'\]"):
        kd_loss(zs, zt, loss="forward_kl", beta=0.5)


# --- properties ---------------------------------------------------------------------------------------
_shapes = st.tuples(st.integers(1, 5), st.integers(2, 12))


@settings(max_examples=30, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**16), name=st.sampled_from(NAMES), t=st.floats(0.3, 4.0))
def test_properties(shape, seed, name, t):
    n, v = shape
    zs, zt = _logits(n, v, scale=3.0, seed=seed), _logits(n, v, scale=3.0, seed=seed + 1)
    kw = KWARGS.get(name, {})
    value = LOSSES[name](zs, zt, temperature=t, **kw)
    if name != "soft_cross_entropy":  # soft CE is >= H(T), not >= 0 at equality
        assert value.item() >= -1e-12
        assert LOSSES[name](zs, zs.clone(), temperature=t, **kw).item() == pytest.approx(0.0, abs=1e-12)
    else:
        assert value.item() >= forward_kl(zs, zt, temperature=t).item() - 1e-12
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.4
    a = LOSSES[name](zs, zt, temperature=t, mask=mask, **kw)
    b = LOSSES[name](zs[perm], zt[perm], temperature=t, mask=mask[perm], **kw)
    assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-14)

"""ULD (sorted-probability distance): dense and top-k forms against float64 references, gradcheck, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import LOSSES, uld, uld_topk


def _logits(*shape, seed=0, scale=2.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _ref_topk(zs, lp_t, temperature=1.0, capture=1.0) -> float:
    p_s = _softmax(zs / temperature)
    k = min(len(lp_t), len(zs))
    top_s = np.sort(p_s)[::-1][:k]
    p_t = np.sort(np.exp(lp_t))[::-1][:k]
    r_t = max(1 - p_t.sum(), 0.0)
    rho = capture / temperature
    if rho != 1:
        p_t, r_t = p_t**rho, r_t**rho
        norm = p_t.sum() + r_t
        p_t, r_t = p_t / norm, r_t / norm
    return float(np.abs(top_s - p_t).sum() + abs(max(1 - top_s.sum(), 0.0) - r_t))


def test_uld_is_registered_and_permutation_invariant():
    assert LOSSES["uld"] is uld
    zs = _logits(3, 11, seed=1)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(2))
    assert uld(zs, zs[:, perm]).item() == pytest.approx(
        0.0, abs=1e-12
    )  # a relabelled vocabulary costs nothing
    assert 0 < uld(zs, _logits(3, 11, seed=3)).item() <= 2


@pytest.mark.parametrize(("temperature", "capture"), [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0)])
def test_uld_topk_matches_float64_reference(temperature, capture):
    zs = _logits(4, 30, seed=4)
    teacher = (
        torch.log_softmax(_logits(4, 50, seed=5) / capture, -1).topk(6).values
    )  # another vocabulary size
    teacher[1, 4:] = -torch.inf  # padding
    mask = torch.tensor([True, True, False, True])
    got = uld_topk(zs, teacher, temperature=temperature, capture_temperature=capture, mask=mask)
    want = np.mean(
        [_ref_topk(zs[i].numpy(), teacher[i].numpy(), temperature, capture) for i in range(4) if mask[i]]
    )
    assert got.dtype == torch.float64 and got.item() == pytest.approx(want, rel=1e-10)


def test_uld_topk_gradcheck_and_empty_mask():
    zs = _logits(3, 9, seed=6).requires_grad_()
    teacher = torch.log_softmax(_logits(3, 14, seed=7), -1).topk(4).values
    assert torch.autograd.gradcheck(lambda z: uld_topk(z, teacher, temperature=1.3), (zs,))
    zero = uld_topk(zs, teacher, mask=torch.zeros(3, dtype=torch.bool))
    assert zero.item() == 0.0
    zero.backward()
    assert zs.grad is not None and float(zs.grad.abs().sum()) == 0.0


@settings(max_examples=30, deadline=None)
@given(v=st.integers(2, 20), vt=st.integers(2, 40), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_uld_topk_properties(v, vt, k, seed):
    zs = _logits(2, v, seed=seed)
    teacher = torch.log_softmax(_logits(2, vt, seed=seed + 1), -1)
    top = teacher.topk(min(k, vt)).values
    value = uld_topk(zs, top).item()
    assert -1e-12 <= value <= 2 + 1e-9
    # the student's own sorted top-k as the teacher's: 0
    own = torch.log_softmax(zs, -1).topk(min(k, v)).values
    assert uld_topk(zs, own).item() == pytest.approx(0.0, abs=1e-12)

"""Sparse teacher signals: SparseTargets validation, top-k bucket/renormalize, sampled estimator, temperatures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import LOSSES, SparseTargets, kd_loss

KWARGS = {"generalized_jsd": {"beta": 0.3}, "skew_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.2}}


def _logits(*shape, scale=2.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


# --- references on probability vectors, numpy float64 --------------------------------------------------
def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(p, q):
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def _div(name, q, p, **kw):
    """Divergence between student q and teacher p (probability vectors)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "generalized_jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "tvd":
        return 0.5 * float(np.abs(p - q).sum())
    raise AssertionError(name)


def _topk_reference(name, zs, zt, k, tail, temperature, capture_temperature, **kw):
    """Bucket / renormalise built directly from the definitions, one position at a time."""
    zs = zs.detach().double().numpy().reshape(-1, zs.shape[-1])
    zt = zt.detach().double().numpy().reshape(-1, zt.shape[-1])
    rho = capture_temperature / temperature
    vals = []
    for a, b in zip(zs, zt):
        v = len(a)
        p_cap = _softmax(b / capture_temperature)
        ids = np.argsort(-p_cap)[:k]
        q = _softmax(a / temperature)
        if tail == "renormalize":
            w = p_cap[ids] ** rho
            vals.append(_div(name, q[ids] / q[ids].sum(), w / w.sum(), **kw))
            continue
        r = 1.0 - p_cap[ids].sum()
        n = v - k
        w = np.append(p_cap[ids] ** rho, n * (r / n) ** rho if n else 0.0)  # documented uniform-tail rule
        q_b = np.append(q[ids], 1.0 - q[ids].sum())
        vals.append(_div(name, q_b, w / w.sum(), **kw))
    return float(np.mean(vals))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(("temperature", "capture"), [(1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (3.0, 1.5)])
def test_topk_matches_float64_reference(name, tail, temperature, capture):
    zs, zt = _logits(2, 3, 19, seed=1), _logits(2, 3, 19, seed=2)
    targets = SparseTargets.from_logits(zt, 5, temperature=capture)
    kw = KWARGS.get(name, {})
    got = kd_loss(zs, targets, loss=name, tail=tail, temperature=temperature, **kw)
    ref = _topk_reference(name, zs, zt, 5, tail, temperature, capture, **kw)
    assert got.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_bucket_rescaling_is_exact_when_the_tail_is_uniform():
    # Teacher logits: 4 distinct top tokens, every other token the same logit -> the uniform-tail rule holds.
    v = 30
    zt = torch.full((3, v), -1.0, dtype=torch.float64)
    zt[:, :4] = torch.tensor([3.0, 2.0, 1.5, 0.5], dtype=torch.float64)
    zs = _logits(3, v, seed=3)
    for capture, temperature in [(1.0, 2.0), (2.0, 0.5), (1.0, 1.0)]:
        targets = SparseTargets.from_logits(zt, 4, temperature=capture)
        dense_at_t = SparseTargets.from_logits(zt, 4, temperature=temperature)  # top-k taken at T itself
        for name in ("forward_kl", "reverse_kl", "generalized_jsd"):
            a = kd_loss(zs, targets, loss=name, temperature=temperature)
            b = kd_loss(zs, dense_at_t, loss=name, temperature=temperature)
            assert a.item() == pytest.approx(b.item(), rel=1e-10)


def test_renormalize_is_exact_at_any_temperature():
    zs, zt = _logits(4, 25, seed=4), _logits(4, 25, seed=5)
    a = kd_loss(zs, SparseTargets.from_logits(zt, 6, temperature=0.8), tail="renormalize", temperature=2.2)
    b = kd_loss(zs, SparseTargets.from_logits(zt, 6, temperature=2.2), tail="renormalize", temperature=2.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    v=st.integers(2, 15),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(LOSSES)),
    tail=st.sampled_from(["bucket", "renormalize"]),
    temps=st.tuples(st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.5, 1.0, 3.0])),
)
def test_k_equals_v_equals_dense(n, v, seed, name, tail, temps):
    capture, temperature = temps
    zs = _logits(n, v, scale=3.0, seed=seed).requires_grad_()
    zt = _logits(n, v, scale=3.0, seed=seed + 1)
    kw = KWARGS.get(name, {})
    sparse = kd_loss(
        zs,
        SparseTargets.from_logits(zt, v, temperature=capture),
        loss=name,
        tail=tail,
        temperature=temperature,
        **kw,
    )
    (g_sparse,) = torch.autograd.grad(sparse, zs)
    dense = LOSSES[name](zs, zt, temperature=temperature, **kw)
    (g_dense,) = torch.autograd.grad(dense, zs)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    v=st.integers(3, 15),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(LOSSES)),
    tail=st.sampled_from(["bucket", "renormalize"]),
)
def test_topk_properties(n, v, k, seed, name, tail):
    zs, zt = _logits(n, v, scale=3.0, seed=seed), _logits(n, v, scale=3.0, seed=seed + 1)
    kw = KWARGS.get(name, {})
    targets = SparseTargets.from_logits(zt, k)
    value = kd_loss(zs, targets, loss=name, tail=tail, **kw)
    if name != "soft_cross_entropy":
        assert value.item() >= -1e-12
        # student equal to the teacher -> 0 (both sides built the same way)
        assert kd_loss(zt, targets, loss=name, tail=tail, **kw).item() == pytest.approx(0.0, abs=1e-12)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = SparseTargets(ids=targets.ids[perm], logprobs=targets.logprobs[perm])
    assert kd_loss(zs[perm], permuted, loss=name, tail=tail, **kw).item() == pytest.approx(
        value.item(), rel=1e-12
    )


def _expected_counts(zt, n, temperature):
    """Counts equal to their expectation n * p over the whole vocabulary (K = V)."""
    logp = F.log_softmax(zt / temperature, dim=-1)
    ids = torch.arange(zt.shape[-1]).expand_as(zt)
    return SparseTargets(
        ids=ids, logprobs=logp, temperature=temperature, kind="sampled", counts=n * logp.exp()
    )


@pytest.mark.parametrize(("capture", "temperature"), [(1.0, 1.0), (2.0, 2.0), (1.0, 2.5), (2.0, 0.7)])
def test_sampled_estimator_at_its_expectation_is_dense(capture, temperature):
    # The estimator is linear in the counts at T = capture T, so E[estimate] = estimate(E[counts]) = dense.
    # At another T the self-normalised weights are exact once every id is present.
    zs = _logits(3, 11, seed=6).requires_grad_()
    zt = _logits(3, 11, seed=7)
    targets = _expected_counts(zt, 16, capture)
    for name in ("forward_kl", "soft_cross_entropy"):
        a = kd_loss(zs, targets, loss=name, temperature=temperature)
        b = LOSSES[name](zs, zt, temperature=temperature)
        (ga,), (gb,) = torch.autograd.grad(a, zs), torch.autograd.grad(b, zs)
        assert a.item() == pytest.approx(b.item(), rel=1e-10)
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def test_sampled_gradient_is_unbiased_monte_carlo():
    # 4000 independent draws of n = 3 ids for one position; the mean gradient approaches the dense one.
    v, reps = 7, 4000
    zs = _logits(1, v, seed=8).requires_grad_()
    zt = _logits(1, v, seed=9)
    targets = SparseTargets.sample_from_logits(
        zt.expand(reps, v), 3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(targets.counts.sum(-1), torch.full((reps,), 3.0))
    est = kd_loss(zs.expand(reps, v), targets)  # mean over reps
    (g_est,) = torch.autograd.grad(est, zs)
    (g_dense,) = torch.autograd.grad(LOSSES["forward_kl"](zs, zt), zs)
    # per-rep gradient entries are bounded by 1; stderr <= 1/sqrt(reps) ~ 0.016
    assert (g_est - g_dense).abs().max().item() < 0.05
    assert est.item() == pytest.approx(LOSSES["forward_kl"](zs, zt).item(), abs=0.1)
    # one large sample: close to dense
    big = SparseTargets.sample_from_logits(zt, 20000, generator=torch.Generator().manual_seed(1))
    assert kd_loss(zs, big).item() == pytest.approx(LOSSES["forward_kl"](zs, zt).item(), abs=0.03)


def test_sampled_rejects_losses_without_unbiased_estimator():
    zs, zt = _logits(2, 9, seed=10), _logits(2, 9, seed=11)
    targets = SparseTargets.sample_from_logits(zt, 5, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="loss 'reverse_kl' has no unbiased estimator"):
        kd_loss(zs, targets, loss="reverse_kl")
    with pytest.raises(ValueError, match="loss 'generalized_jsd' has no unbiased estimator"):
        kd_loss(zs, targets, loss="generalized_jsd", beta=0.5)


def test_padding_entries_are_ignored():
    zs, zt = _logits(2, 12, seed=12), _logits(2, 12, seed=13)
    t = SparseTargets.from_logits(zt, 3)
    pad_ids = torch.cat([t.ids, t.ids[:, :1], torch.zeros(2, 1, dtype=torch.long)], dim=-1)  # duplicate ids
    pad_lp = torch.cat([t.logprobs, torch.full((2, 2), float("-inf"), dtype=torch.float64)], dim=-1)
    padded = SparseTargets(ids=pad_ids, logprobs=pad_lp)
    for tail in ("bucket", "renormalize"):
        for name in ("forward_kl", "reverse_kl", "generalized_jsd"):
            kw = KWARGS.get(name, {})
            a = kd_loss(zs, padded, loss=name, tail=tail, temperature=1.7, **kw)
            b = kd_loss(zs, t, loss=name, tail=tail, temperature=1.7, **kw)
            assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["bucket", "renormalize", "sampled"])
def test_gradcheck_all_masked_and_extreme_logits(kind):
    zs = _logits(2, 3, 9, seed=14).requires_grad_()
    zt = _logits(2, 3, 9, seed=15)
    if kind == "sampled":
        targets, tail = (
            SparseTargets.sample_from_logits(zt, 6, generator=torch.Generator().manual_seed(3)),
            "bucket",
        )
        names = ["forward_kl", "soft_cross_entropy"]
    else:
        targets, tail = SparseTargets.from_logits(zt, 4, temperature=1.5), kind
        names = ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"]
    mask = torch.tensor([[True, False, True], [False, True, True]])
    for name in names:
        kw = KWARGS.get(name, {})

        def f(z, name=name, kw=kw):
            return kd_loss(z, targets, loss=name, tail=tail, temperature=0.9, mask=mask, **kw)

        assert torch.autograd.gradcheck(f, (zs,))
        none = kd_loss(zs, targets, loss=name, tail=tail, mask=torch.zeros(2, 3, dtype=torch.bool), **kw)
        (g,) = torch.autograd.grad(none, zs)
        assert none.item() == 0.0 and torch.count_nonzero(g) == 0
        big = (1e4 * torch.randint(-1, 2, (2, 3, 9), generator=torch.Generator().manual_seed(4))).float()
        big.requires_grad_()
        value = kd_loss(big, targets, loss=name, tail=tail, temperature=0.5, **kw)
        (g,) = torch.autograd.grad(value, big)
        assert torch.isfinite(value) and torch.isfinite(g).all()


def test_large_vocabulary_32k_top20():
    v = 32_000
    zs = _logits(2, v, scale=3.0, seed=16, dtype=torch.float32)
    zt = _logits(2, v, scale=3.0, seed=17, dtype=torch.float32)
    targets = SparseTargets.from_logits(zt, 20)
    for name in ("forward_kl", "reverse_kl"):
        got = kd_loss(zs, targets, loss=name).item()
        assert got == pytest.approx(_topk_reference(name, zs, zt, 20, "bucket", 1.0, 1.0), rel=1e-4, abs=1e-6)


def test_sample_from_logits_merges_repeats():
    zt = _logits(5, 6, seed=18)
    t = SparseTargets.sample_from_logits(zt, 50, temperature=1.3, generator=torch.Generator().manual_seed(5))
    assert (
        t.kind == "sampled"
        and t.ids.shape == (5, 50)
        and torch.equal(t.counts.sum(-1), torch.full((5,), 50.0))
    )
    logp = F.log_softmax(zt / 1.3, dim=-1)
    for row in range(5):
        live = t.counts[row] > 0
        assert len(set(t.ids[row, live].tolist())) == int(live.sum())  # one slot per distinct id
        torch.testing.assert_close(t.logprobs[row, live], logp[row, t.ids[row, live]])


def test_validation_messages():
    ids = torch.tensor([[1, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        SparseTargets(ids=ids.float(), logprobs=lp)
    with pytest.raises(ValueError, match=r"logprobs must have the shape of ids \(1, 2\), got \(1, 3\)"):
        SparseTargets(ids=ids, logprobs=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="kind must be one of"):
        SparseTargets(ids=ids, logprobs=lp, kind="top")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SparseTargets(ids=ids, logprobs=lp, temperature=0.0)
    with pytest.raises(ValueError, match=r"log-probabilities \(<= 0, not NaN\), got 0.5"):
        SparseTargets(ids=ids, logprobs=torch.tensor([[0.5, -1.0]]))
    with pytest.raises(ValueError, match="sum to more than 1"):
        SparseTargets(ids=ids, logprobs=torch.log(torch.tensor([[0.7, 0.6]])))
    with pytest.raises(ValueError, match="duplicate ids"):
        SparseTargets(ids=torch.tensor([[3, 3]]), logprobs=lp)
    with pytest.raises(ValueError, match="counts must be None"):
        SparseTargets(ids=ids, logprobs=lp, counts=torch.ones(1, 2))
    with pytest.raises(ValueError, match='counts is required for kind="sampled"'):
        SparseTargets(ids=ids, logprobs=lp, kind="sampled")
    with pytest.raises(ValueError, match="counts must be numbers >= 0"):
        SparseTargets(ids=ids, logprobs=lp, kind="sampled", counts=torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="ids must be >= 0"):
        SparseTargets(ids=-ids, logprobs=lp)
    good = SparseTargets(ids=ids, logprobs=lp)
    with pytest.raises(ValueError, match="ids must be < the student's vocabulary size 2, got 2"):
        kd_loss(torch.zeros(1, 2), good)
    with pytest.raises(ValueError, match=r"positions \(1,\) but the student logits have \(3,\)"):
        kd_loss(torch.zeros(3, 5), good)
    with pytest.raises(ValueError, match="tail must be one of"):
        kd_loss(torch.zeros(1, 5), good, tail="uniform")
    sampled = SparseTargets(ids=ids, logprobs=lp, kind="sampled", counts=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="counts sum to 0"):
        kd_loss(torch.zeros(1, 5), sampled)
    assert kd_loss(torch.zeros(1, 5), sampled, mask=torch.zeros(1, dtype=torch.bool)).item() == 0.0


def test_rounded_topk_without_tail_mass_stays_finite():
    # Captured top-k values that (after rounding) sum to 1 leave no resolvable tail: the teacher tail is
    # floored at the float epsilon, so reverse KL stays finite for a student with mass outside the k ids.
    lp = torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float32))
    targets = SparseTargets(ids=torch.tensor([[0, 1]]), logprobs=lp)
    zs = torch.zeros(1, 6, requires_grad=True)
    for name in ("forward_kl", "reverse_kl", "generalized_jsd", "tvd"):
        value = kd_loss(zs, targets, loss=name, **KWARGS.get(name, {}))
        (g,) = torch.autograd.grad(value, zs)
        assert torch.isfinite(value) and torch.isfinite(g).all()
    # uniform student: q_tail = 4/6; reverse KL = sum_k q log(q/p) + q_tail log(q_tail / eps)
    q, eps = 1 / 6, torch.finfo(torch.float32).eps
    ref = q * np.log(q / 0.75) + q * np.log(q / 0.25) + (4 / 6) * np.log((4 / 6) / eps)
    assert kd_loss(zs, targets, loss="reverse_kl").item() == pytest.approx(ref, rel=1e-5)


def test_sampled_loss_check_happens_before_work():
    targets = SparseTargets.sample_from_logits(
        _logits(2, 5, seed=19), 3, generator=torch.Generator().manual_seed(6)
    )
    with pytest.raises(ValueError, match="loss 'tvd' has no unbiased estimator"):
        kd_loss(torch.zeros(2, 5), targets, loss="tvd", mask=torch.zeros(2, dtype=torch.bool))


def test_to_device_keeps_every_field():
    t = SparseTargets.sample_from_logits(
        _logits(2, 5, seed=20), 4, temperature=1.7, generator=torch.Generator().manual_seed(7)
    )
    moved = t.to("cpu")
    assert moved.kind == "sampled" and moved.temperature == 1.7
    assert (
        torch.equal(moved.ids, t.ids)
        and torch.equal(moved.logprobs, t.logprobs)
        and torch.equal(moved.counts, t.counts)
    )

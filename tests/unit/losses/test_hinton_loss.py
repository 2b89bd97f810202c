"""hinton_loss against values computed by hand in float64, its gradient, its properties and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import hinton_loss

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: two threads on a shared 2-core machine made these tests 3x slower (measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    return [v / sum(e) for v in e]


def _by_hand(s_rows, t_rows, labels, temperature, alpha, ignore_index=-100) -> float:
    """The documented formula with the math module only: soft term over all rows, CE over counted rows."""
    kls = []
    for s, t in zip(s_rows, t_rows):
        ps, pt = _softmax(s, temperature), _softmax(t, temperature)
        kls.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    soft = temperature**2 * sum(kls) / len(kls)
    if labels is None:
        return soft
    ces = [-math.log(_softmax(s)[y]) for s, y in zip(s_rows, labels) if y != ignore_index]
    hard = sum(ces) / len(ces) if ces else 0.0
    return alpha * soft + (1 - alpha) * hard


def test_two_class_value_in_closed_form():
    # teacher (1/2, 1/2); student at T=2 is (1/4, 3/4): KL = ln(4/3)/2, so T² KL = 2 ln(4/3);
    # CE of label 0 at T=1: p = 1/(1+9), so CE = ln 10.
    s = torch.tensor([[0.0, 2 * math.log(3)]], dtype=F64)
    t = torch.zeros(1, 2, dtype=F64)
    got = hinton_loss(s, t, torch.tensor([0]), temperature=2.0, alpha=0.9)
    assert got.dtype == F64
    assert got.item() == pytest.approx(0.9 * 2 * math.log(4 / 3) + 0.1 * math.log(10), rel=1e-12)
    soft_only = hinton_loss(s, t, temperature=2.0)
    assert soft_only.item() == pytest.approx(2 * math.log(4 / 3), rel=1e-12)


def test_batch_matches_formula_with_ignored_rows():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=F64) * 3
    t = torch.randn(6, 5, generator=g, dtype=F64) * 3
    labels = [4, -100, 0, 2, -100, 1]
    got = hinton_loss(s, t, torch.tensor(labels), temperature=3.0, alpha=0.3)
    want = _by_hand(s.tolist(), t.tolist(), labels, 3.0, 0.3)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 20.0])
def test_soft_term_carries_t_squared(temperature):
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=F64)
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]], dtype=F64)
    got = hinton_loss(s, t, temperature=temperature).item()
    kl = _by_hand(s.tolist(), t.tolist(), None, temperature, 1.0) / temperature**2
    assert got == pytest.approx(temperature**2 * kl, rel=1e-12)
    assert got / kl == pytest.approx(temperature**2, rel=1e-12)


def test_alpha_one_is_soft_term_and_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    labels = torch.tensor([0, 2, -100, 1])
    soft = hinton_loss(s, t, temperature=2.0)
    assert hinton_loss(s, t, labels, temperature=2.0, alpha=1.0).item() == pytest.approx(
        soft.item(), rel=1e-12
    )
    ce = torch.nn.functional.cross_entropy(s, labels, ignore_index=-100)  # mean over counted rows
    assert hinton_loss(s, t, labels, temperature=2.0, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-12)


def test_labels_none_ignores_alpha():
    s = torch.tensor([[0.2, -0.3, 1.0]], dtype=F64)
    t = torch.tensor([[1.0, 0.0, -1.0]], dtype=F64)
    assert hinton_loss(s, t, alpha=0.2).item() == pytest.approx(
        hinton_loss(s, t, alpha=1.0).item(), rel=1e-12
    )


def test_ignored_rows_do_not_enter_cross_entropy():
    s = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=F64)
    t = torch.zeros(2, 2, dtype=F64)
    one = hinton_loss(s, t, torch.tensor([0, -100]), alpha=0.0)
    assert one.item() == pytest.approx(-math.log(_softmax([2.0, 0.0])[0]), rel=1e-12)
    # the label behind an ignored row may be anything, even out of range for counted rows
    assert hinton_loss(s, t, torch.tensor([0, -100]), alpha=0.0, ignore_index=-100).item() == one.item()
    custom = hinton_loss(s, t, torch.tensor([0, 7]), alpha=0.0, ignore_index=7)
    assert custom.item() == one.item()


def test_no_counted_row_gives_zero_with_zero_gradient():
    s = torch.randn(3, 4, dtype=F64, requires_grad=True)
    t = torch.randn(3, 4, dtype=F64)
    loss = hinton_loss(s, t, torch.full((3,), -100), alpha=0.0)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.count_nonzero(s.grad) == 0


def test_empty_batch_gives_zero_not_nan():
    s = torch.zeros(0, 4, requires_grad=True)
    loss = hinton_loss(s, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert s.grad is not None and s.grad.shape == (0, 4)


def test_teacher_is_not_differentiated():
    s = torch.randn(2, 3, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, dtype=F64, requires_grad=True)
    hinton_loss(s, t, torch.tensor([0, 1])).backward()
    assert t.grad is None and s.grad is not None


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=F64)
    labels = torch.tensor([1, -100, 3, 0, -100])
    assert torch.autograd.gradcheck(lambda x: hinton_loss(x, t, labels, temperature=3.0, alpha=0.7), (s,))
    assert torch.autograd.gradcheck(lambda x: hinton_loss(x, t, temperature=0.5), (s,))


def test_half_precision_input_is_computed_in_float32():
    s = torch.randn(4, 6).to(torch.bfloat16)
    t = torch.randn(4, 6).to(torch.bfloat16)
    got = hinton_loss(s, t, torch.tensor([0, 1, 2, 3]))
    assert got.dtype == torch.float32 and torch.isfinite(got)


_logit = st.floats(-20, 20, allow_nan=False, width=64)


@st.composite
def _batches(draw):
    n, c = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    rows = st.lists(st.lists(_logit, min_size=c, max_size=c), min_size=n, max_size=n)
    labels = draw(st.lists(st.sampled_from([*range(c), -100]), min_size=n, max_size=n))
    return torch.tensor(draw(rows), dtype=F64), torch.tensor(draw(rows), dtype=F64), torch.tensor(labels)


@settings(max_examples=60, deadline=None)
@given(_batches(), st.floats(0.1, 30), st.floats(0, 1))
def test_property_non_negative(batch, temperature, alpha):
    s, t, labels = batch
    assert hinton_loss(s, t, labels, temperature=temperature, alpha=1.0).item() >= -1e-12
    assert hinton_loss(s, t, labels, temperature=temperature, alpha=alpha).item() >= -1e-12


@settings(max_examples=60, deadline=None)
@given(_batches(), st.floats(0.1, 30))
def test_property_zero_when_student_equals_teacher(batch, temperature):
    s, _, labels = batch
    assert hinton_loss(s, s.clone(), temperature=temperature).item() == pytest.approx(0.0, abs=1e-12)
    assert hinton_loss(s, s.clone(), labels, temperature=temperature, alpha=1.0).item() == pytest.approx(
        0.0, abs=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(_batches(), st.floats(-5, 5))
def test_property_shift_invariant(batch, shift):
    # softmax ignores a constant added to a row, so the loss must too
    s, t, labels = batch
    a = hinton_loss(s, t, labels, temperature=2.0, alpha=0.5).item()
    b = hinton_loss(s + shift, t - shift, labels, temperature=2.0, alpha=0.5).item()
    assert b == pytest.approx(a, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature.*" + (r"nan|inf|0\.0|-1\.0")):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha.*" + (r"nan|-0\.1|1\.5")):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), alpha=alpha)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_labels_shape_mismatch():
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\).*\(3,\)"):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_labels_out_of_range_names_value():
    with pytest.raises(ValueError, match=r"\[0, 2\].*got 3"):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="got -1"):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([-1, 0]))


def test_float_labels_rejected():
    with pytest.raises(ValueError, match="integer"):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))

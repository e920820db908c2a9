from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moegen.golden.quant import (
    MAX_SHIFT,
    MULT_BITS,
    qmax,
    quantize_multiplier,
    quantize_symmetric,
    requantize,
)

ACC = st.integers(-(1 << 31), (1 << 31) - 1)
MULT = st.integers(0, (1 << MULT_BITS) - 1)
SHIFT = st.integers(0, MAX_SHIFT)


def reference_requantize(acc, mult, shift, bits):
    """Exact rational arithmetic: round half up, then saturate symmetrically."""
    value = Fraction(acc * mult, 1 << shift)
    rounded = (value + Fraction(1, 2)).__floor__() if shift else acc * mult
    return max(-qmax(bits), min(qmax(bits), rounded))


@given(ACC, MULT, SHIFT, st.integers(2, 16))
def test_requantize_is_round_half_up_with_symmetric_saturation(acc, mult, shift, bits):
    assert int(requantize(acc, mult, shift, bits)) == reference_requantize(acc, mult, shift, bits)


def test_requantize_ties_go_up_and_saturation_is_symmetric():
    # acc * mult / 2**shift = 2.5, -2.5, 1.5, -1.5 ; -400 and 400 saturate to -127 / 127
    assert requantize(torch.tensor([5, -5, 3, -3, -400, 400]), 1, 1).tolist() == [3, -2, 2, -1, -127, 127]
    assert int(requantize(-(1 << 31), 1, 0)) == -127  # never -128
    assert int(requantize(7, 3, 0)) == 21  # shift 0: no rounding term


def test_requantize_broadcasts_per_channel_parameters():
    acc = torch.tensor([[100, 100], [-100, -100]])
    out = requantize(acc, torch.tensor([1 << 30, 1 << 29]), torch.tensor([31, 31]))
    assert out.tolist() == [[50, 25], [-50, -25]]


@pytest.mark.parametrize(("acc", "mult", "shift", "name"), [
    (1 << 31, 1, 0, "acc"), (0, 1 << 31, 0, "mult"), (0, -1, 0, "mult"), (0, 1, 64, "shift"), (0, 1, -1, "shift"),
])
def test_requantize_rejects_out_of_range_fields(acc, mult, shift, name):
    with pytest.raises(ValueError, match=name):
        requantize(acc, mult, shift)


@given(st.floats(2.0**-32, 2.0**30 - 1, allow_nan=False))
def test_quantize_multiplier_relative_error_bound(scale):
    mult, shift = quantize_multiplier(scale)
    assert (1 << (MULT_BITS - 1)) <= mult < (1 << MULT_BITS)
    assert 0 <= shift <= MAX_SHIFT
    assert abs(mult / 2**shift - scale) <= scale * 2.0**-MULT_BITS


@given(st.floats(2.0**-40, 2.0**14, allow_nan=False))
def test_quantize_multiplier_with_narrow_factor(scale):
    mult, shift = quantize_multiplier(scale, 15, max_shift=31)
    assert mult < (1 << 15) and shift <= 31
    bound = scale * 2.0**-15 if shift < 31 else 2.0**-32
    assert abs(mult / 2**shift - scale) <= bound


def test_quantize_multiplier_edges():
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(0.5) == (1 << 30, 31)
    assert quantize_multiplier(1.0) == (1 << 30, 30)
    for bad in (-1.0, float("inf"), float("nan"), 2.0**31):
        with pytest.raises(ValueError, match="scale"):
            quantize_multiplier(bad)


@given(st.floats(2.0**-20, 2.0**-8), st.integers(-(1 << 20), 1 << 20))
def test_requantize_matches_float_rounding_within_the_stated_bound(scale, acc):
    """Integer requantization differs from float round(acc * scale) by at most 1, and by more
    than 1/2 only through the multiplier's 2**-31 relative error (tie-breaks)."""
    mult, shift = quantize_multiplier(scale)
    exact = acc * scale
    got = int(requantize(acc, mult, shift))
    if abs(exact) < qmax(8):
        assert abs(got - exact) <= 0.5 + abs(exact) * 2.0**-30


def test_quantize_symmetric_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-127.0, 3.0, 127.0]])
    q, scale = quantize_symmetric(x, 8, dim=1)
    assert scale.squeeze(1).tolist() == [2.0 / 127, 0.0, 1.0]
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [-127, 3, 127]]
    assert ((q.double() * scale - x).abs() <= scale / 2 + 1e-12).all()

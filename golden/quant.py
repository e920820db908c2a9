"""Symmetric integer quantization and the device's integer-only requantization.

Rules (the contract RTL, driver and firmware follow):

* Weights: symmetric, per output channel: ``scale = max|w| / qmax``, ``q = round(w / scale)``
  clamped to ``[-qmax, qmax]`` where ``qmax = 2**(bits-1) - 1`` (so int8 is -127..127).
* Activations: symmetric, per token, the same rule along the feature axis.
* Accumulation: exact integer sums (``acc_width`` bits on the device; the config checks the
  width can hold the longest dot product).
* Requantization: ``requantize(acc, mult, shift, bits)`` =
  ``clamp((acc * mult + round_bias) >> shift, -qmax, qmax)`` with ``round_bias = 2**(shift-1)``
  for ``shift > 0`` and 0 for ``shift == 0``, ``>>`` an arithmetic (flooring) shift. That is
  *round half up* (ties toward +infinity) and symmetric saturation. ``mult`` is an unsigned
  integer below ``2**31`` and ``shift`` lies in ``0..63``.
* A real scale ``s`` becomes ``(mult, shift)`` with :func:`quantize_multiplier`: ``mult`` is
  normalized to ``[2**(bits-1), 2**bits)`` so ``|mult / 2**shift - s| <= s * 2**-bits``.
"""

import math

import torch

__all__ = [
    "MAX_SHIFT",
    "MULT_BITS",
    "qmax",
    "quantize_multiplier",
    "quantize_symmetric",
    "requantize",
]

#: Width of the requantization multiplier on the device (unsigned, < 2**31).
MULT_BITS = 31
#: Largest right shift the requantizer supports (6-bit field).
MAX_SHIFT = 63


def qmax(bits):
    """Largest magnitude of a symmetric ``bits``-bit integer: ``2**(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def quantize_symmetric(x, bits=8, *, dim=-1):
    """Quantize ``x`` symmetrically with one scale per slice along ``dim``.

    Returns ``(q, scale)``: ``q`` int64 with the shape of ``x``; ``scale`` float64 with ``dim``
    reduced to size 1, so ``q * scale`` approximates ``x``. An all-zero slice gets scale 0.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    scale = x.abs().amax(dim=dim, keepdim=True) / qmax(bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / safe), -qmax(bits), qmax(bits)).to(torch.int64)
    return q, scale


def requantize(acc, mult, shift, bits=8):
    """Integer requantization: ``clamp((acc*mult + 2**(shift-1)) >> shift, -qmax, qmax)``.

    ``acc``, ``mult`` and ``shift`` are integers or int64 tensors that broadcast together.
    ``acc`` must fit 32 signed bits so the 64-bit intermediate cannot overflow.
    """
    acc = torch.as_tensor(acc, dtype=torch.int64)
    mult = torch.as_tensor(mult, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    if mult.numel() and not (int(mult.min()) >= 0 and int(mult.max()) < (1 << MULT_BITS)):
        raise ValueError(f"requantize mult must lie in 0..2**{MULT_BITS}-1")
    if shift.numel() and not (int(shift.min()) >= 0 and int(shift.max()) <= MAX_SHIFT):
        raise ValueError(f"requantize shift must lie in 0..{MAX_SHIFT}")
    if acc.numel() and not (int(acc.min()) >= -(1 << 31) and int(acc.max()) < (1 << 31)):
        raise ValueError("requantize acc must fit 32 signed bits")
    bias = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0)
    out = (acc * mult + bias) >> shift
    return torch.clamp(out, -qmax(bits), qmax(bits))


def quantize_multiplier(scale, bits=MULT_BITS, *, max_shift=MAX_SHIFT):
    """Represent a real ``scale >= 0`` as ``mult / 2**shift`` with a ``bits``-bit ``mult``.

    ``mult`` is normalized to ``[2**(bits-1), 2**bits)``, so the relative error is at most
    ``2**-bits``. Scales too small for ``max_shift`` keep ``shift = max_shift`` and a smaller
    ``mult`` (absolute error at most ``2**-(max_shift+1)``); scale 0 gives ``(0, 0)``.
    Raises ``ValueError`` for a scale that would need a negative shift (``>= 2**(bits-1)``)
    or is negative or not finite.
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"requantization scale must be finite and >= 0, not {scale!r}")
    if scale == 0:
        return 0, 0
    mantissa, exponent = math.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    mult = round(mantissa * (1 << bits))
    shift = bits - exponent
    if mult == 1 << bits:
        mult, shift = mult >> 1, shift - 1
    if shift < 0:
        raise ValueError(f"requantization scale {scale!r} is too large: it needs a negative shift")
    if shift > max_shift:
        mult, shift = round(math.ldexp(scale, max_shift)), max_shift
    return mult, shift

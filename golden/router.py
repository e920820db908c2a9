"""Top-k expert routing: the bit-exact integer algorithm and its float reference.

Integer algorithm (what the router RTL computes, bit for bit)
-------------------------------------------------------------
Inputs per token: ``E`` signed fixed-point logits ``l`` (``logit_frac`` fractional bits), the
runtime ``k`` (``1..k_max``) and an optional ``top_p`` threshold. Weights are unsigned
fixed point with ``WF = weight_width - 1`` fractional bits (1.0 is representable).

1. **Selection key**: the logit (softmax modes) or ``sigmoid(l) + bias`` (sigmoid mode).
   The ``k`` largest keys are selected, *ties to the lower expert index*, and emitted in
   that order (descending key, then ascending index). Weights are monotone in the key for
   the softmax modes; in the sigmoid mode the bias steers selection only, as in DeepSeek-V3.
2. **exp** (softmax modes), base 2 with one table: ``d = max(l) - l >= 0``;
   ``y = (d * LOG2E_Q) >> (LOG2E_BITS + logit_frac - EXP_LUT_BITS)`` (truncating);
   ``e = EXP2_TABLE[y & 255] >> min(y >> 8, 17)`` where
   ``EXP2_TABLE[f] = round(2**(16 - f/256))``. So ``e`` is ``exp(-d)`` in Q0.16 and the
   maximum logit gets exactly ``2**16``.
3. **sigmoid** (sigmoid mode), a 513-entry table ``SIGMOID_TABLE[j] =
   round(sigmoid((j - 256)/32) * 2**16)`` over ``[-8, 8]`` and linear interpolation on the
   remaining ``r = logit_frac - 5`` fractional bits: ``x = l >> r``, ``f = l mod 2**r``;
   ``s = T[x+256] + ((T[x+257] - T[x+256]) * f >> r)``; logits outside ``[-8, 8)`` give
   ``T[0]`` or ``T[512]``. (With ``logit_frac < 5``, ``x = l << (5 - logit_frac)``, ``f = 0``.)
4. **Normalization**: a sum ``S`` (all ``E`` exps in ``softmax_topk``; the ``k`` selected
   values in the ``*_renorm`` modes), its reciprocal ``R = floor(2**RECIP_BITS / S)`` and
   ``w = (v * R + 2**(RECIP_BITS-WF-1)) >> (RECIP_BITS - WF)`` for each selected value ``v``.
5. **top-p** (dynamic gating): with a threshold ``p`` (weight units), only the first ``c``
   pairs are kept, ``c`` the smallest count whose cumulative weight reaches ``p`` (at least
   one, at most ``k``). Kept weights are not renormalized after the cut.

Modes (per model family)
------------------------
``softmax_topk``         softmax over all experts, then top-k (OLMoE, Qwen2-MoE default).
``softmax_topk_renorm``  softmax, top-k, renormalize over the k (Mixtral, Qwen3-MoE); equal
                         to top-k-then-softmax, and bit-identical to it here because both use
                         the global maximum.
``sigmoid_bias_renorm``  DeepSeek-V3: sigmoid scores, selection by score + per-expert bias,
                         weights the selected scores renormalized (``routed_scaling_factor``
                         and group-limited routing are left to the host).

Error bounds against :func:`route_float` on the same fixed-point logits are in
:data:`WEIGHT_ERROR_BOUND` and are tested.
"""

import math
from typing import NamedTuple

import torch

from .formats import ROUTER_MODES

__all__ = [
    "EXP2_TABLE",
    "MODES",
    "SIGMOID_BOUND_MIN_SUM",
    "SIGMOID_TABLE",
    "WEIGHT_ERROR_BOUND",
    "Routing",
    "quantize_logits",
    "route",
    "route_float",
]

MODES = ROUTER_MODES

EXP_LUT_BITS = 8  # fractional bits of the base-2 exponent that index EXP2_TABLE
EXP_ONE_BITS = 16  # exp and sigmoid values are Q0.16: 1.0 == 2**16
LOG2E_BITS = 15
LOG2E_Q = round(math.log2(math.e) * (1 << LOG2E_BITS))  # 47274
EXP2_TABLE = tuple(round(2.0 ** (EXP_ONE_BITS - f / (1 << EXP_LUT_BITS))) for f in range(1 << EXP_LUT_BITS))
EXP_MAX_SHIFT = EXP_ONE_BITS + 1  # shifting a 17-bit table entry further gives 0

SIGMOID_IN_FRAC = 5  # table grid 1/32
SIGMOID_RANGE = 8  # table covers [-8, 8]
SIGMOID_HALF = SIGMOID_RANGE << SIGMOID_IN_FRAC  # 256
SIGMOID_TABLE = tuple(
    round((1 << EXP_ONE_BITS) / (1 + math.exp(-(j - SIGMOID_HALF) / (1 << SIGMOID_IN_FRAC))))
    for j in range(2 * SIGMOID_HALF + 1)
)

RECIP_BITS = 40
SIGMOID_BOUND_MIN_SUM = 0.5

#: Largest |integer weight / 2**WF - float weight| for weight_width=16 with the same selection,
#: per mode (measured maxima with margin; see tests/golden/test_router.py and `moegen bench golden`).
#: The sigmoid table saturates outside [-8, 8], so its bound holds for tokens whose selected
#: scores sum to at least :data:`SIGMOID_BOUND_MIN_SUM` (true of any useful routing).
WEIGHT_ERROR_BOUND = {"softmax_topk": 2**-9, "softmax_topk_renorm": 2**-9, "sigmoid_bias_renorm": 2**-10}


class Routing(NamedTuple):
    """Routing of ``T`` tokens: ``indices`` and ``weights`` are ``[T, k]`` int64, ``count`` is
    ``[T]``. Pairs at positions ``>= count`` (cut by top-p) hold index -1 and weight 0."""

    indices: torch.Tensor
    weights: torch.Tensor
    count: torch.Tensor


def quantize_logits(logits, *, width=16, frac=8):
    """Float logits to signed fixed point: round to nearest, saturate to ``width`` bits."""
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    return torch.clamp(torch.round(torch.as_tensor(logits, dtype=torch.float64) * (1 << frac)), lo, hi).to(
        torch.int64
    )


def _check(logits, k, mode, weight_width, bias):
    if mode not in MODES:
        raise ValueError(f"router mode must be one of {', '.join(MODES)}, not {mode!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], not {tuple(logits.shape)}")
    experts = logits.shape[1]
    if not isinstance(k, int) or not 1 <= k <= experts:
        raise ValueError(f"k must be an integer in 1..{experts} (experts), not {k!r}")
    if not 2 <= weight_width <= RECIP_BITS - 15:
        raise ValueError(f"weight_width must lie in 2..{RECIP_BITS - 15}, not {weight_width!r}")
    if bias is not None and tuple(bias.shape) != (experts,):
        raise ValueError(f"bias must have one entry per expert ({experts}), not shape {tuple(bias.shape)}")


def _topk_lower_index(keys, k):
    """Indices of the k largest keys per row, descending, ties to the lower index."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]


def _exp_q16(d, logit_frac):
    shift = LOG2E_BITS + logit_frac - EXP_LUT_BITS
    y = (d * LOG2E_Q) >> shift
    table = torch.tensor(EXP2_TABLE, dtype=torch.int64)
    return table[y & ((1 << EXP_LUT_BITS) - 1)] >> torch.clamp(y >> EXP_LUT_BITS, max=EXP_MAX_SHIFT)


def _sigmoid_q16(logits, logit_frac):
    rest = logit_frac - SIGMOID_IN_FRAC
    if rest >= 0:
        x, frac = logits >> rest, logits & ((1 << rest) - 1)
    else:
        x, frac, rest = logits << -rest, torch.zeros_like(logits), 0
    inside = (x >= -SIGMOID_HALF) & (x < SIGMOID_HALF)
    x = torch.clamp(x, -SIGMOID_HALF, SIGMOID_HALF) + SIGMOID_HALF
    frac = torch.where(inside, frac, 0)
    table = torch.tensor(SIGMOID_TABLE, dtype=torch.int64)
    base = table[x]
    step = table[torch.clamp(x + 1, max=2 * SIGMOID_HALF)] - base
    return base + ((step * frac) >> rest)


def _normalize(values, total, wf):
    recip = (1 << RECIP_BITS) // total
    return (values * recip + (1 << (RECIP_BITS - wf - 1))) >> (RECIP_BITS - wf)


def _apply_top_p(indices, weights, top_p):
    k = indices.shape[1]
    if top_p is None:
        return Routing(indices, weights, torch.full((indices.shape[0],), k, dtype=torch.int64))
    reached = torch.cumsum(weights, dim=-1) >= top_p
    # first position where the cumulative weight reaches p, else k
    count = torch.where(reached.any(-1), reached.int().argmax(-1) + 1, k).to(torch.int64)
    keep = torch.arange(k)[None, :] < count[:, None]
    return Routing(torch.where(keep, indices, -1), torch.where(keep, weights, 0), count)


def route(logits, *, k, mode, logit_frac=8, weight_width=16, top_p=None, bias=None):
    """Route fixed-point ``logits`` (``[T, E]`` integers) with the integer algorithm.

    Parameters
    ----------
    k : int
        Experts per token (the per-layer runtime value).
    mode : str
        One of :data:`MODES`.
    top_p : int or None
        Cumulative-weight threshold in weight units (``2**(weight_width-1)`` is 1.0).
    bias : tensor or None
        ``sigmoid_bias_renorm`` only: per-expert selection bias in Q0.16 units.
    """
    logits = torch.as_tensor(logits, dtype=torch.int64)
    if bias is not None:
        bias = torch.as_tensor(bias, dtype=torch.int64)
    _check(logits, k, mode, weight_width, bias)
    wf = weight_width - 1
    if mode == "sigmoid_bias_renorm":
        scores = _sigmoid_q16(logits, logit_frac)
        keys = scores if bias is None else scores + bias
        indices = _topk_lower_index(keys, k)
        picked = torch.gather(scores, 1, indices)
        weights = _normalize(picked, picked.sum(-1, keepdim=True), wf)
    else:
        indices = _topk_lower_index(logits, k)
        exps = _exp_q16(logits.amax(-1, keepdim=True) - logits, logit_frac)
        picked = torch.gather(exps, 1, indices)
        total = exps if mode == "softmax_topk" else picked
        weights = _normalize(picked, total.sum(-1, keepdim=True), wf)
    return _apply_top_p(indices, weights, top_p)


def route_float(logits, *, k, mode, top_p=None, bias=None):
    """Float64 reference of :func:`route` on real-valued logits (same selection rules).

    ``top_p`` and ``bias`` are real numbers here (``bias`` added to the sigmoid score).
    Returns a :class:`Routing` with float64 weights.
    """
    logits = torch.as_tensor(logits).double()  # differentiable, so a trained model can use it
    if mode not in MODES:
        raise ValueError(f"router mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "sigmoid_bias_renorm":
        scores = torch.sigmoid(logits)
        keys = scores if bias is None else scores + torch.as_tensor(bias, dtype=torch.float64)
        indices = _topk_lower_index(keys, k)
        picked = torch.gather(scores, 1, indices)
        weights = picked / picked.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        indices = _topk_lower_index(logits, k)
        weights = torch.gather(probs, 1, indices)
        if mode == "softmax_topk_renorm":
            weights = weights / weights.sum(-1, keepdim=True)
    return _apply_top_p(indices, weights, top_p)

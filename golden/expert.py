"""The int8 SwiGLU expert the device runs, and its float reference.

Float expert: ``y = down( silu(gate(x)) * up(x) )`` with ``gate, up: [I, H]`` and
``down: [H, I]`` (Hugging Face's ``gate_up_proj`` chunks and ``down_proj``).

Integer expert (bit-exact contract of the expert engine), for ``T`` tokens:

1. ``x_q [T, H]`` symmetric per-token activations with scale ``s_x[t]``; the host sends the
   token factor ``(tok_mult[t], tok_shift[t]) = quantize_multiplier(s_x[t], 15)``.
2. ``acc_g = x_q @ gate_q.T`` and ``acc_u = x_q @ up_q.T`` (M:N sparse, exact integers).
3. ``g = requantize(acc_g, tok_mult * gate_mult, tok_shift + gate_shift)`` per (token, channel):
   the multiplier of the real scale ``s_x[t] * s_wg[o] / s_g`` is the product of a 15-bit
   token factor and a 15-bit channel factor (``< 2**30``, exact), shifts add. Same for ``u``.
4. ``a = act_lut[g mod 2**act_bits]``: the activation table maps an int8 code of the gate
   (scale ``s_g``) to ``silu`` of it in int8 (scale ``s_a``).
5. ``h = requantize(a * u, gated_mult, gated_shift)``: the gated multiply (scale ``s_h``).
6. ``y = requantize(h @ down_q.T, down_mult, down_shift)`` per output channel (scale ``s_y``).

Static scales ``s_g, s_u, s_a, s_h, s_y`` come from calibration: for each intermediate on
the calibration inputs, the clipping point with the least quantization error. Static scales
suit MoE inputs, which come out of an RMSNorm with near-uniform token norms. The host
dequantizes with ``out_scale = s_y``. The relative error against the float expert on the
same (pruned) weights is bounded by :data:`EXPERT_REL_ERROR_BOUND` (tested).
"""

from dataclasses import dataclass

import numpy as np
import torch

from .pack import PackedMatrix, pack_mn, prune_mn, sparse_matmul
from .quant import qmax, quantize_multiplier, quantize_symmetric, requantize

__all__ = [
    "EXPERT_REL_ERROR_BOUND",
    "FACTOR_BITS",
    "ExpertWeights",
    "QuantizedExpert",
    "expert_float",
    "expert_int",
    "param_words",
    "prune_expert",
    "quantize_activations",
    "quantize_expert",
    "run_expert",
    "weight_stream",
]

#: Width of the token and channel multiplier factors; their product stays below 2**30.
FACTOR_BITS = 15
#: Each factor's shift is at most this, so a token shift plus a channel shift fits 0..63.
FACTOR_MAX_SHIFT = 31
#: Relative Frobenius error of the int8 expert against float on the same pruned weights,
#: for Gaussian inputs calibrated on their own distribution (tests/golden/test_expert.py).
EXPERT_REL_ERROR_BOUND = 0.05


@dataclass(frozen=True)
class ExpertWeights:
    """Float weights of one SwiGLU expert: ``gate, up: [ffn, hidden]``, ``down: [hidden, ffn]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self):
        ffn, hidden = self.gate.shape
        if tuple(self.up.shape) != (ffn, hidden) or tuple(self.down.shape) != (hidden, ffn):
            raise ValueError(
                f"expert shapes must be gate/up [ffn, hidden] and down [hidden, ffn]; got gate "
                f"{tuple(self.gate.shape)}, up {tuple(self.up.shape)}, down {tuple(self.down.shape)}"
            )

    @property
    def hidden(self):
        return self.gate.shape[1]

    @property
    def ffn(self):
        return self.gate.shape[0]


def expert_float(x, weights):
    """Float64 SwiGLU expert: ``down(silu(gate(x)) * up(x))``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    gate, up, down = (w.double() for w in (weights.gate, weights.up, weights.down))
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def prune_expert(weights, m, n):
    """Magnitude-prune all three matrices to ``m:n`` along their reduction axis."""
    return ExpertWeights(*(prune_mn(w, m, n) for w in (weights.gate, weights.up, weights.down)))


@dataclass(frozen=True, eq=False)
class QuantizedExpert:
    """Everything the device needs to run one expert, plus the host's output scale.

    Members
    -------
    gate, up, down : PackedMatrix
        M:N packed integer weights.
    gate_mult, gate_shift, up_mult, up_shift : tensor [ffn]
        Channel factors (``FACTOR_BITS``-bit multiplier, shift) of the gate and up requant.
    down_mult, down_shift : tensor [hidden]
        Requantization of the down projection per output channel.
    gated_mult, gated_shift : int
        Requantization of the gated product ``a * u`` (31-bit multiplier).
    act_lut : tensor [2**act_bits]
        Activation table, addressed by the gate code modulo ``2**act_bits``.
    out_scale : float
        Real value of one output step (``s_y``).
    act_bits : int
        Width of activations and of every requantized intermediate.
    """

    gate: PackedMatrix
    up: PackedMatrix
    down: PackedMatrix
    gate_mult: torch.Tensor
    gate_shift: torch.Tensor
    up_mult: torch.Tensor
    up_shift: torch.Tensor
    down_mult: torch.Tensor
    down_shift: torch.Tensor
    gated_mult: int
    gated_shift: int
    act_lut: torch.Tensor
    out_scale: float
    act_bits: int = 8

    def __post_init__(self):
        hidden, ffn = self.hidden, self.ffn
        if (self.up.layout.out_features, self.up.layout.in_features) != (ffn, hidden) or (
            self.down.layout.out_features,
            self.down.layout.in_features,
        ) != (hidden, ffn):
            raise ValueError("quantized expert matrices disagree on hidden/ffn sizes")
        for name, size in (("gate", ffn), ("up", ffn), ("down", hidden)):
            for part, bits, hi in (("mult", FACTOR_BITS, 1 << FACTOR_BITS), ("shift", 6, FACTOR_MAX_SHIFT + 1)):
                tensor = getattr(self, f"{name}_{part}")
                if tuple(tensor.shape) != (size,):
                    raise ValueError(f"{name}_{part} must have {size} entries, not {tuple(tensor.shape)}")
                if size and not (int(tensor.min()) >= 0 and int(tensor.max()) < hi):
                    raise ValueError(f"{name}_{part} entries must lie in 0..{hi - 1} ({bits}-bit field)")
        if tuple(self.act_lut.shape) != (1 << self.act_bits,):
            raise ValueError(f"act_lut must have {1 << self.act_bits} entries, not {tuple(self.act_lut.shape)}")

    @property
    def hidden(self):
        return self.gate.layout.in_features

    @property
    def ffn(self):
        return self.gate.layout.out_features


def quantize_activations(x, bits=8):
    """Per-token symmetric quantization plus the token factors the device needs.

    Returns ``(x_q, tok_mult, tok_shift, scale)`` with ``scale [T]`` float64.
    """
    x_q, scale = quantize_symmetric(x, bits, dim=-1)
    scale = scale.squeeze(-1)
    factors = [quantize_multiplier(float(s), FACTOR_BITS, max_shift=FACTOR_MAX_SHIFT) for s in scale]
    tok_mult = torch.tensor([f[0] for f in factors], dtype=torch.int64)
    tok_shift = torch.tensor([f[1] for f in factors], dtype=torch.int64)
    return x_q, tok_mult, tok_shift, scale


def expert_int(x_q, tok_mult, tok_shift, qe):
    """The device's integer SwiGLU expert: ``x_q [T, hidden]`` int to ``y_q [T, hidden]`` int."""
    bits = qe.act_bits
    x_q = torch.as_tensor(x_q, dtype=torch.int64)
    tok_mult = torch.as_tensor(tok_mult, dtype=torch.int64)[:, None]
    tok_shift = torch.as_tensor(tok_shift, dtype=torch.int64)[:, None]
    g = requantize(sparse_matmul(x_q, qe.gate), tok_mult * qe.gate_mult, tok_shift + qe.gate_shift, bits)
    u = requantize(sparse_matmul(x_q, qe.up), tok_mult * qe.up_mult, tok_shift + qe.up_shift, bits)
    a = qe.act_lut[g & ((1 << bits) - 1)]
    h = requantize(a * u, qe.gated_mult, qe.gated_shift, bits)
    return requantize(sparse_matmul(h, qe.down), qe.down_mult, qe.down_shift, bits)


def param_words(qe):
    """The expert's parameters as 32-bit words, in the image's params order and the order
    the expert engine loads them: ``ffn`` gate channel factors, ``ffn`` up, ``hidden`` down
    (each ``mult | shift << 16``), the gated multiply's ``mult`` and ``shift``, then the
    activation table, four entries per word (entry ``4w + b`` in byte ``b``, two's
    complement)."""
    factors = [getattr(qe, f"{name}_mult") | (getattr(qe, f"{name}_shift") << 16) for name in ("gate", "up", "down")]
    lut = (qe.act_lut & 0xFF).reshape(-1, 4) << torch.tensor([0, 8, 16, 24])
    return [*torch.cat(factors).tolist(), qe.gated_mult, qe.gated_shift, *lut.sum(-1).tolist()]


def weight_stream(qe, tokens, rows):
    """Step records in the order the expert engine consumes them, for ``tokens`` tokens on
    an array of ``rows`` token lanes (``token_tiles = ceil(tokens / rows)``)::

        for j in ffn tiles:
            gate tile j, token_tiles times
            up tile j, token_tiles times
        for i in hidden tiles:
            down tile i, token_tiles times

    Each tile is its ``groups`` step records. The loader produces exactly this stream,
    replaying a tile from its on-chip bank for every token tile.
    """
    token_tiles = -(-tokens // rows)
    gate, up, down = (matrix.step_records() for matrix in (qe.gate, qe.up, qe.down))
    stream = []
    for j in range(len(gate)):
        stream += gate[j] * token_tiles + up[j] * token_tiles
    for tile in down:
        stream += tile * token_tiles
    return stream


def run_expert(x, qe):
    """Float in, float out through the integer expert (what the host sees from the device)."""
    x_q, tok_mult, tok_shift, _ = quantize_activations(x, qe.act_bits)
    return expert_int(x_q, tok_mult, tok_shift, qe).double() * qe.out_scale


def _channel_factors(scales):
    factors = [quantize_multiplier(float(s), FACTOR_BITS, max_shift=FACTOR_MAX_SHIFT) for s in scales]
    return (
        torch.tensor([f[0] for f in factors], dtype=torch.int64),
        torch.tensor([f[1] for f in factors], dtype=torch.int64),
    )


def _step(tensor, bits, candidates=64):
    """Static scale for ``tensor``: the clipping point (a fraction 0.2..1 of its peak) that
    minimizes the quantization mean squared error; 1.0 for an all-zero tensor."""
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    if peak == 0:
        return 1.0
    top = qmax(bits)
    values = tensor.reshape(1, -1).double()
    scales = torch.linspace(0.2, 1.0, candidates, dtype=torch.float64) * peak / top
    # candidates in groups of 8: one pass over the tensor per group, memory bounded
    errors = torch.cat([
        ((torch.clamp(torch.round(values / part[:, None]), -top, top) * part[:, None] - values) ** 2).mean(1)
        for part in scales.split(8)])
    return float(scales[int(torch.argmin(errors))])


def quantize_expert(weights, calibration, *, m, n, cols, weight_bits=8, act_bits=8):
    """Quantize an M:N-sparse float expert and calibrate its static scales.

    ``weights`` must already satisfy ``m:n`` (see :func:`prune_expert`); ``calibration`` is a
    ``[N, hidden]`` float batch representative of the expert's inputs.
    """
    q = {}
    w_scale = {}
    for name in ("gate", "up", "down"):
        q[name], s = quantize_symmetric(getattr(weights, name), weight_bits, dim=1)
        w_scale[name] = s.squeeze(1)
    deq = ExpertWeights(*(q[name].double() * w_scale[name][:, None] for name in ("gate", "up", "down")))

    x = torch.as_tensor(calibration, dtype=torch.float64)
    gate = x @ deq.gate.T
    up = x @ deq.up.T
    act = torch.nn.functional.silu(gate)
    gated = act * up
    out = gated @ deq.down.T
    s_g, s_u, s_a, s_h, s_y = (_step(t, act_bits) for t in (gate, up, act, gated, out))
    s_y = float(np.float32(s_y))  # the image stores the output scale as float32

    codes = torch.arange(1 << act_bits)
    signed_codes = codes - ((codes >> (act_bits - 1)) << act_bits)
    act_lut = torch.clamp(
        torch.round(torch.nn.functional.silu(signed_codes.double() * s_g) / s_a), -qmax(act_bits), qmax(act_bits)
    ).to(torch.int64)

    gated_mult, gated_shift = quantize_multiplier(s_a * s_u / s_h)
    return QuantizedExpert(
        *(pack_mn(q[name], m, n, cols, value_bits=weight_bits) for name in ("gate", "up", "down")),
        *_channel_factors(w_scale["gate"] / s_g),
        *_channel_factors(w_scale["up"] / s_u),
        *_channel_factors(w_scale["down"] * s_h / s_y),
        gated_mult,
        gated_shift,
        act_lut,
        s_y,
        act_bits,
    )

import pytest
import torch

from moegen.golden.expert import (
    EXPERT_REL_ERROR_BOUND,
    FACTOR_BITS,
    ExpertWeights,
    expert_float,
    expert_int,
    param_words,
    prune_expert,
    quantize_activations,
    quantize_expert,
    run_expert,
    weight_stream,
)
from moegen.golden.pack import sparse_matmul, unpack_mn
from moegen.golden.quant import requantize


def random_expert(hidden, ffn, seed):
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(torch.randn(ffn, hidden, generator=g) * hidden**-0.5,
                         torch.randn(ffn, hidden, generator=g) * hidden**-0.5,
                         torch.randn(hidden, ffn, generator=g) * ffn**-0.5)


@pytest.mark.parametrize(("hidden", "ffn", "m", "n", "seed"), [
    (64, 128, 4, 4, 0), (64, 128, 2, 4, 1), (128, 96, 1, 4, 2), (96, 256, 2, 8, 3), (256, 512, 2, 4, 4),
])
def test_int8_expert_is_within_the_error_bound_of_float(hidden, ffn, m, n, seed):
    """RMS-normalized-like inputs (Gaussian, uniform token norms), calibrated on their own
    distribution; float reference on the same pruned weights."""
    weights = prune_expert(random_expert(hidden, ffn, seed), m, n)
    g = torch.Generator().manual_seed(seed + 100)
    qe = quantize_expert(weights, torch.randn(512, hidden, generator=g), m=m, n=n, cols=8)
    x = torch.randn(128, hidden, generator=g)
    ref = expert_float(x, weights)
    assert float((run_expert(x, qe) - ref).norm() / ref.norm()) <= EXPERT_REL_ERROR_BOUND


def test_expert_int_follows_the_documented_steps():
    """Recompute the integer pipeline from dense matrices and the documented formulas."""
    weights = prune_expert(random_expert(32, 48, 7), 2, 4)
    qe = quantize_expert(weights, torch.randn(64, 32), m=2, n=4, cols=3)
    x_q, tok_mult, tok_shift, _ = quantize_activations(torch.randn(5, 32))
    tm, ts = tok_mult[:, None], tok_shift[:, None]
    g = requantize(x_q @ unpack_mn(qe.gate).T, tm * qe.gate_mult, ts + qe.gate_shift)
    u = requantize(x_q @ unpack_mn(qe.up).T, tm * qe.up_mult, ts + qe.up_shift)
    a = qe.act_lut[torch.where(g < 0, g + 256, g)]
    h = requantize(a * u, qe.gated_mult, qe.gated_shift)
    y = requantize(h @ unpack_mn(qe.down).T, qe.down_mult, qe.down_shift)
    assert torch.equal(expert_int(x_q, tok_mult, tok_shift, qe), y)
    assert torch.equal(sparse_matmul(x_q, qe.gate), x_q @ unpack_mn(qe.gate).T)


def test_token_factors_represent_the_token_scales():
    x = torch.randn(20, 16) * torch.logspace(-3, 3, 20)[:, None]
    x[3] = 0
    _, mult, shift, scale = quantize_activations(x)
    assert int(mult[3]) == 0 and float(scale[3]) == 0
    nonzero = scale > 0
    approx = mult[nonzero].double() / 2.0 ** shift[nonzero].double()
    assert ((approx - scale[nonzero]).abs() <= scale[nonzero] * 2.0**-FACTOR_BITS).all()
    assert (mult < 2**FACTOR_BITS).all() and (shift <= 31).all()


def test_activation_table_is_silu_of_the_gate_code():
    weights = random_expert(16, 32, 1)
    qe = quantize_expert(weights, torch.randn(64, 16), m=4, n=4, cols=2)
    assert int(qe.act_lut[0]) == 0
    positive = qe.act_lut[1:128]
    assert (positive[1:] >= positive[:-1]).all()  # silu is increasing for x > 0
    assert (qe.act_lut[128:] <= 0).all()  # and negative, small, for x < 0


def test_zero_input_gives_zero_output():
    weights = random_expert(16, 32, 2)
    qe = quantize_expert(weights, torch.randn(64, 16), m=4, n=4, cols=2)
    assert run_expert(torch.zeros(3, 16), qe).abs().max() == 0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expert shapes"):
        ExpertWeights(torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(8, 4))
    weights = random_expert(16, 32, 3)
    with pytest.raises(ValueError, match="nonzeros"):
        quantize_expert(weights, torch.randn(8, 16), m=2, n=4, cols=2)  # not pruned


def test_weight_stream_order_replays_each_tile_per_token_tile():
    weights = prune_expert(random_expert(12, 20, 5), 2, 4)
    qe = quantize_expert(weights, torch.randn(32, 12), m=2, n=4, cols=8)  # ffn 20 -> 3 tiles, hidden 12 -> 2
    gate, up, down = (m.step_records() for m in (qe.gate, qe.up, qe.down))
    stream = weight_stream(qe, tokens=5, rows=2)  # 3 token tiles
    expected = []
    for j in range(3):
        expected += gate[j] * 3 + up[j] * 3
    for i in range(2):
        expected += down[i] * 3
    assert stream == expected
    assert len(stream) == 3 * (3 * 2 * qe.gate.layout.groups + 2 * qe.down.layout.groups)
    single = [r for j in range(3) for r in gate[j] + up[j]] + [r for tile in down for r in tile]
    assert weight_stream(qe, tokens=2, rows=2) == single


def test_param_words_pack_factors_gated_and_table():
    qe = quantize_expert(random_expert(8, 12, 6), torch.randn(16, 8), m=4, n=4, cols=4)
    words = param_words(qe)
    assert len(words) == 2 * 12 + 8 + 2 + 256 // 4
    assert words[0] == int(qe.gate_mult[0]) | int(qe.gate_shift[0]) << 16
    assert words[12] == int(qe.up_mult[0]) | int(qe.up_shift[0]) << 16
    assert words[24 + 7] == int(qe.down_mult[7]) | int(qe.down_shift[7]) << 16
    assert words[32:34] == [qe.gated_mult, qe.gated_shift]
    table = words[34:]
    for code in (0, 1, 127, 128, 255):
        entry = (table[code // 4] >> (8 * (code % 4))) & 0xFF
        assert entry - 256 * (entry >> 7) == int(qe.act_lut[code])
    assert all(0 <= w < 1 << 32 for w in words)

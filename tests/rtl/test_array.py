import random
from types import SimpleNamespace

import pytest
import torch
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from moegen.golden.pack import pack_mn, sparse_matmul
from moegen.rtl.array import SparseSystolicArray, required_acc_bits
from moegen.rtl.testbench.array import ArrayStimulus, decode_result, make_case
from moegen.verify import DEFAULT_PATTERNS, run_block


def simulate(dut, stim, *, idle=0.0, stall=0.0, seed=0, ready_after=0, limit=20000):
    """Drive ``stim`` through ``dut`` in amaranth.sim; returns (results, fire cycles, result cycles)."""
    rng = random.Random(seed)
    results, fires, arrivals = [], [], []

    def source(port, beats):
        async def process(ctx):
            for beat in beats:
                while rng.random() < idle:
                    ctx.set(port.valid, 0)
                    await ctx.tick()
                ctx.set(port.payload.as_value() if hasattr(port.payload, "as_value") else port.payload, beat)
                ctx.set(port.valid, 1)
                await ctx.tick().until(port.ready)
            ctx.set(port.valid, 0)
        return process

    async def sink(ctx):
        cycle = 0
        while len(results) < len(stim.expected) and cycle < limit:
            ctx.set(dut.o.ready, cycle >= ready_after and rng.random() >= stall)
            _, _, valid, ready, payload, a_valid, a_ready = await ctx.tick().sample(
                dut.o.valid, dut.o.ready, dut.o.payload.as_value(), dut.a.valid, dut.a.ready)
            if a_valid and a_ready:
                fires.append(cycle)
            if valid and ready:
                results.append(decode_result(payload, dut.rows, dut.cols, dut.acc_width))
                arrivals.append(cycle)
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source(dut.a, [beat for beat, _ in stim.steps]))
    sim.add_testbench(source(dut.w, [record for _, record in stim.steps]))
    sim.add_testbench(sink)
    sim.run()
    return results, fires, arrivals


def stimulus(rows, cols, m, n, k_dim, out_dim, tokens, seed=0, **kwargs):
    x, packed = make_case(m=m, n=n, cols=cols, k_dim=k_dim, out_dim=out_dim, tokens=tokens, seed=seed, **kwargs)
    return ArrayStimulus(x, packed, rows=rows, act_width=kwargs.get("act_width", 8))


def test_stimulus_expected_rows_are_golden_sparse_matmul():
    x, packed = make_case(m=2, n=4, cols=3, k_dim=10, out_dim=7, tokens=5, seed=3)
    stim = ArrayStimulus(x, packed, rows=2)
    acc = sparse_matmul(x, packed)
    # weight tile 1 (channels 3..5) follows tile 0's 5 rows; its token tile 2 (token 4) follows 2 + 2 rows
    first = 5 + 4
    assert stim.expected[first] == (tuple(acc[4, 3:6].tolist()), 0, 1)
    assert len(stim.steps) == packed.layout.tiles * 3 * packed.layout.groups


@pytest.mark.parametrize(("rows", "cols", "m", "n", "k_dim", "out_dim", "tokens"), [
    (2, 2, 2, 4, 16, 4, 2),     # T = R
    (3, 2, 1, 4, 10, 5, 7),     # T > R, K and O not tile multiples
    (4, 3, 2, 2, 9, 7, 3),      # dense, T < R
    (2, 3, 4, 8, 20, 5, 5),
    (1, 1, 1, 1, 5, 2, 3),      # a single dense PE
    (3, 1, 1, 2, 3, 2, 4),      # one group per tile: G < R
])
def test_amaranth_sim_matches_golden_with_idle_and_backpressure(rows, cols, m, n, k_dim, out_dim, tokens):
    dut = SparseSystolicArray(rows=rows, cols=cols, m=m, n=n)
    stim = stimulus(rows, cols, m, n, k_dim, out_dim, tokens, seed=rows * 10 + cols)
    results, _, _ = simulate(dut, stim, idle=0.3, stall=0.4, seed=1)
    assert results == stim.expected


def test_narrow_widths_wrap_like_golden():
    dut = SparseSystolicArray(rows=2, cols=3, m=1, n=2, act_width=3, weight_width=2, acc_width=8)
    stim = stimulus(2, 3, 1, 2, 13, 4, 3, act_width=3, weight_width=2, weights="extreme")
    results, _, _ = simulate(dut, stim, idle=0.2, stall=0.2)
    assert results == stim.expected


def test_one_step_per_cycle_and_drain_overlaps_next_tile():
    dut = SparseSystolicArray(rows=4, cols=3, m=2, n=4)
    stim = stimulus(4, 3, 2, 4, 20, 9, 4)  # G = 5 >= rows
    results, fires, arrivals = simulate(dut, stim)
    assert results == stim.expected
    assert fires == list(range(fires[0], fires[0] + len(stim.steps)))  # no bubble between tiles
    ends = fires[stim.groups - 1::stim.groups]
    for tile, end in enumerate(ends):
        rows = arrivals[tile * 4:(tile + 1) * 4]
        assert rows == list(range(end + dut.latency, end + dut.latency + 4))


def test_tiles_shorter_than_their_rows_are_drain_limited():
    dut = SparseSystolicArray(rows=4, cols=2, m=1, n=2)
    stim = stimulus(4, 2, 1, 2, 4, 6, 4)  # G = 2 < 4 rows: a tile ends every 4 cycles
    results, fires, arrivals = simulate(dut, stim)
    assert results == stim.expected
    assert fires[-1] - fires[0] + 1 == (stim.tiles - 1) * 4 + 2
    assert arrivals == list(range(arrivals[0], arrivals[0] + len(stim.expected)))


def test_partial_token_tile_drains_only_its_rows():
    dut = SparseSystolicArray(rows=4, cols=2, m=2, n=4)
    stim = stimulus(4, 2, 2, 4, 8, 4, 1)  # T = 1: one row per tile, G = 2
    results, fires, _ = simulate(dut, stim)
    assert results == stim.expected and [row for _, row, _ in results] == [0, 0]
    assert fires == list(range(fires[0], fires[0] + len(stim.steps)))


def test_backpressure_fills_the_fifo_then_holds_the_inputs():
    dut = SparseSystolicArray(rows=2, cols=2, m=1, n=1)
    stim = stimulus(2, 2, 1, 1, 3, 40, 2)  # 20 tiles of 2 rows
    results, fires, _ = simulate(dut, stim, ready_after=200)
    assert results == stim.expected
    accepted_tiles = sum(1 for f in fires if f < 200) // stim.groups
    assert accepted_tiles == dut.fifo_depth // 2  # as many tiles as the FIFO has rows for


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rows": 0}, r"rows must be an integer in 1\.\.64, not 0"),
    ({"cols": 65}, r"cols must be an integer in 1\.\.64, not 65"),
    ({"n": 3}, r"n must be one of 1, 2, 4, 8, 16, not 3"),
    ({"n": 32}, r"n must be one of 1, 2, 4, 8, 16, not 32"),
    ({"m": 5}, r"m must be an integer in 1\.\.4, not 5"),
    ({"m": 0}, r"m must be an integer in 1\.\.4, not 0"),
    ({"act_width": 9}, r"act_width must be an integer in 2\.\.8, not 9"),
    ({"weight_width": 1}, r"weight_width must be an integer in 2\.\.8, not 1"),
    ({"acc_width": 33}, r"acc_width must be an integer in 8\.\.32, not 33"),
    ({"rows": 2.0}, r"rows must be an integer"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseSystolicArray(**{"rows": 2, "cols": 2, "m": 2, "n": 4, **kwargs})


def test_required_acc_bits_matches_the_longest_sum():
    assert required_acc_bits(8, 8, 4) == 17  # 127 * 127 * 4 = 64516 < 2**16, plus the sign
    assert required_acc_bits(2, 2, 1) == 2


def test_step_record_width_is_the_packing_contract():
    packed = pack_mn(torch.zeros(5, 16, dtype=torch.int64), 2, 8, 3)
    dut = SparseSystolicArray(rows=1, cols=3, m=2, n=8)
    dense = SparseSystolicArray(rows=1, cols=3, m=4, n=4)
    for array in (dut, dense):
        Fragment.get(array, None)  # elaborated, so Amaranth does not warn it was never used
    assert dut.step_bits == len(dut.w.payload) == packed.layout.step_bits == 3 * 2 * (8 + 3)
    assert dense.step_bits == 3 * 4 * 8


def _verify(rows, cols, m, n, shapes, seed, **widths):
    k_dim, out_dim, tokens = shapes[0]
    args = SimpleNamespace(config="tiny", seed=seed, rows=rows, cols=cols, m=m, n=n,
                           act_width=widths.get("act_width"), weight_width=widths.get("weight_width"),
                           acc_width=widths.get("acc_width"), k_dim=k_dim, out_dim=out_dim, tokens=tokens,
                           shape=[",".join(map(str, s)) for s in shapes[1:]])
    result, params, lines = run_block("array", args)
    assert result.ok, "\n".join(lines)
    runs = [r for r in result.reports if "timing" not in r]
    assert len(runs) == len(shapes) * (len(DEFAULT_PATTERNS) + 1)
    assert all(r["mismatches"] == 0 and r["received"] == r["beats"] and not r["stream_violations"] for r in runs)
    (timing,) = [r for r in result.reports if "timing" in r]
    assert timing["correct"] and timing["fire_span"] == drain_limited_span(rows, timing)
    return params


def drain_limited_span(rows, timing):
    """Cycles from the first to the last accepted step: one step per cycle, except that a
    tile may end no sooner than the previous tile's row count after it."""
    tokens, groups = timing["timing"]["tokens"], timing["groups"]
    token_tiles = -(-tokens // rows)
    active = [min(rows, tokens - tt * rows) for tt in range(token_tiles)] * (timing["tiles"] // token_tiles)
    return groups + sum(max(groups, r) for r in active[:-1])


# (rows, cols, m, n), GEMM shapes (K, O, T): K and O not multiples of n and cols, T below,
# equal to and above rows. One Verilator build per array.
SWEEP = [
    ((1, 1, 1, 1), [(7, 3, 2), (1, 1, 1)]),
    ((3, 5, 2, 4), [(30, 11, 7), (8, 5, 3), (3, 4, 1)]),
    ((8, 8, 1, 4), [(70, 20, 9), (256, 16, 8), (5, 3, 3)]),
]
SLOW_SWEEP = [
    ((2, 2, 2, 2), [(9, 5, 3), (16, 4, 2), (1, 2, 1)], {}),
    ((4, 4, 4, 4), [(19, 10, 4), (40, 4, 9), (2, 3, 2)], {}),
    ((5, 3, 1, 2), [(11, 7, 5), (33, 2, 12), (2, 1, 4)], {"act_width": 4, "weight_width": 3, "acc_width": 10}),
    ((2, 7, 2, 8), [(21, 15, 2), (64, 7, 5), (8, 9, 1)], {}),
    ((6, 2, 4, 8), [(50, 5, 6), (17, 3, 13), (8, 2, 2)], {}),
]


@pytest.mark.verilator
@pytest.mark.parametrize(("array", "shapes"), SWEEP)
def test_verilog_matches_golden_under_idle_and_backpressure(array, shapes):
    _verify(*array, shapes, seed=sum(array))


@pytest.mark.verilator
@pytest.mark.slow
@pytest.mark.parametrize(("array", "shapes", "widths"), SLOW_SWEEP)
def test_verilog_sweep(array, shapes, widths):
    params = _verify(*array, shapes, seed=sum(array), **widths)
    assert all(params[name] == value for name, value in widths.items())


def test_verify_refuses_bad_shapes_before_building():
    base = {"config": "tiny", "seed": 1, "rows": 2, "cols": 2, "m": 2, "n": 4, "act_width": None,
            "weight_width": None, "acc_width": None, "k_dim": 16, "out_dim": 4, "tokens": 2, "shape": []}
    for change, match in [({"k_dim": 0}, r"k-dim must be an integer in 1\.\.65535, not 0"),
                          ({"tokens": 70000}, r"tokens must be an integer in 1\.\.65535"),
                          ({"n": 3}, r"sparsity n must be a power of two"),
                          ({"m": 8}, r"sparsity m must be an integer in 1\.\.n \(4\), not 8"),
                          ({"shape": ["1,2"]}, r"shape must be K,O,T"),
                          ({"acc_width": 12, "k_dim": 400}, r"acc_width 12 cannot hold a reduction of k-dim 400")]:
        with pytest.raises(ValueError, match=match):
            run_block("array", SimpleNamespace(**{**base, **change}))


def test_cli_exits_2_on_bad_parameters(capsys):
    from moegen.cli import main

    assert main(["verify", "array", "--config", "tiny", "--m", "3", "--n", "2"]) == 2
    assert capsys.readouterr().err.strip() == "moegen: error: sparsity m must be an integer in 1..n (2), not 3"
    assert main(["verify", "array", "--config", "tiny", "--rows", "65"]) == 2
    assert "rows must be an integer in 1..64, not 65" in capsys.readouterr().err


@pytest.mark.parametrize(("claimed", "drained"), [(0, 1), (7, 4)])
def test_out_of_range_row_counts_are_held_to_the_array(claimed, drained):
    dut = SparseSystolicArray(rows=4, cols=2, m=1, n=2)
    stim = stimulus(4, 2, 1, 2, 6, 4, 4)
    rows_field = stim.layout["rows"]
    mask = ((1 << rows_field.shape.width) - 1) << rows_field.offset
    stim.steps = [((beat & ~mask) | (claimed << rows_field.offset), record) for beat, record in stim.steps]
    expected = [(acc, row, int(row == drained - 1)) for acc, row, _ in stim.expected if row < drained]
    stim.expected = expected
    results, _, _ = simulate(dut, stim)
    assert results == expected

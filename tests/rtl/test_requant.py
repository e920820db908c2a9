import random
from types import SimpleNamespace

import pytest
import torch
from amaranth import Elaboratable, Module, Signal
from amaranth.hdl import Assert
from amaranth.sim import Simulator

from moegen.formal import assert_stream_output, assume_stream_input, reset_at_start, run_bmc
from moegen.golden.quant import requantize
from moegen.rtl.requant import Requantizer
from moegen.verify import DEFAULT_PATTERNS, run_block


def test_amaranth_sim_matches_golden_with_backpressure():
    dut = Requantizer(acc_width=20, out_width=6, lanes=2)
    rng = random.Random(0)
    beats = [[(rng.randrange(-(1 << 19), 1 << 19), rng.randrange(1 << 31), rng.randrange(64)) for _ in range(2)]
             for _ in range(60)]
    beats += [[((1 << 19) - 1, (1 << 31) - 1, 0), (-(1 << 19), (1 << 31) - 1, 0)], [(3, 1, 1), (-3, 1, 1)]]
    expected = [requantize(*(torch.tensor([lane[i] for lane in beat]) for i in range(3)), 6).tolist() for beat in beats]
    received = []

    async def source(ctx):
        for beat in beats:
            for lane, (acc, mult, shift) in enumerate(beat):
                ctx.set(dut.i.payload.acc[lane], acc)
                ctx.set(dut.i.payload.mult[lane], mult)
                ctx.set(dut.i.payload.shift[lane], shift)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            if rng.random() < 0.3:
                await ctx.tick()

    async def sink(ctx):
        while len(received) < len(beats):
            ctx.set(dut.o.ready, rng.random() < 0.6)
            _, _, valid, ready, payload = await ctx.tick().sample(dut.o.valid, dut.o.ready, dut.o.payload)
            if valid and ready:
                received.append([int(payload[lane]) for lane in range(2)])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run_until(1e-4)
    assert received == expected


def _edge_vectors(acc_width, out_width):
    """(acc, mult, shift) whose results sit on every rounding tie and saturation boundary, at
    every shift: products ``v * 2**shift + d`` for results ``v`` around ``±qmax`` and 0 and
    offsets ``d`` around the tie ``2**(shift-1)``, with the acc range's ends."""
    qmax = (1 << (out_width - 1)) - 1
    lo, hi = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    vectors = []
    for shift in range(64):
        half = 1 << shift >> 1
        for v in (-qmax - 2, -qmax - 1, -qmax, -qmax + 1, -1, 0, 1, qmax - 1, qmax, qmax + 1, qmax + 2):
            for d in {-half - 1, -half, -half + 1, half - 1, half, half + 1, 0}:
                product = v * (1 << shift) + d
                # product = acc * mult with mult < 2**31: the largest power-of-two mult that
                # leaves acc in range, so that the product is exact
                for mult_shift in range(30, -1, -1):
                    acc, rest = divmod(product, 1 << mult_shift)
                    if rest == 0 and lo <= acc <= hi:
                        vectors.append((acc, 1 << mult_shift, shift))
                        break
        vectors += [(lo, (1 << 31) - 1, shift), (hi, (1 << 31) - 1, shift), (lo, 1, shift), (hi, 1, shift)]
    return vectors


@pytest.mark.parametrize(("acc_width", "out_width"), [(32, 8), (20, 6), (8, 3), (2, 2), (32, 16)])
def test_rounding_ties_and_saturation_boundaries_at_every_shift(acc_width, out_width):
    vectors = _edge_vectors(acc_width, out_width)
    lanes = 64
    vectors += [vectors[-1]] * (-len(vectors) % lanes)
    beats = [vectors[i:i + lanes] for i in range(0, len(vectors), lanes)]
    dut = Requantizer(acc_width=acc_width, out_width=out_width, lanes=lanes)
    received = []

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        for index in range(len(beats) + Requantizer.LATENCY):
            if index < len(beats):
                for lane, (acc, mult, shift) in enumerate(beats[index]):
                    ctx.set(dut.i.payload.acc[lane], acc)
                    ctx.set(dut.i.payload.mult[lane], mult)
                    ctx.set(dut.i.payload.shift[lane], shift)
            ctx.set(dut.i.valid, index < len(beats))
            await ctx.tick()
            if ctx.get(dut.o.valid):
                received.extend(int(ctx.get(dut.o.payload[lane])) for lane in range(lanes))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    acc, mult, shift = (torch.tensor([v[i] for v in vectors]) for i in range(3))
    assert received == requantize(acc, mult, shift, out_width).tolist()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"acc_width": 33}, r"acc_width must be an integer in 2\.\.32, not 33"),
    ({"out_width": 1}, r"out_width must be an integer in 2\.\.16, not 1"),
    ({"lanes": 0}, r"lanes must be an integer in 1\.\.64, not 0"),
    ({"lanes": 2.0}, r"lanes must be an integer"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Requantizer(**kwargs)


SWEEP = [(32, 8, 1), (32, 8, 8), (24, 8, 3), (16, 4, 2), (12, 16, 5), (2, 2, 1)]


@pytest.mark.verilator
@pytest.mark.parametrize(("acc_width", "out_width", "lanes"), SWEEP)
def test_verilog_matches_golden_under_idle_and_backpressure(acc_width, out_width, lanes):
    args = SimpleNamespace(config="tiny", seed=acc_width * 100 + lanes, acc_width=acc_width, out_width=out_width,
                           lanes=lanes, vectors=300)
    result, _params, lines = run_block("requant", args)
    assert result.ok, "\n".join(lines)
    runs = [r for r in result.reports if "idle" in r]
    assert [(r["idle"], r["stall"]) for r in runs] == [tuple(p) for p in DEFAULT_PATTERNS]
    assert all(r["mismatches"] == 0 and r["received"] == r["beats"] and not r["stream_violations"] for r in runs)
    (timing,) = [r for r in result.reports if "latency_cycles" in r]
    assert timing["latency_cycles"] == Requantizer.LATENCY
    assert timing["span_cycles"] == timing["beats"]


class RequantizerStreamCheck(Elaboratable):
    """The output keeps the stream rules, and no beat is lost or invented: the count of
    accepted outputs never exceeds accepted inputs, and never trails them by more than
    the pipeline depth."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = Requantizer(acc_width=6, out_width=3, lanes=1)
        reset_at_start(m)
        assume_stream_input(m, dut.i)
        assert_stream_output(m, dut.o)
        accepted_in = Signal(8)
        accepted_out = Signal(8)
        with m.If(dut.i.valid & dut.i.ready):
            m.d.sync += accepted_in.eq(accepted_in + 1)
        with m.If(dut.o.valid & dut.o.ready):
            m.d.sync += accepted_out.eq(accepted_out + 1)
        m.d.comb += [Assert(accepted_out <= accepted_in), Assert(accepted_in - accepted_out <= Requantizer.LATENCY)]
        return m


@pytest.mark.formal
def test_formal_stream_rules_and_beat_conservation():
    result = run_bmc(RequantizerStreamCheck(), name="requantizer-stream", depth=20)
    assert result.ok, f"{result.status}: {result.failed} (log {result.log})"

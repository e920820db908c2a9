"""cocotb testbench of :class:`moegen.rtl.requant.Requantizer` against golden ``requantize``.

Parameters (``MOEGEN_TB_PARAMS``): ``acc_width``, ``out_width``, ``lanes``, ``vectors``
(random beats on top of the adversarial set), ``seed``, ``patterns`` (a list of
``[idle, stall]`` probabilities, one run each).
"""

import random

import cocotb
import torch
from cocotb.triggers import ClockCycles

from moegen.golden.quant import MAX_SHIFT, MULT_BITS, requantize
from moegen.rtl.requant import SHIFT_BITS, requant_input_layout
from moegen.simulation import tb_params, write_tb_report

from .streams import StreamSink, StreamSource, reset, start_clock


def _field(value, width):
    return value & ((1 << width) - 1)


def adversarial_lanes(acc_width, rng):
    """Per-lane (acc, mult, shift) triples at the edges of every field and at rounding ties."""
    lo, hi = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    mult_max = (1 << MULT_BITS) - 1
    cases = []
    for shift in range(MAX_SHIFT + 1):
        cases += [(hi, mult_max, shift), (lo, mult_max, shift), (lo, 1, shift), (0, mult_max, shift), (-1, 1, shift)]
        if shift:  # exact ties: acc*mult = (2j+1) * 2**(shift-1)
            half = 1 << (shift - 1)
            for sign in (1, -1):
                odd = 2 * rng.randrange(0, 64) + 1
                if half < (1 << MULT_BITS) and odd <= hi:
                    cases.append((sign * odd, half, shift))
    return cases


def random_lane(acc_width, rng):
    acc = rng.randrange(-(1 << (acc_width - 1)), 1 << (acc_width - 1))
    mult = rng.choice([rng.randrange(1 << MULT_BITS), rng.randrange(1 << 16), 1 << rng.randrange(MULT_BITS)])
    shift = rng.choice([rng.randrange(MAX_SHIFT + 1), rng.randrange(25, 45)])
    return acc, mult, shift


class TB:
    def __init__(self, dut, params):
        self.dut = dut
        self.p = params
        self.layout = requant_input_layout(params["acc_width"], params["lanes"])
        self.rng = random.Random(params["seed"])

    def beats(self):
        """Input beats, each a list of ``lanes`` (acc, mult, shift) triples."""
        lanes, acc_width = self.p["lanes"], self.p["acc_width"]
        flat = adversarial_lanes(acc_width, self.rng)
        flat += [random_lane(acc_width, self.rng) for _ in range(self.p["vectors"] * lanes)]
        flat += [random_lane(acc_width, self.rng) for _ in range(-len(flat) % lanes)]
        return [flat[i : i + lanes] for i in range(0, len(flat), lanes)]

    def encode(self, beat):
        acc_w = self.p["acc_width"]
        value = 0
        for lane, (acc, mult, shift) in enumerate(beat):
            value |= _field(acc, acc_w) << (self.layout["acc"].offset + lane * acc_w)
            value |= mult << (self.layout["mult"].offset + lane * MULT_BITS)
            value |= shift << (self.layout["shift"].offset + lane * SHIFT_BITS)
        return value

    def decode(self, payload):
        width = self.p["out_width"]
        lanes = [(payload >> (lane * width)) & ((1 << width) - 1) for lane in range(self.p["lanes"])]
        return [v - (1 << width) if v >> (width - 1) else v for v in lanes]

    def expected(self, beats):
        acc, mult, shift = (torch.tensor([[lane[i] for lane in beat] for beat in beats]) for i in range(3))
        return requantize(acc, mult, shift, self.p["out_width"]).tolist()


@cocotb.test()
async def requantizer_matches_golden(dut):
    """Every beat under every idle/backpressure pattern equals golden; stream rules hold."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    beats = tb.beats()
    expected = tb.expected(beats)
    mismatches = []
    for idle, stall in params["patterns"]:
        await reset(dut)
        source = StreamSource(dut, "i", idle=idle, rng=random.Random(tb.rng.random()))
        sink = StreamSink(dut, "o", stall=stall, rng=random.Random(tb.rng.random()))
        sink_task = cocotb.start_soon(sink.run())
        await source.send([tb.encode(beat) for beat in beats])
        arrived = await sink.wait_for(len(beats), timeout_cycles=100 + 20 * len(beats))
        await ClockCycles(dut.clk, 4)
        sink_task.cancel()
        got = [tb.decode(p) for p in sink.beats]
        bad = [
            {"beat": i, "input": beats[i], "expected": expected[i], "got": got[i]}
            for i in range(min(len(got), len(beats)))
            if got[i] != expected[i]
        ]
        mismatches += bad
        write_tb_report({
            "idle": idle, "stall": stall, "beats": len(beats), "received": len(got), "timed_out": not arrived,
            "mismatches": len(bad), "first_mismatches": bad[:5], "stream_violations": sink.violations[:5],
            "cycles": sink.cycles[-1] if sink.cycles else None,
        })
        assert arrived and len(got) == len(beats), f"received {len(got)} of {len(beats)} beats"
        assert not sink.violations, sink.violations[0]
    assert not mismatches, f"{len(mismatches)} mismatching beats, first: {mismatches[0]}"


@cocotb.test()
async def requantizer_latency_and_throughput(dut):
    """With no idles or stalls: first result LATENCY cycles after the first beat, then one per cycle."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    await reset(dut)
    beats = [tb.encode(beat) for beat in tb.beats()[:32]]
    source = StreamSource(dut, "i")
    sink = StreamSink(dut, "o")
    sink_task = cocotb.start_soon(sink.run())
    first_offer = sink.cycle + 1
    await source.send(beats)
    await sink.wait_for(len(beats), timeout_cycles=200)
    sink_task.cancel()
    latency = sink.cycles[0] - first_offer
    span = sink.cycles[-1] - sink.cycles[0] + 1
    write_tb_report({"latency_cycles": latency, "beats": len(beats), "span_cycles": span})
    assert span == len(beats), f"{len(beats)} beats took {span} cycles: bubbles in the pipeline"

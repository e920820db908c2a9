"""cocotb testbench of :class:`moegen.rtl.expert.ExpertEngine` against golden ``expert_int``,
and the expert runs it shares with the unit tests.

Parameters (``MOEGEN_TB_PARAMS``): the engine's ``rows``, ``cols``, ``m``, ``n``,
``act_width``, ``weight_width``, ``acc_width``, ``hidden``, ``ffn``, ``max_tokens``; ``runs``,
a list of ``{"tokens", "seed", "idle_params", "idle_weights", "idle_x", "stall"}`` executed
back to back on the same build, each with its own random expert.
"""

import random

import cocotb
import torch
from amaranth import Shape
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from moegen.golden.expert import (
    ExpertWeights,
    expert_int,
    param_words,
    prune_expert,
    quantize_activations,
    quantize_expert,
    weight_stream,
)
from moegen.rtl.expert import COUNTERS, activation_words, counter_layout, expert_output_layout
from moegen.simulation import tb_params, write_tb_report

from .streams import StreamSink, StreamSource, reset, start_clock

__all__ = ["ExpertRun"]


class ExpertRun:
    """A random M:N expert quantized by golden, ``tokens`` inputs, the engine's input streams
    and the expected output beats.

    Members
    -------
    qe : QuantizedExpert
    y : tensor [tokens, hidden]
        ``expert_int``'s result.
    params, weights, x : list of int
        The engine's input streams.
    expected : list of (tuple of cols values, token, channel, last)
        The output beats, hidden tile by hidden tile, token by token; lanes past ``hidden``
        are 0.
    """

    def __init__(self, *, rows, cols, m, n, hidden, ffn, tokens, seed, act_width=8, weight_width=8):
        gen = torch.Generator().manual_seed(seed)
        dense = ExpertWeights(torch.randn(ffn, hidden, generator=gen) * hidden**-0.5,
                              torch.randn(ffn, hidden, generator=gen) * hidden**-0.5,
                              torch.randn(hidden, ffn, generator=gen) * ffn**-0.5)
        calibration = torch.randn(64, hidden, generator=gen)
        self.qe = quantize_expert(prune_expert(dense, m, n), calibration, m=m, n=n, cols=cols,
                                  weight_bits=weight_width, act_bits=act_width)
        # a wider spread than calibration, so some gate/up/output values saturate
        x = torch.randn(tokens, hidden, generator=gen) * (1 + 2 * torch.rand(tokens, 1, generator=gen))
        x_q, tok_mult, tok_shift, _ = quantize_activations(x, act_width)
        self.y = expert_int(x_q, tok_mult, tok_shift, self.qe)
        self.params = param_words(self.qe)
        self.weights = weight_stream(self.qe, tokens, rows)
        self.x = activation_words(x_q, tok_mult, tok_shift)
        self.tokens = tokens
        padded = torch.nn.functional.pad(self.y, (0, -hidden % cols))
        tiles = padded.shape[1] // cols
        self.expected = [
            (tuple(padded[t, i * cols:(i + 1) * cols].tolist()), t, i * cols, int(i == tiles - 1 and t == tokens - 1))
            for i in range(tiles) for t in range(tokens)
        ]


def decode_output(payload, cols, act_width, max_tokens, hidden):
    lay = expert_output_layout(cols, act_width, max_tokens, hidden)
    sign = 1 << (act_width - 1)
    base = lay["values"].offset
    values = tuple((((payload >> (base + c * act_width)) & ((1 << act_width) - 1)) ^ sign) - sign
                   for c in range(cols))
    fields = [(payload >> lay[name].offset) & ((1 << Shape.cast(lay[name].shape).width) - 1)
              for name in ("token", "channel", "last")]
    return (values, *fields)


def decode_counters(value):
    lay = counter_layout()
    return {name: (value >> lay[name].offset) & 0xFFFFFFFF for name in COUNTERS}


class TB:
    def __init__(self, dut, params):
        self.dut = dut
        self.p = params

    def make_run(self, spec):
        p = self.p
        return ExpertRun(rows=p["rows"], cols=p["cols"], m=p["m"], n=p["n"], hidden=p["hidden"], ffn=p["ffn"],
                         tokens=spec["tokens"], seed=spec["seed"], act_width=p["act_width"],
                         weight_width=p["weight_width"])

    async def run(self, run, spec):
        """One expert run; returns (decoded outputs, sink, counters, finished)."""
        dut, p = self.dut, self.p
        rng = random.Random(spec["seed"])
        cmd = StreamSource(dut, "run")
        sources = [
            StreamSource(dut, "params", idle=spec["idle_params"], rng=random.Random(rng.random())),
            StreamSource(dut, "weights", idle=spec["idle_weights"], rng=random.Random(rng.random())),
            StreamSource(dut, "x", idle=spec["idle_x"], rng=random.Random(rng.random())),
        ]
        sink = StreamSink(dut, "y", stall=spec["stall"], rng=random.Random(rng.random()))
        sink_task = cocotb.start_soon(sink.run())
        await cmd.send([run.tokens])
        tasks = [cocotb.start_soon(src.send(beats))
                 for src, beats in zip(sources, (run.params, run.weights, run.x), strict=True)]
        slow = 1 + 4 * max(spec["idle_params"], spec["idle_weights"], spec["idle_x"], spec["stall"])
        budget = int(slow * (2 * len(run.weights) + len(run.params) + len(run.x))) + 400
        arrived = await sink.wait_for(len(run.expected), timeout_cycles=budget)
        finished = await self._wait_idle(200)
        await ClockCycles(dut.clk, 2)
        sink_task.cancel()
        for task in tasks:
            task.cancel()
        outputs = [decode_output(b, p["cols"], p["act_width"], p["max_tokens"], p["hidden"]) for b in sink.beats]
        counters = decode_counters(int(dut.counters.value))
        return outputs, sink, counters, arrived and finished

    async def _wait_idle(self, cycles):
        for _ in range(cycles):
            await FallingEdge(self.dut.clk)
            await ReadOnly()
            if not self.dut.busy.value:
                return True
        return False


@cocotb.test()
async def expert_matches_golden(dut):
    """Every run's outputs equal golden expert_int, under its idle/stall pattern; the engine
    returns to idle after the last output and its counters add up."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    await reset(dut)
    failures = []
    for spec in params["runs"]:
        run = tb.make_run(spec)
        outputs, sink, counters, finished = await tb.run(run, spec)
        bad = [{"beat": i, "expected": list(run.expected[i]), "got": list(outputs[i])}
               for i in range(min(len(outputs), len(run.expected))) if outputs[i] != run.expected[i]]
        steps = len(run.weights)
        accounted = counters["steps"] + counters["stall_weights"] + counters["stall_activations"] \
            + counters["stall_output"]
        entry = {**spec, "beats": len(run.expected), "received": len(outputs),
                 "finished": finished, "mismatches": len(bad), "first_mismatches": bad[:3],
                 "stream_violations": sink.violations[:3], "counters": counters, "weight_records": steps,
                 "counters_ok": counters["steps"] == steps and accounted <= counters["busy"]}
        write_tb_report(entry)
        if bad or not finished or len(outputs) != len(run.expected) or sink.violations or not entry["counters_ok"]:
            failures.append(entry)
    assert not failures, f"{len(failures)} failing runs, first: {failures[0]}"

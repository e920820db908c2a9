"""cocotb testbench of :class:`moegen.rtl.array.SparseSystolicArray` against golden
``sparse_matmul``, and the stimulus it shares with the unit tests and ``moegen bench array``.

Parameters (``MOEGEN_TB_PARAMS``): the array's ``rows``, ``cols``, ``m``, ``n``,
``act_width``, ``weight_width``, ``acc_width``; ``cases``, a list of GEMMs
``{"k_dim", "out_dim", "tokens", "seed", "idle_a", "idle_w", "stall", "weights"}`` run one
after another on the same build (``weights`` and an optional ``prune`` as in
:func:`make_case`), and ``timing`` (a GEMM with no idles or stalls whose cycle counts are
reported).
"""

import random

import cocotb
import torch
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from moegen.golden.pack import pack_mn, prune_mn, sparse_matmul
from moegen.golden.quant import quantize_symmetric
from moegen.rtl.array import activation_layout, result_layout
from moegen.simulation import tb_params, write_tb_report

from .streams import StreamSink, StreamSource, reset, start_clock

__all__ = ["ArrayStimulus", "make_case"]


def _signed_range(bits):
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def make_case(*, m, n, cols, k_dim, out_dim, tokens, seed, act_width=8, weight_width=8, weights="random",
              prune=None):
    """A GEMM for the array: ``x [tokens, k_dim]`` and ``W [out_dim, k_dim]`` pruned to
    ``prune = (pm, pn)`` (default ``(m, n)``) and packed ``m:n`` for ``cols`` columns.

    ``weights``: ``"random"`` (uniform over the full range, some zeros, random sparsity
    patterns), ``"extreme"`` (every value at an end of its range: the largest products and
    sums) or ``"expert"`` (a Gaussian projection magnitude-pruned and quantized per channel as
    golden quantizes experts, with per-token quantized Gaussian activations).
    """
    pm, pn = prune or (m, n)
    gen = torch.Generator().manual_seed(seed)
    a_lo, a_hi = _signed_range(act_width)
    w_lo, w_hi = _signed_range(weight_width)
    if weights == "expert":
        w, _ = quantize_symmetric(prune_mn(torch.randn(out_dim, k_dim, generator=gen), pm, pn), weight_width, dim=1)
        x, _ = quantize_symmetric(torch.randn(tokens, k_dim, generator=gen), act_width, dim=1)
        return x, pack_mn(w, m, n, cols, value_bits=weight_width)
    if weights == "extreme":
        x = torch.where(torch.rand(tokens, k_dim, generator=gen) < 0.5, a_lo, a_hi)
        w = torch.where(torch.rand(out_dim, k_dim, generator=gen) < 0.5, w_lo, w_hi)
    else:
        x = torch.randint(a_lo, a_hi + 1, (tokens, k_dim), generator=gen)
        w = torch.randint(w_lo, w_hi + 1, (out_dim, k_dim), generator=gen)
        w = torch.where(torch.rand(out_dim, k_dim, generator=gen) < 0.1, 0, w)  # some groups underfull
    scores = torch.rand(out_dim, k_dim, generator=gen)  # random patterns, not just magnitude order
    return x, pack_mn(prune_mn(w, pm, pn, scores=scores), m, n, cols, value_bits=weight_width)


class ArrayStimulus:
    """Steps and expected results of a GEMM on an array with ``rows`` token lanes, in the
    order the expert engine uses: every weight tile once per token tile.

    Members
    -------
    steps : list of (activation beat payload, step record) integer pairs
    expected : list of (tuple of cols accumulators, row, last)
    tiles : int
        Tile passes (weight tiles x token tiles).
    """

    def __init__(self, x, packed, *, rows, act_width=8, acc_width=32):
        lay = packed.layout
        self.rows = rows
        self.groups = lay.groups
        self.layout = activation_layout(rows, lay.n, act_width)
        x = torch.as_tensor(x, dtype=torch.int64)
        tokens = x.shape[0]
        acc = sparse_matmul(x, packed)
        pad_out = lay.tiles * lay.cols - lay.out_features
        acc = torch.nn.functional.pad(acc, (0, pad_out))
        xg = torch.nn.functional.pad(x, (0, lay.groups * lay.n - lay.in_features)).reshape(tokens, lay.groups, lay.n)
        records = packed.step_records()
        token_tiles = -(-tokens // rows)
        mask = (1 << acc_width) - 1
        self.steps, self.expected = [], []
        for tile in range(lay.tiles):
            for tt in range(token_tiles):
                active = min(rows, tokens - tt * rows)
                for g in range(lay.groups):
                    beat = self._beat(xg[tt * rows:tt * rows + active, g].tolist(), g == lay.groups - 1, active,
                                      act_width, lay.n)
                    self.steps.append((beat, records[tile][g]))
                for r in range(active):
                    values = acc[tt * rows + r, tile * lay.cols:(tile + 1) * lay.cols].tolist()
                    # the accumulator wraps at acc_width bits; show it as the signed value
                    wrapped = tuple(((v & mask) ^ (1 << (acc_width - 1))) - (1 << (acc_width - 1)) for v in values)
                    self.expected.append((wrapped, r, int(r == active - 1)))
        self.tiles = lay.tiles * token_tiles

    def _beat(self, groups, last, active, act_width, n):
        value = 0
        data_offset = self.layout["data"].offset
        mask = (1 << act_width) - 1
        for r, group in enumerate(groups):
            for k, v in enumerate(group):
                value |= (v & mask) << (data_offset + (r * n + k) * act_width)
        value |= int(last) << self.layout["last"].offset
        value |= active << self.layout["rows"].offset
        return value


def decode_result(payload, rows, cols, acc_width):
    """(tuple of accumulators, row, last) of a result beat."""
    lay = result_layout(rows, cols, acc_width)
    acc_off, row_off, last_off = (lay[name].offset for name in ("acc", "row", "last"))
    sign = 1 << (acc_width - 1)
    accs = tuple((((payload >> (acc_off + c * acc_width)) & ((1 << acc_width) - 1)) ^ sign) - sign
                 for c in range(cols))
    row = (payload >> row_off) & ((1 << lay["row"].shape.width) - 1)
    return accs, row, (payload >> last_off) & 1


class TB:
    def __init__(self, dut, params):
        self.dut = dut
        self.p = params

    def stimulus(self, case):
        p = self.p
        x, packed = make_case(m=p["m"], n=p["n"], cols=p["cols"], k_dim=case["k_dim"], out_dim=case["out_dim"],
                              tokens=case["tokens"], seed=case["seed"], act_width=p["act_width"],
                              weight_width=p["weight_width"], weights=case.get("weights", "random"),
                              prune=case.get("prune"))
        return ArrayStimulus(x, packed, rows=p["rows"], act_width=p["act_width"], acc_width=p["acc_width"])

    async def run(self, stim, *, idle_a=0.0, idle_w=0.0, stall=0.0, seed=0):
        """Send every step, collect every result; returns (results, sink, fire cycles)."""
        dut, rng = self.dut, random.Random(seed)
        await reset(dut)
        src_a = StreamSource(dut, "a", idle=idle_a, rng=random.Random(rng.random()))
        src_w = StreamSource(dut, "w", idle=idle_w, rng=random.Random(rng.random()))
        sink = StreamSink(dut, "o", stall=stall, rng=random.Random(rng.random()))
        fires = []
        watcher = cocotb.start_soon(self._watch_fires(sink, fires))
        sink_task = cocotb.start_soon(sink.run())
        send_a = cocotb.start_soon(src_a.send([beat for beat, _ in stim.steps]))
        send_w = cocotb.start_soon(src_w.send([record for _, record in stim.steps]))
        budget = 200 + 4 * len(stim.steps) * (1 + int(10 * max(idle_a, idle_w, stall))) + 20 * len(stim.expected)
        arrived = await sink.wait_for(len(stim.expected), timeout_cycles=budget)
        await ClockCycles(dut.clk, 4)
        for task in (sink_task, send_a, send_w, watcher):
            task.cancel()
        p = self.p
        results = [decode_result(b, p["rows"], p["cols"], p["acc_width"]) for b in sink.beats]
        return results, sink, fires, arrived

    async def _watch_fires(self, sink, fires):
        """Cycle numbers (the sink's count) of every accepted step."""
        dut = self.dut
        while True:
            await FallingEdge(dut.clk)
            await ReadOnly()
            if dut.a__valid.value and dut.a__ready.value:
                fires.append(sink.cycle)


@cocotb.test()
async def array_matches_golden(dut):
    """Every GEMM case equals golden sparse_matmul, under its idle/stall pattern."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    failures = []
    for case in params["cases"]:
        stim = tb.stimulus(case)
        results, sink, _fires, arrived = await tb.run(stim, idle_a=case["idle_a"], idle_w=case["idle_w"],
                                                      stall=case["stall"], seed=case["seed"])
        bad = [{"beat": i, "expected": list(stim.expected[i]), "got": list(results[i])}
               for i in range(min(len(results), len(stim.expected))) if results[i] != stim.expected[i]]
        entry = {**case, "steps": len(stim.steps), "beats": len(stim.expected), "received": len(results),
                 "timed_out": not arrived, "mismatches": len(bad), "first_mismatches": bad[:3],
                 "stream_violations": sink.violations[:3]}
        write_tb_report(entry)
        if bad or not arrived or len(results) != len(stim.expected) or sink.violations:
            failures.append(entry)
    assert not failures, f"{len(failures)} failing cases, first: {failures[0]}"


@cocotb.test()
async def array_throughput(dut):
    """With no idles or stalls: one step per cycle and rows drained while the next tile runs."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    stim = tb.stimulus(params["timing"])
    results, sink, fires, arrived = await tb.run(stim)
    steps = len(stim.steps)
    write_tb_report({
        "timing": params["timing"], "steps": steps, "tiles": stim.tiles, "groups": stim.groups,
        "beats": len(stim.expected), "correct": results == stim.expected,
        "first_fire": fires[0], "last_fire": fires[-1], "fire_span": fires[-1] - fires[0] + 1,
        "first_result": sink.cycles[0], "last_result": sink.cycles[-1],
        "cycles": sink.cycles[-1] - fires[0] + 1, "result_cycles": sink.cycles,
    })
    assert arrived and results == stim.expected, "throughput run differs from golden"

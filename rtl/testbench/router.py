"""cocotb testbench of :class:`moegen.rtl.router.TopKRouter` against golden ``route``.

Parameters (``MOEGEN_TB_PARAMS``): the router's ``experts``, ``k_max``, ``lanes``,
``logit_width``, ``logit_frac``, ``weight_width``, ``mode``, ``bias_width``; ``latency`` and
``beats`` (what the component states); ``tokens`` (random tokens on top of the adversarial
set), ``seed``, ``patterns`` (a list of ``[idle, stall]`` probabilities, one run each).

The stimulus (:func:`make_tokens`, :func:`make_biases`) and the expected beats
(:func:`expected_beats`) are plain functions, shared with the amaranth.sim tests.
"""

import random
from typing import NamedTuple

import cocotb
import torch
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from moegen.golden.router import EXP_LUT_BITS, LOG2E_BITS, LOG2E_Q, SIGMOID_HALF, SIGMOID_IN_FRAC, route
from moegen.rtl.router import K_WIDTH, router_input_layout, router_output_layout
from moegen.simulation import tb_params, write_tb_report

from .streams import StreamSink, StreamSource, reset, start_clock


def router_params(router, *, tokens, seed, patterns):
    """Testbench parameters for ``router`` (a :class:`~moegen.rtl.router.TopKRouter`)."""
    names = ("experts", "k_max", "lanes", "logit_width", "logit_frac", "weight_width", "mode", "bias_width")
    return {name: getattr(router, name) for name in names} | {
        "latency": router.LATENCY, "beats": router.beats, "tokens": tokens, "seed": seed,
        "patterns": [list(p) for p in patterns],
    }


class Token(NamedTuple):
    """One token's stimulus: ``experts`` logits, the runtime ``k`` and ``top_p`` (None: off)."""

    logits: list
    k: int
    top_p: int | None
    kind: str


def _clamp(value, p):
    lo, hi = -(1 << (p["logit_width"] - 1)), (1 << (p["logit_width"] - 1)) - 1
    return max(lo, min(hi, value))


def _logit_sets(p, rng):
    """Adversarial logit vectors: (kind, logits)."""
    experts, width, frac = p["experts"], p["logit_width"], p["logit_frac"]
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    sets = [("all_equal", [v] * experts) for v in (lo, hi, 0, rng.randint(lo, hi))]
    sets.append(("extremes", [rng.choice((lo, hi)) for _ in range(experts)]))
    sets.append(("min_and_max", [hi if e == experts - 1 else lo for e in range(experts)]))
    for _ in range(3):
        values = [rng.randint(lo, hi) for _ in range(3)]
        sets.append(("few_values", [rng.choice(values) for _ in range(experts)]))
    for _ in range(3):  # a tie across the selection boundary
        logits = [rng.randint(lo, hi) for _ in range(experts)]
        top = max(logits)
        for e in rng.sample(range(experts), min(experts, rng.randint(1, p["k_max"] + 2))):
            logits[e] = top
        sets.append(("boundary_tie", logits))
    # exp edges: differences from the maximum where exp's table index or shift changes
    shift = LOG2E_BITS + frac - EXP_LUT_BITS
    edges = sorted({max(0, -(-(y << shift) // LOG2E_Q) + delta) for y in (256, 4096, 4352) for delta in (-1, 0, 1)})
    edges += [(16 << frac) - 1, 16 << frac]
    top = _clamp(rng.randint(0, hi), p)
    sets.append(("exp_edges", [_clamp(top - edges[e % len(edges)], p) if e else top for e in range(experts)]))
    # sigmoid table edges: +-8 (the table's ends) and one grid step inside
    rest = frac - SIGMOID_IN_FRAC
    grid = [x << rest if rest >= 0 else x >> -rest for x in (-SIGMOID_HALF - 1, -SIGMOID_HALF, -SIGMOID_HALF + 1,
                                                             SIGMOID_HALF - 1, SIGMOID_HALF, 0)]
    points = sorted({_clamp(g + d, p) for g in grid for d in (-1, 0, 1)})
    sets.append(("sigmoid_edges", [points[(e * 7) % len(points)] for e in range(experts)]))
    return sets


def _random_logits(p, rng):
    frac = p["logit_frac"]
    spread = rng.choice((0.5, 2.0, 6.0, 40.0))
    if rng.random() < 0.15:
        lo, hi = -(1 << (p["logit_width"] - 1)), (1 << (p["logit_width"] - 1)) - 1
        return [rng.randint(lo, hi) for _ in range(p["experts"])]
    return [_clamp(round(rng.gauss(0, spread) * (1 << frac)), p) for _ in range(p["experts"])]


def make_biases(p, rng):
    """Per-expert selection biases (``sigmoid_bias_renorm``; None otherwise): small values,
    repeats (key ties) and the extremes of ``bias_width``."""
    if p["mode"] != "sigmoid_bias_renorm":
        return None
    lo, hi = -(1 << (p["bias_width"] - 1)), (1 << (p["bias_width"] - 1)) - 1
    pool = [0, 0, lo, hi, rng.randint(-2000, 2000)]
    return [rng.choice(pool) if rng.random() < 0.4 else rng.randint(-3000, 3000) for _ in range(p["experts"])]


def golden(p, logits, k, top_p, biases):
    """Golden routing of one token: (indices, weights, count), padded to ``k_max`` slots with
    zeros (the router's output beat)."""
    r = route(torch.tensor([logits]), k=k, mode=p["mode"], logit_frac=p["logit_frac"],
              weight_width=p["weight_width"], top_p=top_p, bias=None if biases is None else torch.tensor(biases))
    pad = [0] * (p["k_max"] - k)
    return [max(0, i) for i in r.indices[0].tolist()] + pad, r.weights[0].tolist() + pad, int(r.count[0])


def make_tokens(p, rng, biases):
    """Adversarial tokens, then ``p["tokens"]`` random ones; each with a runtime ``k`` (often
    ``k_max``) and a top-p threshold that is off, random, or exactly at a cumulative weight
    of the token (and one unit either side)."""
    sets = _logit_sets(p, rng) + [("random", _random_logits(p, rng)) for _ in range(p["tokens"])]
    tokens = []
    for kind, logits in sets:
        k = p["k_max"] if rng.random() < 0.4 else rng.randint(1, p["k_max"])
        choice = rng.random()
        top_p = None
        if choice < 0.4:
            _, weights, _ = golden(p, logits, k, None, biases)
            cumulative = sum(weights[:rng.randint(1, k)])
            top_p = max(0, cumulative + rng.choice((-1, 0, 0, 1)))
        elif choice < 0.55:
            top_p = rng.choice((0, 1 << (p["weight_width"] - 1), rng.randrange(1 << p["weight_width"])))
        tokens.append(Token(logits, k, top_p, kind))
    return tokens


def expected_beats(p, tokens, biases):
    return [golden(p, t.logits, t.k, t.top_p, biases) for t in tokens]


def top_p_port(p, top_p):
    """The ``top_p`` port value: all ones (never cuts) for None."""
    return (1 << (p["weight_width"] + 1)) - 1 if top_p is None else top_p


class TB:
    def __init__(self, dut, params):
        self.dut = dut
        self.p = params
        self.rng = random.Random(params["seed"])
        self.in_layout = router_input_layout(params["lanes"], params["logit_width"])
        self.out_layout = router_output_layout(params["experts"], params["k_max"], params["weight_width"])
        dut.k.value = 1
        dut.top_p.value = top_p_port(params, None)
        dut.clear_errors.value = 0
        if params["mode"] == "sigmoid_bias_renorm":
            dut.bias__en.value = 0

    def encode(self, token):
        """A token's input beats as integers."""
        p = self.p
        width, lanes = p["logit_width"], p["lanes"]
        mask = (1 << width) - 1
        logits_at, last_at = self.in_layout["logits"].offset, self.in_layout["last"].offset
        beats = []
        for b in range(-(-p["experts"] // lanes)):
            value = 0
            for j, logit in enumerate(token.logits[b * lanes:(b + 1) * lanes]):
                value |= (logit & mask) << (logits_at + j * width)
            beats.append(value | int(b == -(-p["experts"] // lanes) - 1) << last_at)
        return beats

    def decode(self, payload):
        p = self.p
        index_w = self.out_layout["index"].shape.elem_shape.width
        weight_w = p["weight_width"]
        fields = {name: self.out_layout[name].offset for name in ("index", "weight", "count")}
        count_w = self.out_layout["count"].shape.width
        index = [(payload >> (fields["index"] + i * index_w)) & ((1 << index_w) - 1) for i in range(p["k_max"])]
        weight = [(payload >> (fields["weight"] + i * weight_w)) & ((1 << weight_w) - 1) for i in range(p["k_max"])]
        return index, weight, (payload >> fields["count"]) & ((1 << count_w) - 1)

    def controls(self, token):
        return {"k": token.k, "top_p": top_p_port(self.p, token.top_p)}

    async def load_biases(self, biases):
        dut = self.dut
        for e, bias in enumerate(biases):
            await FallingEdge(dut.clk)
            dut.bias__en.value = 1
            dut.bias__addr.value = e
            dut.bias__data.value = bias & ((1 << self.p["bias_width"]) - 1)
        await FallingEdge(dut.clk)
        dut.bias__en.value = 0


class TokenSource(StreamSource):
    """Sends tokens' beats on ``i``, setting the per-token controls with each first beat, and
    records the cycle each beat was accepted in (``clock()``: the sink's cycle count)."""

    def __init__(self, dut, *, idle, rng, clock):
        super().__init__(dut, "i", idle=idle, rng=rng)
        self.dut = dut
        self.clock = clock
        self.accepted = []

    async def send_tokens(self, items):
        """``items``: (beats, controls) per token; returns when the last beat was accepted."""
        for beats, controls in items:
            for n, beat in enumerate(beats):
                await FallingEdge(self.clk)
                while self.rng.random() < self.idle:
                    self.valid.value = 0
                    await FallingEdge(self.clk)
                if n == 0:
                    for name, value in controls.items():
                        getattr(self.dut, name).value = value
                self.valid.value = 1
                self.payload.value = beat
                await ReadOnly()
                while not self.ready.value:
                    await FallingEdge(self.clk)
                    await ReadOnly()
                self.accepted.append(self.clock())
        await FallingEdge(self.clk)
        self.valid.value = 0


async def _run(tb, tokens, *, idle, stall):
    """Send ``tokens`` under one idle/stall pattern; returns (source, sink, received, arrived)."""
    dut = tb.dut
    sink = StreamSink(dut, "o", stall=stall, rng=random.Random(tb.rng.random()))
    source = TokenSource(dut, idle=idle, rng=random.Random(tb.rng.random()), clock=lambda: sink.cycle)
    sink_task = cocotb.start_soon(sink.run())
    items = [(tb.encode(t), tb.controls(t)) for t in tokens]
    await source.send_tokens(items)
    beats = -(-tb.p["experts"] // tb.p["lanes"])
    arrived = await sink.wait_for(len(tokens), timeout_cycles=tb.p["latency"] + 50 + 20 * beats * len(tokens))
    await ClockCycles(dut.clk, 4)
    sink_task.cancel()
    return source, sink, [tb.decode(b) for b in sink.beats], arrived


def _mismatches(tokens, expected, got):
    return [
        {"token": n, "kind": tokens[n].kind, "logits": tokens[n].logits, "k": tokens[n].k, "top_p": tokens[n].top_p,
         "expected": expected[n], "got": got[n]}
        for n in range(min(len(got), len(expected)))
        if tuple(got[n]) != tuple(expected[n])
    ]


@cocotb.test()
async def router_matches_golden(dut):
    """Every token under every idle/backpressure pattern equals golden; stream rules hold;
    biases written once survive the resets between patterns."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    biases = make_biases(params, tb.rng)
    tokens = make_tokens(params, tb.rng, biases)
    expected = expected_beats(params, tokens, biases)
    failures = []
    for n, (idle, stall) in enumerate(params["patterns"]):
        await reset(dut)
        if biases is not None and n == 0:
            await tb.load_biases(biases)
        _, sink, got, arrived = await _run(tb, tokens, idle=idle, stall=stall)
        bad = _mismatches(tokens, expected, got)
        flags = {"k_error": int(dut.k_error.value), "framing_error": int(dut.framing_error.value),
                 "busy": int(dut.busy.value)}
        write_tb_report({
            "idle": idle, "stall": stall, "tokens": len(tokens), "received": len(got), "timed_out": not arrived,
            "mismatches": len(bad), "first_mismatches": bad[:5], "stream_violations": sink.violations[:5],
            "cycles": sink.cycles[-1] if sink.cycles else None, "flags": flags,
        })
        if not arrived or len(got) != len(tokens):
            failures.append(f"idle {idle} stall {stall}: received {len(got)} of {len(tokens)} tokens")
        failures += [f"idle {idle} stall {stall}: {v}" for v in sink.violations[:1]]
        failures += [f"idle {idle} stall {stall}: {len(bad)} mismatches, first {bad[0]}"] if bad else []
        if any(flags.values()):
            failures.append(f"idle {idle} stall {stall}: flags after valid tokens {flags}")
    assert not failures, "; ".join(failures)


@cocotb.test()
async def router_latency_and_throughput(dut):
    """No idle, no stall, k changing every token: every beat is accepted in consecutive
    cycles, tokens leave exactly ``beats`` cycles apart, the first after ``latency`` cycles."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    await reset(dut)
    biases = make_biases(params, tb.rng)
    if biases is not None:
        await tb.load_biases(biases)
    tokens = [Token(_random_logits(params, tb.rng), 1 + n % params["k_max"], None, "random") for n in range(24)]
    expected = expected_beats(params, tokens, biases)
    source, sink, got, arrived = await _run(tb, tokens, idle=0.0, stall=0.0)
    beats = params["beats"]
    last_beats = source.accepted[beats - 1::beats]
    latency = sink.cycles[0] - last_beats[0] if sink.cycles else None
    gaps = sorted({b - a for a, b in zip(sink.cycles, sink.cycles[1:], strict=False)})
    input_span = source.accepted[-1] - source.accepted[0] + 1
    bad = _mismatches(tokens, expected, got)
    write_tb_report({
        "latency_cycles": latency, "tokens": len(tokens), "beats_per_token": beats, "output_gaps": gaps,
        "cycles_per_token": (sink.cycles[-1] - sink.cycles[0]) / (len(sink.cycles) - 1) if len(sink.cycles) > 1
        else None, "input_span_cycles": input_span, "input_beats": len(source.accepted), "mismatches": len(bad),
    })
    assert arrived and not bad, f"{len(bad)} mismatches: {bad[:1]}"
    assert input_span == len(source.accepted), f"{len(source.accepted)} beats took {input_span} cycles to enter"
    assert gaps == [beats], f"output gaps {gaps}, expected exactly {beats}"
    assert latency == params["latency"], f"latency {latency}, stated {params['latency']}"


@cocotb.test()
async def router_flags_errors_and_clamps(dut):
    """k = 0 routes as k = 1 and k > k_max as k_max, both setting ``k_error``; a wrong
    ``last`` sets ``framing_error`` without disturbing the routing; ``clear_errors`` clears
    both; ``busy`` is low once the router has drained."""
    params = tb_params()
    tb = TB(dut, params)
    start_clock(dut)
    await reset(dut)
    biases = make_biases(params, tb.rng)
    if biases is not None:
        await tb.load_biases(biases)
    k_max, beats = params["k_max"], params["beats"]
    results = {}

    async def route_one(k_port, clamped, *, wrong_last=False):
        token = Token(_random_logits(params, tb.rng), clamped, None, "random")
        encoded = tb.encode(token)
        if wrong_last:
            encoded[-1] ^= 1 << tb.in_layout["last"].offset
        sink = StreamSink(dut, "o", rng=random.Random(1))
        source = TokenSource(dut, idle=0.0, rng=random.Random(2), clock=lambda: sink.cycle)
        task = cocotb.start_soon(sink.run())
        await source.send_tokens([(encoded, {"k": k_port, "top_p": top_p_port(params, None)})])
        await sink.wait_for(1, timeout_cycles=params["latency"] + 20 + beats)
        await ClockCycles(dut.clk, 2)
        task.cancel()
        got = tb.decode(sink.beats[0]) if sink.beats else None
        want = golden(params, token.logits, clamped, None, biases)
        await ReadOnly()
        flags = int(dut.k_error.value), int(dut.framing_error.value)
        await FallingEdge(dut.clk)
        return (got is not None and tuple(got) == tuple(want), *flags)

    async def clear():
        await FallingEdge(dut.clk)
        dut.clear_errors.value = 1
        await FallingEdge(dut.clk)
        dut.clear_errors.value = 0

    results["valid_k"] = await route_one(k_max, k_max)
    results["k_zero"] = await route_one(0, 1)
    await clear()
    results["after_clear"] = await route_one(1, 1)
    results["k_above"] = await route_one((1 << K_WIDTH) - 1, k_max)
    await clear()
    results["wrong_last"] = await route_one(k_max, k_max, wrong_last=True)
    await clear()
    await FallingEdge(dut.clk)
    await ReadOnly()
    busy = int(dut.busy.value)
    flags = (int(dut.k_error.value), int(dut.framing_error.value))
    write_tb_report({"error_checks": {name: list(r) for name, r in results.items()}, "busy_idle": busy,
                     "flags_cleared": list(flags)})
    want = {"valid_k": (True, 0, 0), "k_zero": (True, 1, 0), "after_clear": (True, 0, 0),
            "k_above": (True, 1, 0), "wrong_last": (True, 0, 1)}
    assert results == want, f"{results} != {want}"
    assert busy == 0 and flags == (0, 0), f"busy {busy}, flags {flags} after draining and clearing"

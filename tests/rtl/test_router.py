import random
from types import SimpleNamespace

import pytest
from amaranth import Array, Elaboratable, Fragment, Module, Signal, signed
from amaranth.back import verilog
from amaranth.hdl import Assert, Assume
from amaranth.sim import Simulator
from hypothesis import given
from hypothesis import strategies as st

from moegen.cli import main
from moegen.config import RouterConfig, load_config
from moegen.formal import assert_stream_output, assume_stream_input, free, reset_at_start, run_bmc
from moegen.generate import generate
from moegen.rtl.router import K_WIDTH, TopKRouter, merge_top, tree_schedule
from moegen.rtl.testbench.router import (
    expected_beats,
    golden,
    make_biases,
    make_tokens,
    router_params,
    top_p_port,
)
from moegen.verify import DEFAULT_PATTERNS, run_block

# -- the sorting network, in Python ----------------------------------------------------------


class IntOps:
    """The network's compare-exchange on plain integers (distinct keys)."""

    @staticmethod
    def maximum(a, b):
        return max(a, b)

    @staticmethod
    def exchange(a, b):
        return max(a, b), min(a, b)


@given(st.lists(st.integers(0, 1000), unique=True, max_size=12), st.lists(st.integers(1001, 2000), unique=True,
                                                                             max_size=12), st.integers(1, 8))
def test_merge_top_keeps_the_largest_k_in_order(a, b, k):
    mixed = random.Random(len(a) * 31 + len(b)).sample(a + b, len(a) + len(b))
    left, right = sorted(mixed[:len(a)], reverse=True), sorted(mixed[len(a):], reverse=True)
    assert merge_top(IntOps, left, right, k) == sorted(a + b, reverse=True)[:k]


@given(st.integers(1, 256), st.integers(1, 8))
def test_a_tree_of_merges_selects_the_top_k(lanes, k):
    values = random.Random(lanes * 8 + k).sample(range(10 * lanes), lanes)
    lists = [[v] for v in values]
    while len(lists) > 1:
        pairs = range(0, len(lists) - 1, 2)
        lists = [merge_top(IntOps, lists[i], lists[i + 1], k) for i in pairs] + lists[len(pairs) * 2:]
    assert lists[0] == sorted(values, reverse=True)[:k]


def test_tree_levels_are_packed_up_to_the_accumulating_merge_depth():
    assert tree_schedule(1, 8) == []
    assert tree_schedule(16, 2) == [1, 1, 1, 1]  # merges of two 2-lists are 2 levels deep, the loop's depth
    assert tree_schedule(16, 8) == [2, 1, 1]  # 1 + 2 levels, then 3, then 4 (the loop's depth)
    assert sum(tree_schedule(256, 8)) == 8


# -- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"experts": 1}, r"experts must be an integer in 2\.\.256, not 1"),
    ({"experts": 257}, r"experts must be an integer in 2\.\.256, not 257"),
    ({"experts": 4, "k_max": 5, "lanes": 4}, r"k_max must be an integer in 1\.\.4, not 5"),
    ({"k_max": 9}, r"k_max must be an integer in 1\.\.8, not 9"),
    ({"k_max": 0}, r"k_max must be an integer in 1\.\.8, not 0"),
    ({"experts": 8, "lanes": 9}, r"lanes must be an integer in 1\.\.8, not 9"),
    ({"logit_width": 3}, r"logit_width must be an integer in 4\.\.32, not 3"),
    ({"logit_width": 8, "logit_frac": 8}, r"logit_frac must be an integer in 0\.\.7, not 8"),
    ({"weight_width": 25}, r"weight_width must be an integer in 4\.\.24, not 25"),
    ({"mode": "topk_softmax"}, r"mode must be one of softmax_topk, softmax_topk_renorm, sigmoid_bias_renorm, "
                               r"not 'topk_softmax'"),
    ({"bias_width": 1}, r"bias_width must be an integer in 2\.\.24, not 1"),
    ({"lanes": 2.0}, r"lanes must be an integer"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(**kwargs)


def elaborated(router):
    Fragment.get(router, None)
    return router


def test_from_config_and_stated_timing():
    router = elaborated(TopKRouter.from_config(RouterConfig()))
    assert (router.experts, router.k_max, router.lanes, router.mode) == (8, 2, 8, "softmax_topk_renorm")
    # input register, 3 tree stages, 3 exp, sum, 13 reciprocal, product, weight, prefix sums, output
    assert router.beats == 1 and router.LATENCY == 1 + 3 + 3 + 1 + 13 + 4
    deepseek = elaborated(TopKRouter(experts=256, k_max=8, lanes=16, mode="sigmoid_bias_renorm"))
    assert deepseek.beats == 16 and deepseek.LATENCY == 31  # the docstring's second example
    assert elaborated(TopKRouter(experts=100, k_max=1, lanes=9)).beats == 12
    assert elaborated(TopKRouter(experts=5, lanes=2)).beats == 3
    assert "bias" in elaborated(TopKRouter(mode="sigmoid_bias_renorm")).signature.members
    assert "bias" not in router.signature.members


@pytest.mark.parametrize(("experts", "k_max", "lanes", "mode", "logit_frac"), [
    (2, 2, 1, "sigmoid_bias_renorm", 0), (2, 1, 1, "softmax_topk", 0), (3, 1, 1, "sigmoid_bias_renorm", 5),
    (2, 2, 2, "softmax_topk_renorm", 3),
])
def test_edge_configs_emit_no_zero_width_wires(experts, k_max, lanes, mode, logit_frac):
    router = TopKRouter(experts=experts, k_max=k_max, lanes=lanes, mode=mode, logit_width=8, logit_frac=logit_frac)
    assert "[-1:0]" not in verilog.convert(router, name="router", emit_src=False)  # Verilator refuses them


# -- amaranth.sim against golden -------------------------------------------------------------


def params_of(router, tokens=40, seed=0):
    return router_params(router, tokens=tokens, seed=seed, patterns=())


def simulate(router, tokens, biases, *, idle, stall, seed, controls=None):
    """Send ``tokens`` through ``router`` in amaranth.sim; returns the output beats and the
    final (k_error, framing_error, busy)."""
    p = params_of(router)
    rng = random.Random(seed)
    beats = router.beats
    received = []
    flags = []
    controls = controls or [(t.k, top_p_port(p, t.top_p)) for t in tokens]

    async def source(ctx):
        if biases is not None:
            for e, bias in enumerate(biases):
                ctx.set(router.bias.en, 1)
                ctx.set(router.bias.addr, e)
                ctx.set(router.bias.data, bias)
                await ctx.tick()
            ctx.set(router.bias.en, 0)
        for token, (k, top_p) in zip(tokens, controls, strict=True):
            for b in range(beats):
                while rng.random() < idle:
                    ctx.set(router.i.valid, 0)
                    await ctx.tick()
                for j in range(p["lanes"]):
                    e = b * p["lanes"] + j
                    ctx.set(router.i.payload.logits[j], token.logits[e] if e < p["experts"] else 0)
                ctx.set(router.i.payload.last, b == beats - 1)
                if b == 0:
                    ctx.set(router.k, k)
                    ctx.set(router.top_p, top_p)
                ctx.set(router.i.valid, 1)
                await ctx.tick().until(router.i.ready)
        ctx.set(router.i.valid, 0)

    async def sink(ctx):
        while len(received) < len(tokens):
            ctx.set(router.o.ready, rng.random() >= stall)
            _, _, valid, ready, payload = await ctx.tick().sample(router.o.valid, router.o.ready, router.o.payload)
            if valid and ready:
                k = p["k_max"]
                received.append(([int(payload.index[i]) for i in range(k)],
                                 [int(payload.weight[i]) for i in range(k)], int(payload.count)))
        await ctx.tick().repeat(4)
        flags.append((ctx.get(router.k_error), ctx.get(router.framing_error), ctx.get(router.busy)))

    sim = Simulator(router)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run_until(1e-8 * (len(tokens) * beats * 8 + router.LATENCY + 100 + len(biases or ())))
    return received, flags[0] if flags else None


SIM_CONFIGS = [
    # experts, k_max, lanes, mode, widths (logit, frac, weight)
    (4, 2, 4, "softmax_topk_renorm", (16, 8, 16)),
    (5, 3, 2, "softmax_topk", (16, 8, 16)),
    (6, 2, 4, "sigmoid_bias_renorm", (12, 7, 12)),
    (3, 3, 1, "softmax_topk_renorm", (8, 2, 8)),
    (7, 4, 7, "sigmoid_bias_renorm", (6, 3, 10)),
    (6, 3, 4, "softmax_topk_renorm", (32, 31, 24)),
    # k_max 1: a constant weight in the renorm modes (no divider), the other modes still divide
    (2, 1, 1, "softmax_topk_renorm", (8, 4, 8)),
    (5, 1, 2, "softmax_topk", (8, 4, 8)),
    (3, 1, 2, "sigmoid_bias_renorm", (8, 4, 8)),
]


@pytest.mark.parametrize(("experts", "k_max", "lanes", "mode", "widths"), SIM_CONFIGS)
def test_amaranth_sim_matches_golden_with_backpressure(experts, k_max, lanes, mode, widths):
    logit_width, logit_frac, weight_width = widths
    router = TopKRouter(experts=experts, k_max=k_max, lanes=lanes, mode=mode, logit_width=logit_width,
                        logit_frac=logit_frac, weight_width=weight_width)
    p = params_of(router, tokens=30, seed=experts)
    rng = random.Random(experts)
    biases = make_biases(p, rng)
    tokens = make_tokens(p, rng, biases)
    received, flags = simulate(router, tokens, biases, idle=0.3, stall=0.4, seed=experts)
    assert received == expected_beats(p, tokens, biases)
    assert flags == (0, 0, 0)


def test_amaranth_sim_clamps_runtime_k_and_flags_it():
    router = TopKRouter(experts=6, k_max=3, lanes=3)
    p = params_of(router)
    rng = random.Random(5)
    tokens = make_tokens(p | {"tokens": 2}, rng, None)[-2:]
    never = top_p_port(p, None)
    for k_port, k_routed in ((0, 1), ((1 << K_WIDTH) - 1, 3), (4, 3)):
        received, flags = simulate(router, tokens[:1], None, idle=0, stall=0, seed=1, controls=[(k_port, never)])
        assert received == [golden(p, tokens[0].logits, k_routed, None, None)]
        assert flags == (1, 0, 0)
    received, flags = simulate(router, tokens, None, idle=0, stall=0, seed=1, controls=[(1, never), (3, never)])
    assert received == [golden(p, tokens[0].logits, 1, None, None), golden(p, tokens[1].logits, 3, None, None)]
    assert flags == (0, 0, 0)


# -- cocotb + Verilator against golden -------------------------------------------------------


def verify(experts, k, lanes, mode, *, widths=(None, None, None), tokens=60, seed=1):
    logit_width, logit_frac, weight_width = widths
    args = SimpleNamespace(config="default", seed=seed, experts=experts, k=k, lanes=lanes, mode=mode,
                           logit_width=logit_width, logit_frac=logit_frac, weight_width=weight_width, tokens=tokens)
    result, params, lines = run_block("router", args)
    assert result.ok, "\n".join(lines)
    runs = [r for r in result.reports if "idle" in r]
    assert [(r["idle"], r["stall"]) for r in runs] == [tuple(p) for p in DEFAULT_PATTERNS]
    assert all(r["mismatches"] == 0 and r["received"] == r["tokens"] and not r["stream_violations"] for r in runs)
    (timing,) = [r for r in result.reports if "latency_cycles" in r]
    assert timing["latency_cycles"] == params["latency"]
    assert timing["output_gaps"] == [params["beats"]]
    assert timing["input_span_cycles"] == timing["input_beats"]
    (errors,) = [r for r in result.reports if "error_checks" in r]
    assert errors["busy_idle"] == 0 and errors["flags_cleared"] == [0, 0]
    return params


# one beat and many, powers of two and not, padded last beats, k = E, every mode
CI_SWEEP = [
    (16, 2, 16, "softmax_topk_renorm", (None, None, None)),  # the default config: one token per cycle
    (5, 3, 2, "softmax_topk", (None, None, None)),
    (12, 8, 5, "sigmoid_bias_renorm", (None, None, None)),
    (6, 6, 6, "softmax_topk", (4, 0, 4)),
    (2, 1, 1, "softmax_topk_renorm", (8, 4, 8)),  # the icebreaker preset's router: the weight is a constant
]
SLOW_SWEEP = [
    (256, 8, 16, "sigmoid_bias_renorm", (None, None, None)),  # DeepSeek-V3
    (256, 8, 32, "softmax_topk", (None, None, None)),
    (64, 8, 64, "softmax_topk_renorm", (None, None, None)),  # OLMoE / Qwen3-MoE-sized, one beat
    (60, 4, 8, "sigmoid_bias_renorm", (32, 20, 24)),  # Qwen1.5-MoE's 60 experts: 8 beats, padded
    (2, 2, 1, "sigmoid_bias_renorm", (4, 0, 4)),
    (7, 1, 7, "softmax_topk", (32, 31, 24)),
]


@pytest.mark.verilator
@pytest.mark.parametrize(("experts", "k", "lanes", "mode", "widths"), CI_SWEEP)
def test_verilog_matches_golden_under_idle_and_backpressure(experts, k, lanes, mode, widths):
    verify(experts, k, lanes, mode, widths=widths, seed=experts * 10 + k)


@pytest.mark.verilator
@pytest.mark.slow
@pytest.mark.parametrize(("experts", "k", "lanes", "mode", "widths"), SLOW_SWEEP)
def test_verilog_sweep_matches_golden(experts, k, lanes, mode, widths):
    verify(experts, k, lanes, mode, widths=widths, tokens=40, seed=experts * 10 + k)


# -- formal ----------------------------------------------------------------------------------


class RouterSelectionCheck(Elaboratable):
    """For any token (a free choice among the first four), its output beat holds exactly the
    ``count`` experts of largest key in order (descending logit, ties to the lower index):
    distinct, in range, every other expert ranked below the last one; ``count`` is the
    clamped ``k`` unless the emitted weights reach ``top_p`` earlier, where it stops at the
    first reach; unused slots are zero. Stream rules hold on both ports, and no token is
    invented. With ``reach``, instead asserts that the chosen token never leaves (to show
    the bound is deep enough for the properties to be exercised)."""

    EXPERTS, LANES, K_MAX = 4, 3, 3  # two beats, the second padded; k_max not a power of two

    def __init__(self, reach=False):
        self.reach = reach

    def elaborate(self, platform):
        m = Module()
        experts, lanes, k_max = self.EXPERTS, self.LANES, self.K_MAX
        m.submodules.dut = dut = TopKRouter(experts=experts, k_max=k_max, lanes=lanes, logit_width=4,
                                            logit_frac=0, weight_width=4, mode="softmax_topk_renorm")
        beats = dut.beats
        first = reset_at_start(m)
        assume_stream_input(m, dut.i)
        assert_stream_output(m, dut.o)
        m.d.comb += [dut.k.eq(free(K_WIDTH)), dut.top_p.eq(free(len(dut.top_p))), dut.clear_errors.eq(free(1))]
        with m.If(first):
            m.d.comb += Assume(~dut.i.valid)

        tracked = Signal(2, reset_less=True)
        with m.If(first):
            m.d.sync += tracked.eq(free(2))

        # the tracked token's logits and controls, captured as it enters
        beat = Signal(range(beats))
        tokens_in = Signal(4)
        tokens_out = Signal(4)
        logits = Array(Signal(signed(4), name=f"logit{e}") for e in range(experts))
        k = Signal(K_WIDTH)
        top_p = Signal(len(dut.top_p))
        accept = dut.i.valid & dut.i.ready
        with m.If(accept):
            m.d.sync += beat.eq(beat + 1)
            with m.If(beat == beats - 1):
                m.d.sync += [beat.eq(0), tokens_in.eq(tokens_in + 1)]
            with m.If(tokens_in == tracked):
                for b in range(beats):
                    with m.If(beat == b):
                        for j in range(lanes):
                            if b * lanes + j < experts:
                                m.d.sync += logits[b * lanes + j].eq(dut.i.payload.logits[j])
                with m.If(beat == 0):
                    m.d.sync += [k.eq(dut.k), top_p.eq(dut.top_p)]
        with m.If(dut.o.valid & dut.o.ready):
            m.d.sync += tokens_out.eq(tokens_out + 1)
        m.d.comb += Assert(tokens_out <= tokens_in)

        checking = dut.o.valid & (tokens_out == tracked)
        if self.reach:
            m.d.comb += Assert(~checking)
            return m

        index, weight, count = dut.o.payload.index, dut.o.payload.weight, dut.o.payload.count
        k_routed = Signal(range(k_max + 1))
        m.d.comb += k_routed.eq(k)
        with m.If(k == 0):
            m.d.comb += k_routed.eq(1)
        with m.If(k > k_max):
            m.d.comb += k_routed.eq(k_max)

        def ranks_above(a, b):
            return (logits[a] > logits[b]) | ((logits[a] == logits[b]) & (a < b))

        with m.If(checking):
            m.d.comb += [Assert(count >= 1), Assert(count <= k_routed)]
            cumulative = 0
            last = Array(index)[count - 1]
            for i in range(k_max):
                used = count > i
                cumulative = cumulative + weight[i]
                m.d.comb += [
                    Assert(~used | (index[i] < experts)),
                    Assert(used | ((index[i] == 0) & (weight[i] == 0))),
                    Assert(~(count > i + 1) | (cumulative < top_p)),
                    Assert(~(count == i + 1) | (count == k_routed) | (cumulative >= top_p)),
                ]
                if i + 1 < k_max:
                    m.d.comb += Assert(~(count > i + 1) | ranks_above(index[i], index[i + 1]))
                for j in range(i + 1, k_max):
                    m.d.comb += Assert(~(count > j) | (index[i] != index[j]))
            for e in range(experts):
                emitted = 0
                for i in range(k_max):
                    emitted = emitted | ((count > i) & (index[i] == e))
                m.d.comb += Assert(emitted | ranks_above(last, e))
        return m


FORMAL_DEPTH = 32  # tokens leave from cycle 26 on (latency 24), so three tokens are checked


@pytest.mark.formal
def test_formal_outputs_are_the_top_count_in_order_and_streams_hold():
    result = run_bmc(RouterSelectionCheck(), name="router-selection", depth=FORMAL_DEPTH, map_memories=True)
    assert result.ok, f"{result.status}: {result.failed} (log {result.log})"


@pytest.mark.formal
def test_formal_bound_reaches_the_checked_outputs():
    result = run_bmc(RouterSelectionCheck(reach=True), name="router-reach", depth=FORMAL_DEPTH, map_memories=True)
    assert result.status == "FAIL" and result.failed, f"{result.status}: no output within the bound ({result.log})"


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--k", "9"], "k_max must be an integer in 1..8, not 9"),
    (["--experts", "4", "--k", "5"], "k_max must be an integer in 1..4, not 5"),
    (["--experts", "8", "--lanes", "9"], "lanes must be an integer in 1..8, not 9"),
    (["--experts", "1"], "experts must be an integer in 2..256, not 1"),
    (["--mode", "nope"], "mode must be one of softmax_topk, softmax_topk_renorm, sigmoid_bias_renorm, not 'nope'"),
    (["--tokens", "0"], "tokens must be an integer in 1..100000, not 0"),
])
def test_verify_rejects_invalid_parameters_in_one_line(capsys, argv, message):
    assert main(["verify", "router", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"moegen: error: {message}\n"


def test_generate_emits_the_configured_router(tmp_path):
    generate(load_config("tiny"), tmp_path, ["router"])
    text = (tmp_path / "router.v").read_text()
    assert text.startswith("// Generated by moegen") and "module router(" in text
    assert "i__payload" in text and "o__payload" in text and "bias__en" not in text  # tiny routes by softmax

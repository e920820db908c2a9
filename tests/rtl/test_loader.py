import struct
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch
from amaranth import Array, Elaboratable, Module, Mux, Signal
from amaranth.hdl import Assert, Assume
from amaranth.hdl._ast import AnyConst  # public as amaranth.asserts.AnyConst, deprecated there
from amaranth.lib import data
from amaranth.lib.fifo import SyncFIFO
from amaranth.sim import Simulator

from moegen.config import load_config
from moegen.formal import assert_stream_output, assume_stream_input, free, reset_at_start, run_bmc
from moegen.golden.expert import QuantizedExpert, param_words, weight_stream
from moegen.golden.formats import HEADER_SIZE, ImageLayout
from moegen.golden.image import ImageErrorCode, write_image
from moegen.golden.pack import pack_mn
from moegen.rtl.loader import BankState, ExpertLoader, LoaderGeometry, TileStreamer
from moegen.rtl.memory import SimulatedMemory
from moegen.rtl.testbench.loader import LoaderHarness, make_expert
from moegen.verify import DEFAULT_PATTERNS, run_block


def test_geometry_of_the_default_config():
    g = LoaderGeometry.from_config(load_config("default"))
    # a 2:4 step record of 8 columns is 20 bytes: bank words are three 8-byte port words
    assert (g.step_bytes, g.word_bytes, g.lanes, g.bank_words) == (20, 24, 3, 342)
    assert (g.tile_beats, g.tile_words, g.tiles_per_image) == ((80, 160), (27, 54), 80)
    assert g.param_counts == (2 * 256 + 128 + 2, 64)
    assert g.run_bytes == 64 + 4 * 642 + 256 + 64 * 640 + 16 * 1280
    assert g.verify_bytes == load_config("default").image_layout.nbytes - HEADER_SIZE
    assert g.verified_images == 32  # 2 MiB holds 32 images: every expert of the demo model
    assert g.record_offsets() == [0, 4, 8, 12, 16, 20]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"banks": 1}, r"banks must be an integer in 2\.\.8, not 1"),
    ({"bank_bytes": 0}, r"bank_bytes must be an integer in 1\.\.16777216, not 0"),
    ({"bank_bytes": 512}, r"bank_bytes must hold one gate/up tile of 640 bytes, not 512"),
    ({"bank_bytes": 1024}, r"bank_bytes must hold one down tile of 1280 bytes, not 1024"),
    ({"port_width": 48}, r"port_width must be one of 8, 16, 32, 64, 128, 256, 512, not 48"),
    ({"burst_len": 0}, r"burst_len must be an integer in 1\.\.256, not 0"),
    ({"outstanding": 18}, r"outstanding must be an integer in 1\.\.17, not 18"),
    ({"size_bytes": 4100}, r"size_bytes must be a multiple of 64, not 4100"),
    ({"verified_images": 65}, r"verified_images must be an integer in 0\.\.64, not 65"),
    ({"rows": 0}, r"rows must be an integer in 1\.\.64, not 0"),
    ({"device_hash": -1}, r"device_hash must be an integer in 0\.\.4294967295, not -1"),
    ({"layout": (256, 512)}, r"layout must be an ImageLayout, not \(256, 512\)"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertLoader.from_config(load_config("default"), **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"latency": 1025}, r"latency must be an integer in 0\.\.1024, not 1025"),
    ({"bandwidth": 0}, r"bandwidth must be a number in \(0, 1\]"),
    ({"bandwidth": "fast"}, r"bandwidth must be a number in \(0, 1\], not 'fast'"),
    ({"seed": 0}, r"seed must be an integer in 1\.\.4294967295, not 0"),
])
def test_bad_memory_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulatedMemory.from_config(load_config("tiny"), **kwargs)


# ---- amaranth.sim: the tiny config's loader on its simulated memory, a few commands


def _reseal(image, offset, fmt, value):
    data_ = bytearray(image)
    struct.pack_into(fmt, data_, offset, value)
    struct.pack_into("<I", data_, 60, zlib.crc32(data_[:60]))
    return bytes(data_)


def test_amaranth_sim_runs_good_images_and_refuses_bad_ones():
    config = load_config("tiny")
    lay = config.image_layout
    loader = ExpertLoader.from_config(config, verified_images=2)
    memory = SimulatedMemory.from_config(config, latency=3, jitter=2)
    dut = LoaderHarness(loader=loader, memory=memory)
    g = loader.geometry
    qe = make_expert(lay, 5)
    good = write_image(qe, config_hash=config.device_hash, expert_id=9)
    bad_crc = bytearray(good)
    bad_crc[lay.offsets[3] + 5] ^= 1  # a params byte: the CRC is only known at the end
    bad_hash = _reseal(good, 8, "<I", config.device_hash ^ 1)
    images = {0: good, lay.nbytes: bytes(bad_crc), 2 * lay.nbytes: bad_hash}
    commands = [(0, 9, 3), (lay.nbytes, 9, 1), (2 * lay.nbytes, 9, 1), (0, 8, 1), (0, 9, 1)]
    want_done = [(9, 0), (9, ImageErrorCode.BAD_PAYLOAD_CRC), (9, ImageErrorCode.HASH_MISMATCH),
                 (8, ImageErrorCode.EXPERT_MISMATCH), (9, 0)]
    want_params = param_words(qe) * 2
    want_weights = weight_stream(qe, 3, config.array.rows) + weight_stream(qe, 1, config.array.rows)
    got = {"params": [], "weights": [], "done": []}

    async def driver(ctx):
        P = g.port_bytes
        for base, image in images.items():
            for i in range(0, len(image), P):
                ctx.set(dut.write.payload.addr, (base + i) // P)
                ctx.set(dut.write.payload.data, int.from_bytes(image[i:i + P], "little"))
                ctx.set(dut.write.valid, 1)
                await ctx.tick()
        ctx.set(dut.write.valid, 0)
        for addr, expert, tokens in commands:
            ctx.set(dut.cmd.payload.addr, addr)
            ctx.set(dut.cmd.payload.expert, expert)
            ctx.set(dut.cmd.payload.tokens, tokens)
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick().until(dut.cmd.ready)
        ctx.set(dut.cmd.valid, 0)

    async def sink(ctx):
        for name in got:
            ctx.set(getattr(dut, name).ready, 1)
        while len(got["done"]) < len(commands):
            *_, pv, pp, wv, wp, dv, dp = await ctx.tick().sample(
                dut.params.valid, dut.params.payload, dut.weights.valid, dut.weights.payload, dut.done.valid,
                dut.done.payload)
            if pv:
                got["params"].append(pp)
            if wv:
                got["weights"].append(wp)
            if dv:
                got["done"].append((dp.expert, dp.code))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(driver)
    sim.add_testbench(sink)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))  # the CRC's XOR network is a deep expression
    try:
        sim.run_until(2e-4)
    finally:
        sys.setrecursionlimit(limit)
    assert got["done"] == want_done
    assert got["params"] == want_params
    assert got["weights"] == want_weights


# ---- cocotb + Verilator: `moegen verify loader` over configs, memory timings and stalls

#: Config sections that differ from the default, per swept shape (the image sizes in bytes).
SHAPES = {
    # 8-bit port, dense 4:4 on 3 columns, banks exactly one tile stride, one word per burst
    "narrow": {"array": {"rows": 3, "cols": 3, "m": 4, "n": 4, "act_width": 8, "weight_width": 8, "acc_width": 32},
               "loader": {"banks": 3, "bank_bytes": 64},
               "memory": {"port_width": 8, "burst_len": 1, "outstanding": 1, "size_bytes": 4096, "latency": 0},
               "model": {"hidden": 12, "ffn": 8, "max_tokens": 7, "layers": 1}},
    # 512-bit port: a tile is smaller than one word and fills a bank; memory not a power of two
    "wide": {"array": {"rows": 2, "cols": 4, "m": 1, "n": 4, "act_width": 8, "weight_width": 6, "acc_width": 24},
             "loader": {"banks": 2, "bank_bytes": 64},
             "memory": {"port_width": 512, "burst_len": 2, "outstanding": 4, "size_bytes": 6400, "latency": 20},
             "model": {"hidden": 24, "ffn": 40, "max_tokens": 5, "layers": 1}},
    # 2:8 with 6-bit activations, an image spread over fifteen banks, partial token tiles
    "many": {"array": {"rows": 3, "cols": 4, "m": 2, "n": 8, "act_width": 6, "weight_width": 8, "acc_width": 32},
             "loader": {"banks": 4, "bank_bytes": 192},
             "memory": {"port_width": 32, "burst_len": 8, "outstanding": 3, "size_bytes": 8192, "latency": 12},
             "model": {"hidden": 40, "ffn": 56, "max_tokens": 10, "layers": 1}},
}


def _config_file(tmp_path, name):
    if name not in SHAPES:
        return name
    from moegen.config import AccelConfig

    path = tmp_path / f"{name}.yaml"
    path.write_text(AccelConfig.from_dict({"name": name, **SHAPES[name]}).to_yaml())
    return str(path)


def _verify(tmp_path, config, seed, **options):
    args = {"config": _config_file(tmp_path, config), "seed": seed, "banks": None, "bank_bytes": None,
            "port_width": None, "burst_len": None, "outstanding": None, "size_bytes": None, "latency": None,
            "jitter": 8, "bandwidth": 1.0, "rows": None, "verified_images": None, "commands": 12, **options}
    result, params, lines = run_block("loader", SimpleNamespace(**args))
    assert result.ok, "\n".join(lines)
    runs = result.reports
    assert [(r["idle"], r["stall"]) for r in runs] == [tuple(p) for p in DEFAULT_PATTERNS]
    for r in runs:
        assert r["finished"] and not r["mismatches"] and not r["stream_violations"] and not r["counter_errors"]
    # every refusal code was exercised, and runs of every kind emitted weights
    assert set().union(*(r["refused"] for r in runs)) == {code.name for code in ImageErrorCode}
    assert all(r["ok"] > 0 and r["records"] > 0 for r in runs)
    return runs, params


@pytest.mark.verilator
def test_verilog_matches_golden_on_the_tiny_config(tmp_path):
    runs, _ = _verify(tmp_path, "tiny", seed=11, commands=24)
    # hot images were rerun from the verified-image table: fewer verify passes than runs
    assert all(r["status"]["verify_passes"] < r["ok"] + r["refused"].get("BAD_PAYLOAD_CRC", 0) for r in runs)


SWEEP = [
    ("icebreaker", {"jitter": 3}),  # 16-bit port: params words assembled from two port words
    ("narrow", {"bandwidth": 0.6, "verified_images": 0, "jitter": 2}),  # every run verifies
    ("wide", {"jitter": 30}),
    ("many", {"bandwidth": 0.8}),
]


@pytest.mark.verilator
@pytest.mark.slow
@pytest.mark.parametrize(("config", "options"), SWEEP, ids=[name for name, _ in SWEEP])
def test_verilog_matches_golden_over_shapes_ports_and_memory_timing(tmp_path, config, options):
    _verify(tmp_path, config, seed=len(config), **options)


# ---- formal: bounded checks of the streamer (banks, order, stream rules) and the whole loader

FORMAL_LAYOUT = ImageLayout(1, 1, 1, 1, 1, 3, 2)  # 3 one-record tiles, 5 params words, 1 table word
FORMAL_HASH = 0x1234ABCD
FORMAL_EXPERT = 7
FORMAL_ROWS = 2


def _formal_expert():
    def t(*values):
        return torch.tensor(values, dtype=torch.int64)

    # distinct weights and parameter words, so any reordering shows
    return QuantizedExpert(pack_mn(t([1]), 1, 1, 1, value_bits=3), pack_mn(t([-2]), 1, 1, 1, value_bits=3),
                           pack_mn(t([3]), 1, 1, 1, value_bits=3), t(0x1234), t(5), t(0x2345), t(6), t(0x3456),
                           t(7), 0x7654321, 9, t(1, -1, 0, 1), 0.5, 2)


def _formal_geometry(**overrides):
    # banks of one 8-byte word: every tile fills a bank on its own
    params = {"layout": FORMAL_LAYOUT, "device_hash": FORMAL_HASH, "rows": FORMAL_ROWS, "banks": 2, "bank_bytes": 8,
              "port_width": 64, "burst_len": 4, "outstanding": 2, "size_bytes": 1024, "verified_images": 1}
    return {**params, **overrides}


def _rom(m, port, words, geometry, prop):
    """A memory that holds ``words`` (zeros above) and accepts and answers bursts in order
    whenever the solver likes; the loader must keep ``port.data`` ready (``prop``: Assert, or
    Assume where a check only looks for a reachable trace)."""
    g = geometry
    request = data.StructLayout({"addr": g.mem_addr_width, "beats": g.burst_len.bit_length()})
    # as many bursts as the loader's arbiter lets be in flight (one more than the memory queues)
    m.submodules.rom_queue = queue = SyncFIFO(width=request.size, depth=g.outstanding + 1)
    head = data.View(request, queue.r_data)
    req = port.req
    m.d.comb += [req.ready.eq(queue.w_rdy & free(1)), queue.w_en.eq(req.valid & req.ready),
                 queue.w_data.eq(req.payload)]
    beat = Signal(range(max(g.burst_len, 2)))
    give = Signal()
    word = Signal(g.port_width)
    m.d.comb += give.eq(queue.r_rdy & free(1))
    with m.Switch(head.addr + beat):
        for i, w in enumerate(words):
            with m.Case(i):
                m.d.comb += word.eq(w)
    m.d.comb += [port.data.valid.eq(give), port.data.payload.eq(word), prop(port.data.ready)]
    with m.If(give):
        with m.If(beat == head.beats - 1):
            m.d.comb += queue.r_en.eq(1)
            m.d.sync += beat.eq(0)
        with m.Else():
            m.d.sync += beat.eq(beat + 1)
    # the request stream keeps the stream rules
    held = Signal(len(req.payload.as_value()) + 1)
    m.d.sync += held.eq(Mux(req.valid & ~req.ready, (req.payload.as_value() << 1) | 1, 0))
    with m.If(held[0]):
        m.d.comb += [prop(req.valid), prop(req.payload.as_value() == held[1:])]


def _check_outputs(m, dut, tokens, prop, *, codes=None, payloads=("params", "weights")):
    """Stream rules on params, weights and done; a run emits exactly golden's streams in
    order and then completes with code 0, a refused command emits nothing; ``codes`` (a
    FIFO of the codes handed to the streamer) must match the completions in order."""
    for name in ("params", "weights", "done"):
        if prop is Assert:
            assert_stream_output(m, getattr(dut, name), name=name)
        else:
            m.d.comb += getattr(dut, name).ready.eq(free(1))
    qe = _formal_expert()
    words = param_words(qe)
    tt = Signal(2)
    m.d.comb += tt.eq(Mux(tokens == 0, 0, Mux(tokens <= FORMAL_ROWS, 1, 2)))
    records = {n: weight_stream(qe, n * FORMAL_ROWS, FORMAL_ROWS) for n in (1, 2)}
    word_at = Signal(range(len(words) + 1))
    record_at = Signal(range(len(records[2]) + 1))
    with m.If(dut.params.valid):
        m.d.comb += prop(word_at < len(words))
        if "params" in payloads:
            m.d.comb += prop(dut.params.payload == Array(words)[word_at])
    with m.If(dut.params.valid & dut.params.ready):
        m.d.sync += word_at.eq(word_at + 1)
    with m.If(dut.weights.valid):
        want = Mux(tt == 1, Array(records[1] + [0] * 3)[record_at], Array(records[2])[record_at])
        m.d.comb += [prop(word_at == len(words)), prop(record_at < 3 * tt)]
        if "weights" in payloads:
            m.d.comb += prop(dut.weights.payload == want)
    with m.If(dut.weights.valid & dut.weights.ready):
        m.d.sync += record_at.eq(record_at + 1)
    with m.If(dut.done.valid):
        with m.If(dut.done.payload.code == 0):
            m.d.comb += [prop(word_at == len(words)), prop(record_at == 3 * tt)]
        with m.Else():
            m.d.comb += [prop(word_at == 0), prop(record_at == 0)]
        if codes is not None:
            m.d.comb += [prop(codes.r_rdy), prop(dut.done.payload.code == codes.r_data)]
    with m.If(dut.done.valid & dut.done.ready):
        m.d.sync += [word_at.eq(0), record_at.eq(0)]
        if codes is not None:
            m.d.comb += codes.r_en.eq(1)


def _check_banks(m, probes, prop):
    for state, written, read in zip(probes.bank_state, probes.bank_written, probes.bank_read, strict=True):
        m.d.comb += [prop(~written | (state == BankState.FILLING)), prop(~read | (state == BankState.FULL))]
    m.d.comb += prop(~probes.overflow)


def _image_words(image, port_bytes):
    return [int.from_bytes(image[i: i + port_bytes], "little") for i in range(0, len(image), port_bytes)]


class StreamerCheck(Elaboratable):
    """The streamer fed any sequence of checked commands (runs of the image at block 0 with
    one token count, and refusals) by a memory of any timing, with any consumer stalls.

    With ``reach`` the properties become assumptions and the one assertion claims that no
    run with weights completes: the solver refuting it shows the properties are not vacuous
    within the depth."""

    def __init__(self, *, reach=False, payloads=("params", "weights")):
        self.reach = reach
        self.payloads = payloads

    def elaborate(self, platform):
        m = Module()
        prop = Assume if self.reach else Assert
        g = LoaderGeometry(**_formal_geometry())
        m.submodules.dut = dut = TileStreamer(geometry=g)
        reset_at_start(m)
        image = write_image(_formal_expert(), config_hash=FORMAL_HASH, expert_id=FORMAL_EXPERT)
        _rom(m, dut.mem, _image_words(image, g.port_bytes), g, prop)
        assume_stream_input(m, dut.checked, name="checked")
        tokens = AnyConst(3)
        run = dut.checked.payload
        m.d.comb += [Assume(tokens <= 2 * FORMAL_ROWS), Assume(run.tokens == tokens),
                     Assume((run.code == 0) | (run.code <= ImageErrorCode.BAD_PAYLOAD_CRC)),
                     Assume((run.code != 0) | (run.block == 0))]  # the checker passes only real images
        m.submodules.codes = codes = SyncFIFO(width=4, depth=8)  # the streamer holds up to 6
        m.d.comb += [codes.w_en.eq(dut.checked.valid & dut.checked.ready), codes.w_data.eq(run.code),
                     prop(codes.w_rdy)]
        _check_outputs(m, dut, tokens, prop, codes=codes, payloads=self.payloads)
        _check_banks(m, dut.probes, prop)
        if self.reach:
            done = dut.done.valid & (dut.done.payload.code == 0) & (tokens != 0)
            m.d.comb += Assert(~done)
        return m


class LoaderCheck(Elaboratable):
    """The whole loader: any commands (any address, expert id and write notices), a memory
    holding a good image and a copy with one payload byte flipped, any timing and stalls.

    With ``reach`` the properties become assumptions and the one assertion claims that no
    command is refused for its payload CRC."""

    def __init__(self, *, reach=False, **geometry):
        self.reach = reach
        self.geometry = geometry

    def elaborate(self, platform):
        m = Module()
        prop = Assume if self.reach else Assert
        m.submodules.dut = dut = ExpertLoader(**_formal_geometry(**self.geometry))
        reset_at_start(m)
        good = write_image(_formal_expert(), config_hash=FORMAL_HASH, expert_id=FORMAL_EXPERT)
        bad = bytearray(good)
        bad[3 * 64] ^= 1  # the down tile
        P = dut.geometry.port_bytes
        _rom(m, dut.mem, _image_words(good, P) + _image_words(bytes(bad), P), dut.geometry, prop)
        m.d.comb += [dut.written.valid.eq(free(1)), dut.written.addr.eq(free(len(dut.written.addr)))]
        assume_stream_input(m, dut.cmd, name="cmd")
        tokens = AnyConst(3)
        m.d.comb += [Assume(tokens <= 2 * FORMAL_ROWS), Assume(dut.cmd.payload.tokens == tokens)]
        _check_outputs(m, dut, tokens, prop)
        _check_banks(m, dut.probes, prop)
        if self.reach:
            m.d.comb += Assert(~dut.done.valid | (dut.done.payload.code != ImageErrorCode.BAD_PAYLOAD_CRC))
        return m


#: A 512-bit port: the header is one word and a verify pass five, so refusals of every kind,
#: the payload CRC's included, complete within the depth.
WIDE_PORT = {"port_width": 512, "bank_bytes": 64}


@pytest.mark.formal
def test_formal_streamer_banks_order_and_stream_rules():
    result = run_bmc(StreamerCheck(payloads=("weights",)), name="tile-streamer", depth=20, map_memories=True)
    assert result.ok, f"{result.status}: {result.failed} (log {result.log})"


@pytest.mark.formal
def test_formal_streamer_params_words_in_order():
    # the params words come first: the depth covers every word of the first runs
    result = run_bmc(StreamerCheck(), name="tile-streamer-params", depth=16, map_memories=True)
    assert result.ok, f"{result.status}: {result.failed} (log {result.log})"


@pytest.mark.formal
def test_formal_streamer_check_reaches_a_completed_run():
    result = run_bmc(StreamerCheck(reach=True), name="tile-streamer-reach", depth=24, map_memories=True)
    assert result.status == "FAIL" and len(result.failed) == 1 and result.trace is not None, result.status


@pytest.mark.formal
def test_formal_loader_never_emits_for_a_refused_command():
    result = run_bmc(LoaderCheck(**WIDE_PORT), name="expert-loader", depth=22, map_memories=True)
    assert result.ok, f"{result.status}: {result.failed} (log {result.log})"


@pytest.mark.formal
def test_formal_loader_check_reaches_a_payload_crc_refusal():
    result = run_bmc(LoaderCheck(reach=True, **WIDE_PORT), name="expert-loader-reach", depth=24, map_memories=True)
    assert result.status == "FAIL" and len(result.failed) == 1 and result.trace is not None, result.status

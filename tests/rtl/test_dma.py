import random

import pytest
from amaranth import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from moegen.rtl.dma import WordReader, WordWriter, port_words
from moegen.rtl.memory import SimulatedMemory

SIZE = 1024  # bytes of memory under test


class _Top(Elaboratable):
    def __init__(self, port_width):
        self.port_width = port_width
        self.memory = SimulatedMemory(size_bytes=SIZE, port_width=port_width, burst_len=4, outstanding=2, latency=5)
        addr_width = self.memory.addr_width
        self.reader = WordReader(addr_width=addr_width, port_width=port_width, burst_len=4, count_width=12,
                                 buffer_words=8)
        self.writer = WordWriter(addr_width=addr_width, port_width=port_width, count_width=12)

    def elaborate(self, platform):
        m = Module()
        m.submodules.memory, m.submodules.reader, m.submodules.writer = self.memory, self.reader, self.writer
        wiring.connect(m, self.reader.mem, self.memory.read)
        wiring.connect(m, self.writer.write, self.memory.write)
        return m


def _transfers(rng, port_bytes):
    """(byte address, words) pairs: addresses on port words, counts that end mid-word too."""
    plans = []
    for _ in range(6):
        words = rng.randrange(1, 40)
        span = port_words(words, port_bytes * 8) * port_bytes
        addr = rng.randrange(0, (SIZE - span) // port_bytes + 1) * port_bytes
        plans.append((addr, words))
    return plans


@pytest.mark.parametrize("port_width", [8, 16, 32, 64, 128])
def test_writer_then_reader_round_trip_words_with_zero_padding(port_width):
    rng = random.Random(port_width)
    port_bytes = port_width // 8
    top = _Top(port_width)
    plans = _transfers(rng, port_bytes)
    shadow = bytearray(SIZE)
    payloads = [[rng.randrange(1 << 32) for _ in range(words)] for _, words in plans]
    for (addr, words), values in zip(plans, payloads, strict=True):
        data = b"".join(v.to_bytes(4, "little") for v in values)
        data += bytes(port_words(words, port_width) * port_bytes - len(data))
        shadow[addr:addr + len(data)] = data
    got = []

    async def bench(ctx):
        for (addr, words), values in zip(plans, payloads, strict=True):
            ctx.set(top.writer.cmd.payload.addr, addr // port_bytes)
            ctx.set(top.writer.cmd.payload.words, words)
            ctx.set(top.writer.cmd.valid, 1)
            await ctx.tick().until(top.writer.cmd.ready)
            ctx.set(top.writer.cmd.valid, 0)
            for value in values:
                ctx.set(top.writer.i.payload, value)
                ctx.set(top.writer.i.valid, 1)
                await ctx.tick().until(top.writer.i.ready)
                ctx.set(top.writer.i.valid, 0)
                if rng.random() < 0.3:
                    await ctx.tick()
            while ctx.get(top.writer.busy):
                await ctx.tick()
        # read back everything the plans touched, with random consumer stalls
        for addr, words in plans:
            ctx.set(top.reader.cmd.payload.addr, addr // port_bytes)
            ctx.set(top.reader.cmd.payload.words, words)
            ctx.set(top.reader.cmd.valid, 1)
            await ctx.tick().until(top.reader.cmd.ready)
            ctx.set(top.reader.cmd.valid, 0)
            words_got = []
            while len(words_got) < words:
                ready = rng.random() < 0.7
                ctx.set(top.reader.o.ready, ready)
                _, _, valid, payload = await ctx.tick().sample(top.reader.o.valid, top.reader.o.payload)
                if valid and ready:
                    words_got.append(payload)
            ctx.set(top.reader.o.ready, 0)
            got.append(words_got)
            await ctx.tick().repeat(3)
            assert not ctx.get(top.reader.busy) and not ctx.get(top.reader.o.valid)

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    for (addr, words), words_got in zip(plans, got, strict=True):
        expected = [int.from_bytes(shadow[addr + 4 * i:addr + 4 * i + 4], "little") for i in range(words)]
        assert words_got == expected


def test_reader_streams_a_word_per_cycle_on_a_wide_port():
    top = _Top(64)
    cycles = []

    async def bench(ctx):
        ctx.set(top.reader.o.ready, 1)
        ctx.set(top.reader.cmd.payload.words, 64)
        ctx.set(top.reader.cmd.valid, 1)
        await ctx.tick()
        ctx.set(top.reader.cmd.valid, 0)
        start, seen = None, 0
        for cycle in range(400):
            _, _, valid = await ctx.tick().sample(top.reader.o.valid)
            if valid:
                start = cycle if start is None else start
                seen += 1
                if seen == 64:
                    cycles.append(cycle - start + 1)
                    return

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    # 32 port words in bursts of 4, 2 in flight, latency 5: a few bubbles at most
    assert cycles and cycles[0] <= 64 + 16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"port_width": 48}, "port_width must be one of 8, 16, 32, 64, 128, 256, 512, not 48"),
    ({"buffer_words": 2}, "buffer_words must be an integer in 4..4096"),
])
def test_reader_rejects_bad_parameters(kwargs, message):
    params = {"addr_width": 8, "port_width": 32, "burst_len": 4, "count_width": 8, "buffer_words": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        WordReader(**params)

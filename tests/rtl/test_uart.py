import os
import pty
import random
import threading
import tty

import pytest
from amaranth import Elaboratable, Module
from amaranth.hdl import Fragment
from amaranth.lib.wiring import connect
from amaranth.sim import Simulator

from moegen.config import load_config
from moegen.host.link import LinkClient, SerialTransport
from moegen.rtl.regmap import ID_VALUE
from moegen.rtl.top import Accelerator
from moegen.rtl.uart import UARTBridge, UARTReceiver, UARTTransmitter, uart_divisor

DIVISOR = 16


def frame_bits(byte, stop=1):
    """One 8N1 frame, start bit first."""
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


async def drive_line(ctx, pin, bits, period):
    """Drive ``bits`` on ``pin`` back to back, bit ``k`` from cycle ``round(k * period)`` on
    (``period`` may be fractional: a sender whose bit rate is off)."""
    now = 0
    for k, bit in enumerate(bits):
        ctx.set(pin, bit)
        end = round((k + 1) * period)
        await ctx.tick().repeat(end - now)
        now = end
    ctx.set(pin, 1)


def recorder(pin, samples):
    """A background testbench that appends ``pin``'s value every cycle to ``samples``."""
    async def record(ctx):
        while True:
            *_, value = await ctx.tick().sample(pin)
            samples.append(value)
    return record


def decode_line(samples, period):
    """(byte, stop bit) of every frame in a line sampled once per cycle, read mid-bit."""
    frames, at = [], 0
    while 0 in samples[at:]:
        start = samples.index(0, at)
        middle = start + period / 2
        bits = [samples[round(middle + k * period)] for k in range(1, 10)]
        frames.append((sum(bit << k for k, bit in enumerate(bits[:8])), bits[8]))
        at = round(middle + 9 * period)
    return frames


def run_receiver(bits, *, period, ready=True, cycles_after=4 * DIVISOR):
    """Bytes, framing errors and overruns of a :class:`UARTReceiver` fed ``bits``."""
    dut = UARTReceiver(divisor=DIVISOR)
    seen = {"bytes": [], "framing": 0, "overrun": 0}

    async def source(ctx):
        await ctx.tick().repeat(3)
        await drive_line(ctx, dut.rx, bits, period)
        await ctx.tick().repeat(cycles_after)

    async def sink(ctx):
        ctx.set(dut.o.ready, ready)
        while True:
            *_, valid, payload, framing, overrun = await ctx.tick().sample(
                dut.o.valid, dut.o.payload, dut.framing_error, dut.overrun)
            if valid and ready:
                seen["bytes"].append(payload)
            seen["framing"] += framing
            seen["overrun"] += overrun

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink, background=True)
    sim.run()
    return seen


def test_transmitter_sends_8n1_frames_back_to_back():
    dut = UARTTransmitter(divisor=DIVISOR)
    data = [0x00, 0xFF, 0x55, 0xA5, 0x01]
    samples = []

    async def source(ctx):
        for byte in data:
            ctx.set(dut.i.payload, byte)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(recorder(dut.tx, samples), background=True)
    sim.run_until(1e-8 * (len(data) * 10 * DIVISOR + 40))
    assert samples[0] == 1  # idle high out of reset
    start = samples.index(0)
    expected = [bit for byte in data for bit in frame_bits(byte) for _ in range(DIVISOR)]
    assert samples[start:start + len(expected)] == expected  # exact bit times, no gaps
    assert set(samples[start + len(expected):]) == {1}


@pytest.mark.parametrize("error", [-0.02, 0.0, 0.02])
def test_receiver_takes_back_to_back_bytes_within_two_percent(error):
    data = [0x00, 0xFF, 0x55, 0xAA, 0x0F, 0xF0, 0x81, 0x7E]
    bits = [bit for byte in data for bit in frame_bits(byte)]
    seen = run_receiver(bits, period=DIVISOR * (1 + error))
    assert seen == {"bytes": data, "framing": 0, "overrun": 0}


def test_receiver_reports_a_low_stop_bit_and_resynchronizes_after_the_break():
    bits = [*frame_bits(0x3C, stop=0), 0, 0, 0, 1, 1, *frame_bits(0xC3)]
    seen = run_receiver(bits, period=DIVISOR)
    assert seen == {"bytes": [0xC3], "framing": 1, "overrun": 0}


def test_receiver_ignores_a_glitch_shorter_than_half_a_bit():
    glitch = [0] * (DIVISOR // 2 - 3) + [1] * (2 * DIVISOR)
    seen = run_receiver(glitch + [bit for bit in frame_bits(0x42) for _ in range(DIVISOR)], period=1)
    assert seen == {"bytes": [0x42], "framing": 0, "overrun": 0}


def test_receiver_counts_an_overrun_and_keeps_the_first_byte():
    seen = run_receiver(frame_bits(0x11) + frame_bits(0x22), period=DIVISOR, ready=False)
    assert seen == {"bytes": [], "framing": 0, "overrun": 1}


class _Echo(Elaboratable):
    """A bridge whose received bytes go straight back out."""

    def __init__(self, divisor):
        self.bridge = UARTBridge(divisor=divisor, fifo_depth=4)

    def elaborate(self, platform):
        m = Module()
        m.submodules.bridge = self.bridge
        connect(m, self.bridge.rx, self.bridge.tx)
        return m


@pytest.mark.parametrize("error", [-0.02, 0.02])
def test_bridge_echoes_bytes_both_ways(error):
    top = _Echo(DIVISOR)
    pins = top.bridge.pins
    data = [*range(0, 256, 37), 0xFF, 0x00]
    period = DIVISOR * (1 + error)
    samples = []

    async def host(ctx):
        await drive_line(ctx, pins.rx, [bit for byte in data for bit in frame_bits(byte)], period)
        await ctx.tick().repeat(12 * DIVISOR)

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.add_testbench(recorder(pins.tx, samples), background=True)
    sim.run()
    assert decode_line(samples, DIVISOR) == [(byte, 1) for byte in data]


def test_divisor_from_clock_and_baud():
    assert uart_divisor(100e6, 3_000_000) == 33
    assert uart_divisor(30e6, 3_000_000) == 10
    for name, clock_hz, divisor in (("ulx3s-85f", None, 15), ("icebreaker", None, 10), ("tiny", 48e6, 16)):
        bridge = UARTBridge.from_config(load_config(name), clock_hz=clock_hz)
        Fragment.get(bridge, None)  # elaborates
        assert bridge.divisor == divisor
    with pytest.raises(ValueError, match=r"3000000 baud needs at least 4 cycles per bit; a 10 MHz clock gives 3\.33"):
        uart_divisor(10e6, 3_000_000)
    with pytest.raises(ValueError, match=r"divisor 6 is 5\.6% off, more than 2%"):
        uart_divisor(17e6, 3_000_000)
    with pytest.raises(ValueError, match=r"^link\.baud: "):
        UARTBridge.from_config(load_config("tiny"), clock_hz=5e6)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (UARTReceiver, {"divisor": 3}, r"divisor must be an integer in 4\.\.16777216, not 3"),
    (UARTTransmitter, {"divisor": 4.0}, r"divisor must be an integer"),
    (UARTBridge, {"divisor": 8, "fifo_depth": 0}, r"fifo_depth must be an integer in 1\.\.4096, not 0"),
])
def test_bad_parameters_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


class _BoardLink(Elaboratable):
    """The accelerator behind a UART bridge, as on a board."""

    def __init__(self, config, divisor):
        self.bridge = UARTBridge(divisor=divisor)
        self.accelerator = Accelerator(config, memory="bram")

    def elaborate(self, platform):
        m = Module()
        m.submodules.bridge = self.bridge
        m.submodules.accelerator = self.accelerator
        connect(m, self.bridge.rx, self.accelerator.rx)
        connect(m, self.accelerator.tx, self.bridge.tx)
        return m


def test_host_driver_reaches_the_accelerator_over_a_pty():
    """The host's serial transport on one end of a pty; the other end's bytes become UART
    frames on the simulated pins of a bridge in front of the accelerator, and back."""
    config = load_config("tiny")
    divisor = 4  # the fewest cycles per bit: the bit-level tests above use more
    top = _BoardLink(config, divisor)
    pins = top.bridge.pins
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    payload = bytes(random.Random(3).randrange(256) for _ in range(32))
    results, done = {}, threading.Event()

    def host():
        client = LinkClient(SerialTransport(path, baud=config.link.baud), timeout=120.0, retries=1)
        try:
            client.sync()
            results["identity"] = client.read_csr(0, 3)
            client.write_mem(64, payload)
            results["memory"] = client.read_mem(64, len(payload))
            results["stats"] = dict(client.stats)
        except Exception as error:  # reported by the test below
            results["error"] = error
        finally:
            client.close()
            done.set()

    async def to_device(ctx):
        while not done.is_set():
            try:
                data = os.read(master, 64)
            except BlockingIOError:
                await ctx.tick().repeat(10 * divisor)
                continue
            await drive_line(ctx, pins.rx, [bit for byte in data for bit in frame_bits(byte)], divisor)

    async def from_device(ctx):
        while True:
            while ctx.get(pins.tx):  # not `until`: this testbench is abandoned mid-wait when the host is done
                await ctx.tick()
            await ctx.tick().repeat(divisor // 2)
            byte = 0
            for k in range(8):
                await ctx.tick().repeat(divisor)
                byte |= ctx.get(pins.tx) << k
            await ctx.tick().repeat(divisor)
            os.write(master, bytes([byte]))

    thread = threading.Thread(target=host, daemon=True)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(to_device)
    sim.add_testbench(from_device, background=True)
    try:
        thread.start()
        sim.run()
        thread.join(timeout=10)
    finally:
        os.close(master)
        os.close(slave)
    assert "error" not in results, results.get("error")
    assert results["identity"][0] == ID_VALUE
    assert results["identity"][2] == config.device_hash
    assert results["memory"] == payload
    assert results["stats"]["retries"] == 0

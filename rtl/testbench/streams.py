"""Drive and monitor Amaranth ``stream.Signature`` ports from cocotb.

Timing discipline (race-free whatever order coroutines run in): every driver writes right
after the falling clock edge, every sampler reads in the ``ReadOnly`` phase that follows,
so a handshake seen there completes at the next rising edge.

Amaranth flattens a stream port ``i`` into ``i__valid``, ``i__ready`` and ``i__payload``;
payloads are plain integers here (pack them with the block's data layout).
"""

import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

__all__ = ["StreamSink", "StreamSource", "reset", "start_clock"]


def start_clock(dut, period_ns=10):
    cocotb.start_soon(Clock(dut.clk, period_ns, unit="ns").start())


async def reset(dut, cycles=2):
    dut.rst.value = 1
    for _ in range(cycles):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


class StreamSource:
    """Sends integer payloads on an input stream, idling randomly between beats.

    Parameters
    ----------
    idle : float
        Probability of holding ``valid`` low in a cycle where a beat could be offered.
    """

    def __init__(self, dut, name, *, idle=0.0, rng=None):
        self.clk = dut.clk
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.idle = idle
        self.rng = rng or random.Random(0)
        self.sent = 0
        self.valid.value = 0

    async def send(self, beats):
        """Send every beat in order; returns when the last one has been accepted."""
        for beat in beats:
            await FallingEdge(self.clk)
            while self.rng.random() < self.idle:
                self.valid.value = 0
                await FallingEdge(self.clk)
            self.valid.value = 1
            self.payload.value = beat
            await ReadOnly()
            while not self.ready.value:
                await FallingEdge(self.clk)
                await ReadOnly()
            self.sent += 1
        await FallingEdge(self.clk)
        self.valid.value = 0


class StreamSink:
    """Accepts beats from an output stream with random backpressure and checks the stream
    rules: once ``valid`` is high it stays high, with the same payload, until accepted.

    Parameters
    ----------
    stall : float
        Probability of holding ``ready`` low in a cycle.
    """

    def __init__(self, dut, name, *, stall=0.0, rng=None):
        self.clk = dut.clk
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.stall = stall
        self.rng = rng or random.Random(1)
        self.beats = []
        self.cycles = []  # cycle number of each accepted beat
        self.violations = []
        self.cycle = 0
        self.ready.value = 0

    async def run(self):
        pending = None  # payload offered but not accepted in the previous cycle
        while True:
            await FallingEdge(self.clk)
            self.cycle += 1
            self.ready.value = int(self.rng.random() >= self.stall)
            await ReadOnly()
            valid = bool(self.valid.value)
            payload = int(self.payload.value) if valid else None
            if pending is not None and payload != pending:
                self.violations.append(
                    f"cycle {self.cycle}: beat {pending:#x} withdrawn or changed before acceptance "
                    f"(valid={int(valid)}, payload={payload if payload is None else hex(payload)})")
            if valid and self.ready.value:
                self.beats.append(payload)
                self.cycles.append(self.cycle)
                pending = None
            else:
                pending = payload

    async def wait_for(self, count, timeout_cycles):
        """Wait until ``count`` beats arrived; returns False on timeout."""
        start = self.cycle
        while len(self.beats) < count:
            if self.cycle - start > timeout_cycles:
                return False
            await RisingEdge(self.clk)
        return True

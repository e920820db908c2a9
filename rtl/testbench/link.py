"""cocotb testbench of :class:`moegen.rtl.link.LinkEndpoint` against golden
:class:`~moegen.golden.link.LinkModel`, byte for byte, under injected faults.

The simulated top is :class:`LinkHarness`: the endpoint on a register file of the config's
register map, a simulated device memory and a command FIFO. :class:`DeviceModel` is the same
device behind a ``LinkModel``. :func:`traffic` draws random requests (every opcode, good and
bad, retries, sequence number 0) and faults (flipped, dropped, duplicated and truncated bytes,
garbage between frames, oversize headers, silences longer than the idle timeout inside a
frame); both sides get the same bytes, and every response byte must match.

Parameters (``MOEGEN_TB_PARAMS``, built by :func:`harness_params`): ``config`` (preset),
``max_payload``, ``idle_timeout``, ``mem_bytes``, ``port_width``, ``burst_len``,
``queue_words``, ``latency``, ``jitter`` and ``memory_seed`` (the memory's timing; the traffic
seed is kept out of the Verilog, so every seed reuses one build), ``seed``, ``faults`` (per
pattern) and ``patterns``
(``[idle, stall]`` pairs: rx valid gaps and tx backpressure, one traffic run each, one after
the other on the same device).
"""

import collections
import random
import struct
import zlib

import cocotb
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from moegen.config import load_config
from moegen.golden.link import (
    BYTE_FAULTS,
    REQUEST_HEADER,
    SYNC_REQUEST,
    FrameParser,
    LinkModel,
    Opcode,
    Status,
    corrupt,
)
from moegen.rtl.link import LinkEndpoint
from moegen.rtl.memory import SimulatedMemory
from moegen.rtl.regmap import RegisterFile, register_map
from moegen.simulation import tb_params, write_tb_report

from .streams import StreamSink, StreamSource, reset, start_clock

__all__ = ["FAULTS", "DeviceModel", "LinkHarness", "build_harness", "frame", "harness_params", "traffic"]

#: Cycles of silence beyond ``idle_timeout`` in a long gap, and below it in a short one.
GAP_MARGIN = 8
FAULTS = (*BYTE_FAULTS, "garbage", "oversize", "silence")


def harness_params(config, *, seed=1, faults=100, patterns=((0.0, 0.0),), **overrides):
    """Parameters of a :class:`LinkHarness` for preset ``config``: its link and memory, with
    the memory shrunk to four payloads (so random addresses hit written words and the end)
    and a short idle timeout; ``overrides`` replace any of them."""
    c = load_config(config)
    params = {"config": config, "max_payload": c.link.max_payload, "idle_timeout": 64,
              "port_width": c.memory.port_width,
              "burst_len": c.memory.burst_len, "queue_words": 16, "latency": c.memory.latency, "jitter": 3,
              "memory_seed": 1, "seed": seed, "faults": faults, "patterns": [list(p) for p in patterns]}
    params.update(overrides)
    params.setdefault("mem_bytes", 4 * params["max_payload"])
    return params


class LinkHarness(wiring.Component):
    """A :class:`LinkEndpoint` with a :class:`RegisterFile`, a :class:`SimulatedMemory` and a
    command FIFO. ``commands`` is the FIFO's output; ``STATUS`` shows its level (bits 8..15),
    ``LINK_FRAMES`` and ``LINK_DROPPED`` the endpoint's counters; other counters read 0."""

    def __init__(self, params):
        self.params = params
        self.link = LinkEndpoint(max_payload=params["max_payload"], idle_timeout=params["idle_timeout"],
                                 mem_bytes=params["mem_bytes"], port_width=params["port_width"],
                                 burst_len=params["burst_len"], queue_words=params["queue_words"])
        self.registers = RegisterFile(register_map(load_config(params["config"])))
        self.memory = SimulatedMemory(size_bytes=params["mem_bytes"], port_width=params["port_width"],
                                      burst_len=params["burst_len"], latency=params["latency"],
                                      jitter=params["jitter"], seed=params["memory_seed"])
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "commands": Out(stream.Signature(32)),
            "receiving": Out(1),
            "busy": Out(1),
            "frames": Out(32),
            "dropped": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.link = link = self.link
        m.submodules.registers = registers = self.registers
        m.submodules.memory = memory = self.memory
        m.submodules.queue = queue = SyncFIFO(width=32, depth=self.params["queue_words"])
        wiring.connect(m, wiring.flipped(self.rx), link.rx)
        wiring.connect(m, link.tx, wiring.flipped(self.tx))
        wiring.connect(m, link.csr, registers.bus)
        wiring.connect(m, link.mem_read, memory.read)
        wiring.connect(m, link.mem_write, memory.write)
        wiring.connect(m, link.submit, queue.w_stream)
        wiring.connect(m, queue.r_stream, wiring.flipped(self.commands))
        m.d.comb += [
            link.submit_space.eq(self.params["queue_words"] - queue.level),
            registers.values["STATUS"][0].eq(queue.level[:8] << 8),
            self.receiving.eq(link.receiving),
            self.busy.eq(link.busy),
            self.frames.eq(link.frames),
            self.dropped.eq(link.dropped),
        ]
        if "LINK_FRAMES" in registers.values:  # device.counters
            m.d.comb += [registers.values["LINK_FRAMES"][0].eq(link.frames),
                         registers.values["LINK_DROPPED"][0].eq(link.dropped)]
        return m


def build_harness(params):
    return LinkHarness(params)


class DeviceModel:
    """The device of :class:`LinkHarness` behind a golden :class:`LinkModel` (``link``):
    registers of the config's map, ``mem`` and the command ``queue`` (a list of words)."""

    def __init__(self, params):
        self.params = params
        self.words = {}
        for reg in register_map(load_config(params["config"])):
            for i in range(reg.count):
                self.words[reg.offset // 4 + i] = reg
        self.storage = {w: reg.reset for w, reg in self.words.items() if reg.access == "rw"}
        self.mem = bytearray(params["mem_bytes"])
        self.queue = []
        self.link = LinkModel(csr_read=self.csr_read, csr_write=self.csr_write, mem=self.mem, submit=self.submit,
                              max_payload=params["max_payload"], mem_word=params["port_width"] // 8,
                              csr_mapped=lambda address: address // 4 in self.words)

    def csr_read(self, address):
        word = address // 4
        reg = self.words[word]
        if reg.access == "rw":
            return self.storage[word]
        if reg.access == "wo":
            return 0
        if reg.constant:
            return reg.reset
        live = {"STATUS": (len(self.queue) % 256) << 8, "LINK_FRAMES": self.link.frames % (1 << 32),
                "LINK_DROPPED": self.link.dropped % (1 << 32)}
        return live.get(reg.name, 0)

    def csr_write(self, address, value):
        if address // 4 in self.storage:
            self.storage[address // 4] = value

    def submit(self, words):
        if len(self.queue) + len(words) > self.params["queue_words"]:
            return False
        self.queue += words
        return True


def frame(seq, opcode, address, length, payload=b"", reserved=0):
    """A request frame with any field values (``length`` need not match the payload)."""
    body = REQUEST_HEADER.pack(SYNC_REQUEST, seq, opcode, reserved, address, length) + bytes(payload)
    return body + struct.pack("<I", zlib.crc32(body[1:]))


class _Requests:
    """Random request frames for a device of ``params``: mostly valid, every status reachable."""

    def __init__(self, params, rng):
        self.p = params
        self.rng = rng
        self.seq = 0
        self.previous = None
        self.csr_words = len(DeviceModel(params).words)

    def _length(self, unit):
        rng, most = self.rng, self.p["max_payload"]
        roll = rng.random()
        if roll < 0.04:
            return most
        if roll < 0.1:
            return rng.randrange(1, most + 1)
        return unit * rng.randint(1, max(1, min(most, 48) // unit))

    def _mem_address(self, length, word):
        rng, size = self.rng, self.p["mem_bytes"]
        roll = rng.random()
        if roll < 0.05:
            return rng.randrange(1 << 32)
        if roll < 0.1:
            return size - length + word * rng.randint(-1, 2)
        if roll < 0.15:
            return rng.randrange(size)
        return word * rng.randrange(max(1, (size - length) // word + 1))

    def next(self):
        rng = self.rng
        if self.previous and rng.random() < 0.08:
            return self.previous  # a retry: the very same bytes
        self.seq = 0 if rng.random() < 0.03 else self.seq % 255 + 1
        word = self.p["port_width"] // 8
        kind = rng.choices(["nop", "read_csr", "write_csr", "read_mem", "write_mem", "submit", "bad_opcode"],
                           [1, 3, 3, 4, 4, 3, 1])[0]
        reserved = rng.randrange(256) if rng.random() < 0.1 else 0
        if kind == "nop":
            length = 0 if rng.random() < 0.8 else rng.randrange(1 << 16)
            frame_ = frame(self.seq, Opcode.NOP, rng.randrange(1 << 32), length, reserved=reserved)
        elif kind == "bad_opcode":
            frame_ = frame(self.seq, rng.randrange(6, 256), rng.randrange(1 << 32), rng.randrange(1 << 16))
        elif kind in ("read_csr", "write_csr"):
            length = 4 * rng.randint(1, 6) if rng.random() < 0.9 else self._length(1)
            address = 4 * rng.randrange(self.csr_words + 4) if rng.random() < 0.9 else rng.randrange(1 << 32)
            if kind == "read_csr":
                if rng.random() < 0.03:
                    length = rng.randrange(self.p["max_payload"], 1 << 16)
                frame_ = frame(self.seq, Opcode.READ_CSR, address, length, reserved=reserved)
            else:
                payload = rng.randbytes(length)
                frame_ = frame(self.seq, Opcode.WRITE_CSR, address, length, payload, reserved)
        elif kind == "submit":
            length = 4 * rng.randint(1, 8) if rng.random() < 0.9 else self._length(1)
            frame_ = frame(self.seq, Opcode.SUBMIT, rng.randrange(1 << 32), length, rng.randbytes(length))
        else:
            length = self._length(word) if rng.random() < 0.95 else 0
            address = self._mem_address(length, word)
            if kind == "read_mem":
                if rng.random() < 0.03:
                    length = rng.randrange(self.p["max_payload"], 1 << 16)
                frame_ = frame(self.seq, Opcode.READ_MEM, address % (1 << 32), length, reserved=reserved)
            else:
                frame_ = frame(self.seq, Opcode.WRITE_MEM, address % (1 << 32), length, rng.randbytes(length))
        self.previous = frame_
        return frame_


def _oversize_header(params, rng):
    """A sync byte and a write header announcing more than ``max_payload`` bytes; some of its
    bytes are sync bytes, so the re-parse of its bytes can find a frame start inside it."""
    opcode = rng.choice([Opcode.WRITE_CSR, Opcode.WRITE_MEM, Opcode.SUBMIT])
    body = bytearray(REQUEST_HEADER.pack(SYNC_REQUEST, rng.randrange(256), opcode, 0, rng.randrange(1 << 32),
                                         rng.randrange(params["max_payload"] + 1, 1 << 16)))
    for i in (1, 3, 4, 5, 6, 7):
        if rng.random() < 0.15:
            body[i] = SYNC_REQUEST
    return bytes(body)


def traffic(params, rng, *, faults):
    """Events for one run: ``("send", bytes)``, ``("gap", drain)`` (silence longer than the
    idle timeout once the responses are out; ``drain`` empties the command FIFO during it),
    ``("pause", cycles)`` (a silence shorter than the timeout). Returns (events, fault counts)."""
    requests = _Requests(params, rng)
    events, counts = [], dict.fromkeys(FAULTS, 0)
    while sum(counts.values()) < faults:
        if rng.random() < 0.65:
            events.append(("send", requests.next()))
            roll = rng.random()
            if roll < 0.05:
                events.append(("gap", rng.random() < 0.4))
            elif roll < 0.08:
                events.append(("pause", params["idle_timeout"] - GAP_MARGIN))
            continue
        kind = rng.choice(FAULTS)
        counts[kind] += 1
        data = bytearray(requests.next())
        i = rng.randrange(len(data))
        if kind in BYTE_FAULTS:
            data = bytearray(corrupt(data, kind, max(1, i) if kind == "truncate" else i, rng))
        elif kind == "garbage":
            data = bytearray(rng.choice([SYNC_REQUEST, rng.randrange(256)]) for _ in range(rng.randint(1, 24)))
        elif kind == "oversize":
            data = bytearray(_oversize_header(params, rng)) + (data if rng.random() < 0.5 else b"")
        if kind == "silence":
            cut = rng.randrange(1, len(data))
            events += [("send", bytes(data[:cut])), ("gap", False), ("send", bytes(data[cut:]))]
        else:
            events.append(("send", bytes(data)))
        if rng.random() < 0.6:
            events.append(("gap", rng.random() < 0.4))
    events.append(("gap", True))
    return events, counts


def _name(enum, value):
    return enum(value).name if value in enum.__members__.values() else "UNKNOWN"


class TB:
    def __init__(self, dut, params):
        self.dut = dut
        self.p = params
        self.device = DeviceModel(params)
        self.expected = bytearray()
        self.errors = []

    async def drain(self):
        """Take every word out of the command FIFO; compare with the model's queue."""
        dut, words = self.dut, []
        while True:
            await FallingEdge(dut.clk)
            dut.commands__ready.value = 1
            await ReadOnly()
            if not dut.commands__valid.value:
                break
            words.append(int(dut.commands__payload.value))
        await FallingEdge(dut.clk)
        dut.commands__ready.value = 0
        if words != self.device.queue:
            self.errors.append(f"command FIFO held {words}, the model's queue {self.device.queue}")
        self.device.queue.clear()

    async def settle(self, sink):
        """Wait until every expected response byte has arrived."""
        if not await sink.wait_for(len(self.expected), timeout_cycles=20 * len(self.expected) + 5000):
            self.errors.append(f"timed out with {len(sink.beats)} of {len(self.expected)} response bytes")
            return False
        await ClockCycles(self.dut.clk, REQUEST_HEADER.size + 2)  # any pushback is re-parsed by now
        return True

    async def run(self, events, source, sink):
        dut, link = self.dut, self.device.link
        for kind, arg in events:
            if kind == "send":
                self.expected += link.receive(arg)
                await source.send(list(arg))
            elif kind == "pause":
                await ClockCycles(dut.clk, arg)
            else:
                if not await self.settle(sink):
                    return
                busy, receiving = int(dut.busy.value), int(dut.receiving.value)
                if busy or receiving != bool(link.parser.buffer):
                    self.errors.append(f"after {len(sink.beats)} response bytes: busy {busy}, receiving {receiving}, "
                                       f"model buffer {bytes(link.parser.buffer).hex()}")
                await ClockCycles(dut.clk, self.p["idle_timeout"] + GAP_MARGIN)
                link.timeout()
                if arg:
                    await self.drain()
        await self.settle(sink)


@cocotb.test()
async def link_matches_golden(dut):
    """Every response byte equals golden's for the same request bytes, faults included; the
    counters agree and the command FIFO holds exactly what the model's queue holds."""
    params = tb_params()
    rng = random.Random(params["seed"])
    tb = TB(dut, params)
    start_clock(dut)
    dut.commands__ready.value = 0
    await reset(dut)
    sink = StreamSink(dut, "tx", rng=random.Random(rng.random()))
    sink_task = cocotb.start_soon(sink.run())
    for idle, stall in params["patterns"]:
        sink.stall = stall
        source = StreamSource(dut, "rx", idle=idle, rng=random.Random(rng.random()))
        events, counts = traffic(params, rng, faults=params["faults"])
        start = (len(tb.expected), sink.cycle, len(tb.errors), tb.device.link.frames, tb.device.link.dropped)
        await tb.run(events, source, sink)
        got = bytes(sink.beats)
        first_bad = next((i for i, (a, b) in enumerate(zip(got, tb.expected, strict=False)) if a != b), None)
        if first_bad is None and len(got) != len(tb.expected):
            first_bad = min(len(got), len(tb.expected))
        model = tb.device.link
        answered = FrameParser(responses=True).feed(bytes(tb.expected[start[0]:]))
        statuses = collections.Counter(f"{_name(Opcode, r.opcode)}/{Status(r.status).name}" for r in answered)
        write_tb_report({
            "idle": idle, "stall": stall, "faults": counts, "sent_bytes": sum(len(a) for k, a in events if k == "send"),
            "response_bytes": len(tb.expected) - start[0], "frames": model.frames - start[3],
            "dropped": model.dropped - start[4], "cycles": sink.cycle - start[1], "statuses": dict(statuses),
            "first_mismatch": None if first_bad is None else {
                "offset": first_bad, "got": got[first_bad:first_bad + 16].hex(),
                "expected": bytes(tb.expected[first_bad:first_bad + 16]).hex()},
            "counters": {"frames": [int(dut.frames.value), model.frames % (1 << 32)],
                         "dropped": [int(dut.dropped.value), model.dropped % (1 << 32)]},
            "errors": tb.errors[start[2]:][:5], "stream_violations": sink.violations[:5],
        })
        assert first_bad is None, f"response bytes differ from golden at offset {first_bad}"
        assert not tb.errors, tb.errors[0]
        assert not sink.violations, sink.violations[0]
        assert int(dut.frames.value) == model.frames % (1 << 32)
        assert int(dut.dropped.value) == model.dropped % (1 << 32)
    sink_task.cancel()

"""cocotb testbench of :class:`moegen.rtl.top.Accelerator`: link frames in, golden out.

The testbench is the host: it sends request frames byte by byte on ``rx`` (random idle
cycles), takes response bytes from ``tx`` (random backpressure), writes a
:class:`~moegen.rtl.testbench.device.Workload` into device memory, submits its commands,
polls ``FENCE`` and reads back every output buffer, which must equal what
:class:`~moegen.golden.device.DeviceModel` computed. It reports the cycles and the
simulation speed (the cocotb side of ``moegen bench sim``).

Parameters (``tb_params()``): ``config`` (a preset name or YAML text), ``seed``, ``errors``,
``idle``, ``stall``.
"""

import random
import struct
import time

import cocotb
from cocotb.triggers import FallingEdge

from moegen.config import AccelConfig, load_config
from moegen.golden.device import COMMAND_WORDS, QUEUE_COMMANDS
from moegen.golden.link import FrameParser, Opcode, Status, encode_request
from moegen.rtl.regmap import ID_VALUE, register_map
from moegen.rtl.testbench.device import Workload
from moegen.rtl.testbench.streams import StreamSink, StreamSource, reset, start_clock
from moegen.simulation import tb_params, write_tb_report


def config_from(text):
    """A preset name or the YAML text of a config."""
    import yaml

    return load_config(text) if "\n" not in text else AccelConfig.from_dict(yaml.safe_load(text))


class Host:
    """Request/response exchanges over the top's byte streams."""

    def __init__(self, dut, *, idle, stall, seed, max_payload):
        rng = random.Random(seed)
        self.rx = StreamSource(dut, "rx", idle=idle, rng=rng)
        self.tx = StreamSink(dut, "tx", stall=stall, rng=rng)
        self.parser = FrameParser(responses=True, max_payload=max_payload)
        self.max_payload = max_payload
        self.seq = 0
        self.taken = 0
        cocotb.start_soon(self.tx.run())

    async def request(self, opcode, address=0, payload=b"", read_length=0, timeout_cycles=200_000):
        frame = encode_request(self.seq, opcode, address, payload=payload, read_length=read_length)
        await self.rx.send(frame)
        waited = 0
        while True:
            fresh = bytes(self.tx.beats[self.taken:])
            self.taken = len(self.tx.beats)
            for response in self.parser.feed(fresh):
                assert response.seq == self.seq and response.opcode == opcode, response
                self.seq = self.seq % 255 + 1
                if response.status != Status.OK:
                    raise AssertionError(f"{Opcode(opcode).name} at 0x{address:x}: {Status(response.status).name}")
                return response.payload
            await FallingEdge(self.rx.clk)
            waited += 1
            assert waited < timeout_cycles, f"no response to {Opcode(opcode).name} in {timeout_cycles} cycles"

    async def write_mem(self, addr, data):
        for offset in range(0, len(data), self.max_payload):
            await self.request(Opcode.WRITE_MEM, addr + offset, payload=data[offset:offset + self.max_payload])

    async def read_mem(self, addr, nbytes):
        parts = []
        for offset in range(0, nbytes, self.max_payload):
            size = min(self.max_payload, nbytes - offset)
            parts.append(await self.request(Opcode.READ_MEM, addr + offset, read_length=size))
        return b"".join(parts)

    async def read_reg(self, offset):
        return struct.unpack("<I", await self.request(Opcode.READ_CSR, offset, read_length=4))[0]


@cocotb.test()
async def device_matches_golden(dut):
    params = tb_params()
    config = config_from(params["config"])
    regs = {reg.name: reg.offset for reg in register_map(config)}
    port = config.memory.port_width // 8
    start_clock(dut)
    await reset(dut)
    host = Host(dut, idle=params["idle"], stall=params["stall"], seed=params["seed"],
                max_payload=config.link.max_payload)
    started, wall = host.tx.cycle, time.monotonic()
    await host.request(Opcode.NOP)
    assert await host.read_reg(regs["ID"]) == ID_VALUE
    assert await host.read_reg(regs["CONFIG_HASH"]) == config.device_hash

    work = Workload(config, seed=params["seed"], errors=params["errors"])
    for addr, data in work.writes:
        await host.write_mem(addr, data + bytes(-len(data) % port))
    words = [w for command in work.commands for w in command]
    chunk = QUEUE_COMMANDS * COMMAND_WORDS
    for start in range(0, len(words), chunk):
        while True:
            payload = struct.pack(f"<{len(words[start:start + chunk])}I", *words[start:start + chunk])
            try:
                await host.request(Opcode.SUBMIT, payload=payload)
                break
            except AssertionError as error:
                assert "QUEUE_FULL" in str(error), error
    for _ in range(10_000):
        if not await host.read_reg(regs["STATUS"]) & 1:
            break
    assert await host.read_reg(regs["ERROR"]) == work.model.error
    assert await host.read_reg(regs["FENCE"]) == work.model.fence
    mismatches = []
    for addr, nbytes in work.outputs:
        padded = nbytes + -nbytes % port
        got = await host.read_mem(addr, padded)
        if got[:nbytes] != work.expected(addr, nbytes):
            mismatches.append(addr)
    cycles = host.tx.cycle - started
    seconds = time.monotonic() - wall
    write_tb_report({"cycles": cycles, "seconds": seconds, "cycles_per_s": cycles / seconds,
                     "mismatches": mismatches, "violations": host.tx.violations,
                     "commands": await host.read_reg(regs["COMMANDS"]) if "COMMANDS" in regs else None})
    assert not mismatches, f"output buffers at {mismatches} differ from golden"
    assert not host.tx.violations, host.tx.violations[:3]

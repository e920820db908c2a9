import dataclasses

import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.lib import wiring
from amaranth.sim import Simulator

from moegen.config import DeviceConfig, load_config
from moegen.golden.device import Command, CommandError, DeviceModel, ErrorSource, encode_command
from moegen.rtl.memory import SimulatedMemory
from moegen.rtl.testbench.device import Workload
from moegen.rtl.top import Accelerator, CommandProcessor
from moegen.simulation import run_cocotb


class _ProcessorTop(Elaboratable):
    """The command processor on a simulated memory the testbench can write and read."""

    def __init__(self, config):
        self.config = config
        self.processor = CommandProcessor(config)
        self.memory = SimulatedMemory.from_config(config)
        self.host_write = Signal()
        self.host_addr = Signal(self.memory.addr_width)
        self.host_data = Signal(config.memory.port_width)

    def elaborate(self, platform):
        m = Module()
        m.submodules.processor, m.submodules.memory = self.processor, self.memory
        wiring.connect(m, self.processor.mem, self.memory.read)
        wiring.connect(m, self.memory.written, self.processor.written)
        with m.If(self.host_write):
            m.d.comb += [self.memory.write.valid.eq(1), self.memory.write.payload.addr.eq(self.host_addr),
                         self.memory.write.payload.data.eq(self.host_data)]
        with m.Else():
            wiring.connect(m, self.processor.write, self.memory.write)
        for i in range(self.config.model.layers):
            m.d.comb += [self.processor.k[i].eq(self.config.router.k_max),
                         self.processor.top_p[i].eq((1 << (self.config.router.weight_width + 1)) - 1)]
        return m


def _simulate(config, writes, commands, *, read_bytes=0, cycles=200_000):
    """Write memory, submit the commands, run until idle; the processor's registers and the
    first ``read_bytes`` of memory."""
    top = _ProcessorTop(config)
    port = config.memory.port_width // 8
    state = {}

    async def bench(ctx):
        for addr, data in writes:
            data = data + bytes(-len(data) % port)
            for i in range(0, len(data), port):
                ctx.set(top.host_write, 1)
                ctx.set(top.host_addr, (addr + i) // port)
                ctx.set(top.host_data, int.from_bytes(data[i:i + port], "little"))
                await ctx.tick()
        ctx.set(top.host_write, 0)
        proc = top.processor
        for word in (w for command in commands for w in command):
            ctx.set(proc.cmd.payload, word)
            ctx.set(proc.cmd.valid, 1)
            await ctx.tick().until(proc.cmd.ready)
        ctx.set(proc.cmd.valid, 0)
        for _ in range(cycles):
            await ctx.tick()
            if not ctx.get(proc.busy):
                break
        else:
            raise AssertionError(f"still busy after {cycles} cycles")
        state["error"], state["fence"] = ctx.get(proc.error), ctx.get(proc.fence)
        state["members"] = set(proc.signature.members)
        if config.device.counters:
            state["commands"], state["routed"] = ctx.get(proc.commands), ctx.get(proc.routed_tokens)
        storage = top.memory.storage
        state["mem"] = b"".join(ctx.get(storage.data[i]).to_bytes(port, "little") for i in range(read_bytes // port))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return state


def test_accelerator_elaborates_with_the_deepest_memory_queue():
    """``memory.outstanding`` 16, the most a config allows: the arbiters in front of the
    memory keep one and two bursts more in flight."""
    from amaranth.hdl import Fragment

    tiny = load_config("tiny")
    config = dataclasses.replace(tiny, memory=dataclasses.replace(tiny.memory, outstanding=16))
    for memory in ("sim", "bram"):
        Fragment.get(Accelerator(config, memory=memory), None)


@pytest.mark.parametrize("errors", [False, True], ids=["clean", "error-stops-queue"])
@pytest.mark.parametrize("counters", [True, False], ids=["counters", "no-counters"])
def test_processor_matches_the_device_model_on_tiny(errors, counters):
    config = dataclasses.replace(load_config("tiny"), device=DeviceConfig(counters=counters))
    work = Workload(config, seed=3, errors=errors)
    state = _simulate(config, work.writes, work.commands, read_bytes=work.end)
    model = work.model
    assert (state["error"], state["fence"]) == (model.error, model.fence)
    if counters:
        assert (state["commands"], state["routed"]) == (model.commands, model.routed_tokens)
    else:
        assert not {"commands", "routed_tokens", "busy_cycles"} & state["members"]
    for addr, nbytes in work.outputs:
        assert state["mem"][addr:addr + nbytes] == work.expected(addr, nbytes), f"buffer at {addr}"
    if errors:
        assert model.error == (ErrorSource.COMMAND << 8 | CommandError.BAD_ADDRESS)


@pytest.mark.parametrize("errors", [False, True], ids=["clean", "error-stops-queue"])
def test_processor_matches_the_device_model_on_the_icebreaker_preset(errors):
    """One token at most, one layer, two experts, k_max 1, a 16-bit port (in 16 KiB: the
    workload's images and buffers do not fit the board's 4 KiB)."""
    config = load_config("icebreaker")
    config = dataclasses.replace(config, memory=dataclasses.replace(config.memory, size_bytes=16384))
    work = Workload(config, seed=4, errors=errors)
    state = _simulate(config, work.writes, work.commands, read_bytes=work.end)
    assert (state["error"], state["fence"]) == (work.model.error, work.model.fence)
    for addr, nbytes in work.outputs:
        assert state["mem"][addr:addr + nbytes] == work.expected(addr, nbytes), f"buffer at {addr}"


@pytest.mark.parametrize("port_width", [64, 128])
def test_processor_matches_the_device_model_on_wide_ports(port_width):
    """Ports wider than a word: padded outputs, DMA counts kept apart from the byte lengths."""
    config = load_config("tiny")
    config = dataclasses.replace(config, memory=dataclasses.replace(config.memory, port_width=port_width))
    work = Workload(config, seed=6, errors=True)
    state = _simulate(config, work.writes, work.commands, read_bytes=work.end)
    assert (state["error"], state["fence"]) == (work.model.error, work.model.fence)
    for addr, nbytes in work.outputs:
        assert state["mem"][addr:addr + nbytes] == work.expected(addr, nbytes), f"buffer at {addr}"


_TINY = load_config("tiny")
_END = _TINY.memory.size_bytes
# tiny: 4 experts (16 logit bytes a token), 3 route words, hidden 16 (64 accumulator bytes a row)
_COMMANDS = {
    "opcode": encode_command(99),
    "layer": encode_command(Command.ROUTE, 7, 1, 0, 0),
    "route-count": encode_command(Command.ROUTE, 0, 0, 0, 0),
    "route-misaligned": encode_command(Command.ROUTE, 0, 1, 32, 0),
    "route-logits-past-end": encode_command(Command.ROUTE, 0, 5, _END - 64, 0),
    "route-logits-at-end": encode_command(Command.ROUTE, 0, 4, _END - 64, 0),
    "route-out-past-end": encode_command(Command.ROUTE, 0, 6, 0, _END - 64),
    "route-beyond-memory": encode_command(Command.ROUTE, 0, 1, _END + 64, 0),
    "store-count": encode_command(Command.ACC_STORE, 0, _TINY.model.max_tokens + 1),
    "store-past-end": encode_command(Command.ACC_STORE, _END - 64, 2),
    "store-at-end": encode_command(Command.ACC_STORE, _END - 64, 1),
    "clear-count": encode_command(Command.ACC_CLEAR, 0),
    "expert-count": encode_command(Command.RUN_EXPERT, 0, 0, 0, 0),
    "expert-image-misaligned": encode_command(Command.RUN_EXPERT, 32, 1 << 16, 0, 0),
    "expert-image-beyond-memory": encode_command(Command.RUN_EXPERT, _END + 64, 1 << 16, 0, 0),
    "expert-table-misaligned": encode_command(Command.RUN_EXPERT, 0, 1 << 16, 0, _END - 2),
    # 4 tokens of 5 activation words (hidden 16 and the factor word) are 80 bytes: 16 past the end
    "expert-x-past-end": encode_command(Command.RUN_EXPERT, 0, 4 << 16, _END - 64, 0),
}


@pytest.mark.parametrize("name", list(_COMMANDS))
def test_command_checks_match_the_device_model(name):
    """The error a command raises (or none), and that the commands after an error are discarded."""
    commands = [_COMMANDS[name], encode_command(Command.FENCE, 5)]
    model = DeviceModel(_TINY)
    model.submit([word for command in commands for word in command])
    state = _simulate(_TINY, [], commands)
    assert (state["error"], state["fence"], state["commands"]) == (model.error, model.fence, model.commands)


def test_command_checks_cover_every_command_error():
    errors = set()
    for words in _COMMANDS.values():
        model = DeviceModel(_TINY)
        model.submit(words)
        errors.add(model.error)
    assert {ErrorSource.COMMAND << 8 | code for code in CommandError if code != CommandError.BAD_ROW} <= errors
    assert 0 in errors


@pytest.mark.verilator
@pytest.mark.parametrize(("idle", "stall", "errors"), [(0.0, 0.0, False), (0.3, 0.3, True)])
def test_verilog_top_over_the_link_matches_golden_on_tiny(idle, stall, errors):
    config = load_config("tiny")
    result = run_cocotb(Accelerator(config), name="moegen_top", test_module="moegen.rtl.testbench.top",
                        params={"config": "tiny", "seed": 5, "errors": errors, "idle": idle, "stall": stall})
    assert result.ok, f"{result.failed} failed; see {result.log}"
    (report,) = result.reports
    assert report["mismatches"] == [] and report["violations"] == []

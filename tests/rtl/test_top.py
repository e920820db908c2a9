import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.lib import wiring
from amaranth.sim import Simulator

from moegen.config import load_config
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
        state["commands"], state["routed"] = ctx.get(proc.commands), ctx.get(proc.routed_tokens)
        storage = top.memory.storage
        state["mem"] = b"".join(ctx.get(storage.data[i]).to_bytes(port, "little") for i in range(read_bytes // port))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return state


@pytest.mark.parametrize("errors", [False, True], ids=["clean", "error-stops-queue"])
def test_processor_matches_the_device_model_on_tiny(errors):
    config = load_config("tiny")
    work = Workload(config, seed=3, errors=errors)
    state = _simulate(config, work.writes, work.commands, read_bytes=work.end)
    model = work.model
    assert (state["error"], state["fence"]) == (model.error, model.fence)
    assert (state["commands"], state["routed"]) == (model.commands, model.routed_tokens)
    for addr, nbytes in work.outputs:
        assert state["mem"][addr:addr + nbytes] == work.expected(addr, nbytes), f"buffer at {addr}"
    if errors:
        assert model.error == (ErrorSource.COMMAND << 8 | CommandError.BAD_ADDRESS)


def test_bad_commands_set_the_error_named_by_the_model():
    config = load_config("tiny")
    cases = [
        (encode_command(99), CommandError.BAD_OPCODE),
        (encode_command(Command.ROUTE, 7, 1, 0, 0), CommandError.BAD_LAYER),
        (encode_command(Command.ROUTE, 0, 0, 0, 0), CommandError.BAD_COUNT),
        (encode_command(Command.ROUTE, 0, 1, 32, 0), CommandError.BAD_ADDRESS),
        (encode_command(Command.ACC_STORE, 0, config.model.max_tokens + 1), CommandError.BAD_COUNT),
        (encode_command(Command.ACC_STORE, config.memory.size_bytes - 64, 4), CommandError.BAD_ADDRESS),
        (encode_command(Command.RUN_EXPERT, 0, 0, 0, 0), CommandError.BAD_COUNT),
    ]
    for words, code in cases:
        model = DeviceModel(config)
        model.submit(words + encode_command(Command.FENCE, 5))
        assert model.error == ErrorSource.COMMAND << 8 | code, code.name
        assert model.fence == 0  # later commands are discarded
    state = _simulate(config, [], [words for words, _ in cases])
    assert state["error"] == ErrorSource.COMMAND << 8 | CommandError.BAD_OPCODE
    assert state["commands"] == 0


@pytest.mark.verilator
@pytest.mark.parametrize(("idle", "stall", "errors"), [(0.0, 0.0, False), (0.3, 0.3, True)])
def test_verilog_top_over_the_link_matches_golden_on_tiny(idle, stall, errors):
    config = load_config("tiny")
    result = run_cocotb(Accelerator(config), name="moegen_top", test_module="moegen.rtl.testbench.top",
                        params={"config": "tiny", "seed": 5, "errors": errors, "idle": idle, "stall": stall})
    assert result.ok, f"{result.failed} failed; see {result.log}"
    (report,) = result.reports
    assert report["mismatches"] == [] and report["violations"] == []

import dataclasses
import json

import pytest
from amaranth.sim import Simulator

from moegen.config import PRESETS, DeviceConfig, load_config
from moegen.rtl.regmap import ID_VALUE, MAP_VERSION, RegisterFile, c_header, map_json, register_map


@pytest.mark.parametrize("name", PRESETS)
def test_map_is_contiguous_word_aligned_and_fits_the_bus(name):
    config = load_config(name)
    registers = register_map(config)
    offset = 0
    for reg in registers:
        assert reg.offset == offset and reg.access in ("ro", "rw", "wo")
        assert 0 <= reg.reset < 1 << 32, reg.name
        offset += 4 * reg.count
    assert offset // 4 <= 1 << 10
    assert len({reg.name for reg in registers}) == len(registers)
    by_name = {reg.name: reg for reg in registers}
    assert by_name["K"].count == config.model.layers and by_name["K"].reset == config.router.k_max
    assert by_name["CONFIG_HASH"].reset == config.device_hash
    assert by_name["MAX_PAYLOAD"].reset == config.link.max_payload
    data = json.loads(map_json(config))
    assert data["config_hash"] == f"0x{config.device_hash:08x}"
    assert [r["name"] for r in data["registers"]] == [r.name for r in registers]


def test_without_counters_the_counter_registers_are_left_out_and_the_others_keep_their_offsets():
    config = load_config("tiny")
    bare = dataclasses.replace(config, device=DeviceConfig(counters=False))
    full, without = register_map(config), register_map(bare)
    counters = [reg.name for reg in full[full.index(next(r for r in full if r.name == "CYCLES")):]]
    assert counters[-1] == "LINK_DROPPED" and len(counters) == 14
    assert [(r.name, r.offset) for r in without] == [(r.name, r.offset) for r in full if r.name not in counters]
    assert "#define MOEGEN_COUNTERS 1" in c_header(config, "/* stamp */")
    header = c_header(bare, "/* stamp */")
    assert "#define MOEGEN_COUNTERS 0" in header and "MOEGEN_REG_CYCLES" not in header


def test_register_file_reads_writes_pulses_and_flags_unmapped_addresses():
    config = load_config("tiny")
    registers = register_map(config)
    by_name = {reg.name: reg for reg in registers}
    dut = RegisterFile(registers)
    end = sum(reg.count for reg in registers)

    async def bench(ctx):
        async def read(word):
            ctx.set(dut.bus.addr, word)
            ctx.set(dut.bus.r_stb, 1)
            mapped = ctx.get(dut.bus.mapped)
            await ctx.tick()
            ctx.set(dut.bus.r_stb, 0)
            return mapped, ctx.get(dut.bus.r_data)

        async def write(word, value):
            ctx.set(dut.bus.addr, word)
            ctx.set(dut.bus.w_data, value)
            ctx.set(dut.bus.w_stb, 1)
            await ctx.tick()
            ctx.set(dut.bus.w_stb, 0)

        assert await read(by_name["ID"].offset // 4) == (1, ID_VALUE)
        assert await read(by_name["VERSION"].offset // 4) == (1, MAP_VERSION[0] << 16 | MAP_VERSION[1])
        assert await read(by_name["CONFIG_HASH"].offset // 4) == (1, config.device_hash)
        # constants ignore writes
        await write(by_name["ID"].offset // 4, 0)
        assert await read(by_name["ID"].offset // 4) == (1, ID_VALUE)
        # rw arrays: reset value, then each element independently
        k = by_name["K"]
        for i in range(k.count):
            assert await read(k.offset // 4 + i) == (1, config.router.k_max)
        await write(k.offset // 4 + 1, 1)
        assert await read(k.offset // 4) == (1, config.router.k_max)
        assert await read(k.offset // 4 + 1) == (1, 1)
        assert ctx.get(dut.storage["K"][1]) == 1
        # hardware-driven status values
        ctx.set(dut.values["FENCE"][0], 0xDEAD)
        assert await read(by_name["FENCE"].offset // 4) == (1, 0xDEAD)
        # the read address is registered at the strobe, the value is the register's in the
        # cycle after it (the bus moving on does not change what is read)
        ctx.set(dut.bus.addr, by_name["FENCE"].offset // 4)
        ctx.set(dut.bus.r_stb, 1)
        await ctx.tick()
        ctx.set(dut.bus.r_stb, 0)
        ctx.set(dut.bus.addr, by_name["ID"].offset // 4)
        ctx.set(dut.values["FENCE"][0], 0xBEEF)
        assert ctx.get(dut.bus.r_data) == 0xBEEF
        # wo: the written bits for exactly one cycle, and reads give 0
        await write(by_name["CONTROL"].offset // 4, 3)
        assert ctx.get(dut.pulses["CONTROL"]) == 3
        await ctx.tick()
        assert ctx.get(dut.pulses["CONTROL"]) == 0
        assert await read(by_name["CONTROL"].offset // 4) == (1, 0)
        # past the end: not mapped
        for word in (end, end + 1, (1 << 10) - 1):
            mapped, _ = await read(word)
            assert mapped == 0

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()

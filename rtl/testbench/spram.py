"""cocotb testbench of :class:`moegen.rtl.memory.SinglePortRAM` built from ``SB_SPRAM256KA``
cells (yosys' simulation model of the cell) against a Python model of the RAM.

Parameters (``MOEGEN_TB_PARAMS``): ``depth``, ``width``, ``ops`` (random cycles), ``seed``.
Each cycle writes, reads, does both (the write wins) or idles at a random address; after a
read, ``r_data`` must hold the word read until the next read, through any writes.
"""

import random

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly

from moegen.simulation import tb_params, write_tb_report

from .streams import reset, start_clock


@cocotb.test()
async def random_reads_and_writes_match_the_model(dut):
    p = tb_params()
    rng = random.Random(p["seed"])
    depth, width = p["depth"], p["width"]
    # addresses: the ends of every cell and bank, and random ones
    edges = sorted({a for base in range(0, depth, 16384) for a in (base, base + 1, base + 16383, base + 16384)
                    if a < depth} | {depth - 1})
    written = {}
    expected = None  # the word r_data must show
    mismatches = []
    start_clock(dut)
    dut.w_en.value = 0
    dut.r_en.value = 0
    await reset(dut)
    for cycle in range(p["ops"]):
        op = rng.choice(("write", "write", "read", "both", "idle"))
        if op == "read" and not written:
            op = "idle"  # a word never written has no value to expect
        if op == "read":
            addr = rng.choice(list(written))
        else:
            addr = rng.choice(edges) if rng.random() < 0.3 else rng.randrange(depth)
        word = rng.randrange(1 << width)
        dut.addr.value = addr
        dut.w_data.value = word
        dut.w_en.value = op in ("write", "both")
        dut.r_en.value = op in ("read", "both")
        await ReadOnly()
        if expected is not None and dut.r_data.value.to_unsigned() != expected:
            mismatches.append({"cycle": cycle, "got": dut.r_data.value.to_unsigned(), "expected": expected})
        await FallingEdge(dut.clk)
        if op in ("write", "both"):
            written[addr] = word
        elif op == "read":
            expected = written[addr]
    write_tb_report({"mismatches": mismatches[:20], "reads_checked": p["ops"], "words": len(written)})
    assert not mismatches, mismatches[:5]

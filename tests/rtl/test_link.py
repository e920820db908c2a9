import random
import struct
from types import SimpleNamespace

import pytest
from amaranth.hdl import Fragment
from amaranth.sim import Simulator

from moegen.config import load_config
from moegen.golden.link import FrameParser, Opcode, Response, Status, encode_request
from moegen.rtl.link import QUEUE_WORDS, LinkEndpoint
from moegen.rtl.regmap import register_map
from moegen.rtl.testbench.link import GAP_MARGIN, DeviceModel, LinkHarness, frame, harness_params, traffic
from moegen.verify import DEFAULT_PATTERNS, run_block


def simulate(params, events, *, idle=0.0, stall=0.0, seed=0, watch=False):
    """Run ``events`` (see :func:`traffic`) on a :class:`LinkHarness` in amaranth.sim and on
    its :class:`DeviceModel`. Returns (response bytes, expected bytes, device model, record):
    ``record`` has the cycles rx bytes and tx bytes were accepted, the drained command words
    and, with ``watch``, the cycles of every memory, CSR or command-queue write."""
    dut = LinkHarness(params)
    device = DeviceModel(params)
    rng = random.Random(seed)
    expected, got = bytearray(), bytearray()
    record = {"rx": [], "tx": [], "drained": [], "writes": [], "cycle": 0, "state": []}

    async def sink(ctx):
        while True:
            ctx.set(dut.tx.ready, rng.random() >= stall)
            *_, valid, ready, payload = await ctx.tick().sample(dut.tx.valid, dut.tx.ready, dut.tx.payload)
            record["cycle"] += 1
            if valid and ready:
                got.append(payload)
                record["tx"].append(record["cycle"])

    async def monitor(ctx):
        link = dut.link
        cycle = 0
        while True:
            *_, mem, csr, submit = await ctx.tick().sample(link.mem_write.valid, link.csr.w_stb, link.submit.valid)
            if mem or csr or submit:
                record["writes"].append(cycle)
            cycle += 1

    async def source(ctx):
        link = device.link
        for kind, arg in events:
            if kind == "send":
                expected.extend(link.receive(arg))
                for byte in arg:
                    while rng.random() < idle:
                        await ctx.tick()
                    ctx.set(dut.rx.payload, byte)
                    ctx.set(dut.rx.valid, 1)
                    await ctx.tick().until(dut.rx.ready)
                    record["rx"].append(record["cycle"])
                    ctx.set(dut.rx.valid, 0)
            elif kind == "pause":
                await ctx.tick().repeat(arg)
            else:
                for _ in range(20 * len(expected) + 1000):  # bounded: a wrong device may never answer
                    if len(got) >= len(expected):
                        break
                    await ctx.tick()
                await ctx.tick().repeat(12)
                record["state"].append((ctx.get(dut.receiving), ctx.get(dut.busy), bool(link.parser.buffer)))
                await ctx.tick().repeat(params["idle_timeout"] + GAP_MARGIN)
                link.timeout()
                if arg:
                    ctx.set(dut.commands.ready, 1)
                    while ctx.get(dut.commands.valid):
                        record["drained"].append(ctx.get(dut.commands.payload))
                        await ctx.tick()
                    ctx.set(dut.commands.ready, 0)
                    device.queue.clear()
        record["counters"] = (ctx.get(dut.frames), ctx.get(dut.dropped))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink, background=True)
    if watch:
        sim.add_testbench(monitor, background=True)
    sim.run()
    return bytes(got), bytes(expected), device, record


def responses(data):
    return FrameParser(responses=True).feed(data)


def _params(**overrides):
    return harness_params("tiny", **{"mem_bytes": 1024, "idle_timeout": 32, "latency": 3, **overrides})


def _word(reg_name, config="tiny"):
    (reg,) = [r for r in register_map(load_config(config)) if r.name == reg_name]
    return reg.offset


# ---- parameters


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"port_width": 24}, r"port_width must be one of 8, 16, 32, 64, 128, 256, 512, not 24"),
    ({"max_payload": 3}, r"max_payload must be an integer in 4\.\.65535, not 3"),
    ({"max_payload": 100, "port_width": 64}, r"max_payload must be a multiple of 8 bytes, not 100"),
    ({"idle_timeout": 0}, r"idle_timeout must be an integer in 1\.\.1073741824, not 0"),
    ({"mem_bytes": 1002}, r"mem_bytes must be a multiple of the port's 4 bytes, not 1002"),
    ({"mem_bytes": 2}, r"mem_bytes must be an integer in 4\.\.4294967296, not 2"),
    ({"burst_len": 0}, r"burst_len must be an integer in 1\.\.256, not 0"),
    ({"queue_words": 0}, r"queue_words must be an integer in 1\.\.65535, not 0"),
    ({"queue_words": 8.0}, r"queue_words must be an integer"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinkEndpoint.from_config(load_config("tiny"), **kwargs)


def test_from_config_takes_the_link_and_memory_sections():
    config = load_config("default")
    link = LinkEndpoint.from_config(config)
    Fragment.get(link, None)  # elaborates: every port is driven
    assert (link.max_payload, link.idle_timeout, link.mem_bytes, link.port_width, link.burst_len, link.queue_words) == (
        config.link.max_payload, config.link.idle_timeout, config.memory.size_bytes, config.memory.port_width,
        config.memory.burst_len, QUEUE_WORDS)
    assert (link.fetch_beats, link.fifo_depth) == (config.memory.burst_len, 2 * config.memory.burst_len)


# ---- amaranth.sim: directed requests


def _directed(params):
    """Requests reaching every status and both retry behaviours, and what each must answer."""
    P, top = params["port_width"] // 8, params["mem_bytes"]
    k = _word("K")
    end = sum(4 * reg.count for reg in register_map(load_config("tiny")))  # the first unmapped CSR byte
    pattern = bytes(range(1, 4 * P + 1))
    steps = [
        (encode_request(0, Opcode.NOP, 0), Status.OK),
        (encode_request(1, Opcode.READ_CSR, 0, read_length=8), Status.OK),
        (encode_request(2, Opcode.WRITE_CSR, k, payload=struct.pack("<II", 1, 2)), Status.OK),
        (encode_request(3, Opcode.READ_CSR, k, read_length=8), Status.OK),
        (encode_request(4, Opcode.WRITE_MEM, top - 4 * P, payload=pattern), Status.OK),
        (encode_request(5, Opcode.READ_MEM, top - 4 * P, read_length=4 * P), Status.OK),
        (encode_request(6, Opcode.SUBMIT, 0, payload=struct.pack("<3I", 7, 8, 9)), Status.OK),
        (encode_request(6, Opcode.SUBMIT, 0, payload=struct.pack("<3I", 7, 8, 9)), Status.OK),  # replayed
        (encode_request(7, Opcode.SUBMIT, 0, payload=bytes(4 * (params["queue_words"] - 2))), Status.QUEUE_FULL),
        (encode_request(8, 6, 0), Status.BAD_OPCODE),
        (encode_request(9, Opcode.READ_MEM, 0, read_length=params["max_payload"] + P), Status.BAD_LENGTH),
        (encode_request(10, Opcode.READ_CSR, 0, read_length=6), Status.BAD_LENGTH),
        (encode_request(11, Opcode.WRITE_CSR, 2, payload=bytes(4)), Status.BAD_ADDRESS),
        (encode_request(12, Opcode.SUBMIT, 0, payload=bytes(0)), Status.BAD_LENGTH),
        (encode_request(13, Opcode.READ_MEM, top - P, read_length=2 * P), Status.BAD_ADDRESS),
        (encode_request(14, Opcode.READ_MEM, 2**32 - P, read_length=P), Status.BAD_ADDRESS),
        (encode_request(15, Opcode.READ_CSR, end - 8, read_length=12), Status.BAD_ADDRESS),
        (encode_request(16, Opcode.WRITE_CSR, end - 4, payload=bytes(8)), Status.BAD_ADDRESS),
        (encode_request(17, Opcode.READ_CSR, k, read_length=8), Status.OK),  # untouched by the refused write
        (encode_request(18, Opcode.READ_CSR, _word("LINK_FRAMES"), read_length=4), Status.OK),
        (encode_request(18, Opcode.READ_CSR, _word("LINK_FRAMES"), read_length=4), Status.OK),  # read again
        (encode_request(19, Opcode.READ_MEM, top, read_length=0), Status.OK),
        (encode_request(20, Opcode.WRITE_MEM, 0, payload=b""), Status.OK),
    ]
    if P > 1:
        steps += [(encode_request(21, Opcode.READ_MEM, P // 2, read_length=P), Status.BAD_ADDRESS),
                  (encode_request(22, Opcode.WRITE_MEM, 0, payload=bytes(P + 1)), Status.BAD_LENGTH)]
    return steps


@pytest.mark.parametrize("port_width", [8, 16, 32, 64])
def test_requests_answer_like_golden(port_width):
    params = _params(port_width=port_width, max_payload=64, queue_words=8)
    steps = _directed(params)
    events = [("send", f) for f, _ in steps] + [("gap", True)]
    got, expected, _, record = simulate(params, events, stall=0.3, seed=port_width)
    assert got == expected
    answers = responses(got)
    assert [(r.seq, Status(r.status)) for r in answers] == [(f[1], s) for f, s in steps]
    by_seq = {r.seq: r for r in answers}
    assert by_seq[3].payload == struct.pack("<II", 1, 2)
    assert by_seq[5].payload == bytes(range(1, 4 * port_width // 8 + 1))
    assert by_seq[17].payload == struct.pack("<II", 1, 2)
    reads = [r.payload for r in answers if r.seq == 18]
    assert reads == [struct.pack("<I", 20), struct.pack("<I", 21)]  # each retry of a read runs again
    assert record["drained"] == [7, 8, 9]  # the replayed SUBMIT pushed nothing
    assert record["counters"] == (len(steps), 0)


def test_without_counters_their_addresses_answer_bad_address():
    """The icebreaker preset has no counter registers (device.counters: false): reading where
    tiny has LINK_FRAMES is BAD_ADDRESS, the registers before them still answer."""
    params = harness_params("icebreaker", mem_bytes=1024, idle_timeout=32, latency=3)
    steps = [(encode_request(1, Opcode.READ_CSR, _word("LINK_FRAMES"), read_length=4), Status.BAD_ADDRESS),
             (encode_request(2, Opcode.READ_CSR, _word("FENCE", "icebreaker"), read_length=4), Status.OK)]
    got, expected, _, _ = simulate(params, [("send", f) for f, _ in steps] + [("gap", True)])
    assert got == expected
    assert [(r.seq, Status(r.status)) for r in responses(got)] == [(f[1], s) for f, s in steps]


def test_a_header_inside_an_oversize_header_is_found_again():
    """The model rescans the nine bytes after a refused sync byte; so must the endpoint."""
    params = _params()
    inner = frame(5, Opcode.READ_CSR, 0, 4, reserved=0xFF)
    # the oversize header's length field is the inner frame's opcode and (ignored) reserved byte
    outer = bytes([0xA5, 1, Opcode.WRITE_MEM, 0, 0x12, 0x34]) + inner[:4]
    assert struct.unpack_from("<H", outer, 8)[0] > params["max_payload"]
    got, expected, _, record = simulate(params, [("send", outer + inner[4:]), ("gap", False)])
    assert got == expected
    assert responses(got) == [Response(5, Opcode.READ_CSR, Status.OK, struct.pack("<I", 0x4D4F4547))]
    assert record["counters"] == (1, 1)


def test_the_idle_timeout_counts_silent_cycles_exactly():
    """A pause of n ticks after a byte's acceptance leaves n cycles without a byte offered."""
    params = _params(idle_timeout=20)
    request = encode_request(3, Opcode.NOP, 0)
    got, expected, _, record = simulate(params, [("send", request[:5]), ("pause", 19), ("send", request[5:]),
                                                 ("gap", False)])
    assert got == expected and len(responses(got)) == 1 and record["counters"] == (1, 0)
    got, expected, _, record = simulate(params, [("send", request[:5]), ("pause", 20), ("send", request[5:]),
                                                 ("gap", False)])
    assert got == b"" and record["counters"] == (0, 1)


def test_rx_and_tx_move_one_byte_per_cycle():
    params = _params(max_payload=256, latency=4)
    write = encode_request(1, Opcode.WRITE_MEM, 0, payload=bytes(range(256)))
    reads = [encode_request(2, Opcode.READ_MEM, 0, read_length=256), encode_request(3, Opcode.READ_CSR, 0,
                                                                                  read_length=64)]
    got, expected, _, record = simulate(params, [("send", write), ("gap", False)])
    rx = record["rx"]
    assert got == expected and rx == list(range(rx[0], rx[0] + len(write)))
    for read in reads:
        got, expected, _, record = simulate(params, [("send", read), ("gap", False)])
        tx = record["tx"]
        assert got == expected and len(tx) == len(got)
        # a response may wait for its first payload word; after it, no bubbles
        assert tx[6:] == list(range(tx[6], tx[6] + len(tx) - 6))
        assert tx[6] - tx[5] <= 1 + params["latency"]


def test_writes_keep_the_stream_rules_under_backpressure():
    """Memory and command words wait, unchanged, while their sinks are not ready."""
    dut = LinkEndpoint(max_payload=64, idle_timeout=100, mem_bytes=256, port_width=16, burst_len=4, queue_words=16)
    data = bytes(range(100, 132))
    words = [11, 22, 33]
    frames = [encode_request(1, Opcode.WRITE_MEM, 64, payload=data),
              encode_request(2, Opcode.SUBMIT, 0, payload=struct.pack("<3I", *words))]
    rng = random.Random(5)
    got = {"mem": [], "submit": [], "tx": bytearray()}

    async def source(ctx):
        ctx.set(dut.submit_space, 16)
        ctx.set(dut.tx.ready, 1)
        for byte in b"".join(frames):
            ctx.set(dut.rx.payload, byte)
            ctx.set(dut.rx.valid, 1)
            await ctx.tick().until(dut.rx.ready)
        ctx.set(dut.rx.valid, 0)
        while len(got["tx"]) < 20:
            await ctx.tick()

    async def sinks(ctx):
        held = {"mem": None, "submit": None}
        while True:
            ctx.set(dut.mem_write.ready, rng.random() < 0.3)
            ctx.set(dut.submit.ready, rng.random() < 0.3)
            _, _, mv, mr, mp, sv, sr, sp, tv, tp = await ctx.tick().sample(
                dut.mem_write.valid, dut.mem_write.ready, dut.mem_write.payload, dut.submit.valid, dut.submit.ready,
                dut.submit.payload, dut.tx.valid, dut.tx.payload)
            for name, valid, ready, payload in (("mem", mv, mr, (mp.addr, mp.data)), ("submit", sv, sr, sp)):
                if held[name] is not None:
                    assert valid and payload == held[name], f"{name} word withdrawn or changed before acceptance"
                held[name] = payload if valid and not ready else None
                if valid and ready:
                    got[name].append(payload)
            if tv:
                got["tx"].append(tp)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sinks, background=True)
    sim.run()
    assert got["mem"] == [(32 + i, int.from_bytes(data[2 * i:2 * i + 2], "little")) for i in range(16)]
    assert got["submit"] == words
    assert [(r.seq, r.status) for r in responses(bytes(got["tx"]))] == [(1, Status.OK), (2, Status.OK)]


def test_corrupt_frames_never_write():
    """Every one-byte corruption of a memory write, a CSR write and a submit: nothing is written."""
    params = _params(idle_timeout=16)
    k = _word("K")
    frames = [encode_request(1, Opcode.WRITE_MEM, 64, payload=bytes(range(8))),
              encode_request(2, Opcode.WRITE_CSR, k, payload=struct.pack("<I", 5)),
              encode_request(3, Opcode.SUBMIT, 0, payload=struct.pack("<I", 6))]
    rng = random.Random(7)
    events = []
    for f in frames:
        for i in range(1, len(f)):
            flipped = bytearray(f)
            flipped[i] ^= 1 << rng.randrange(8)
            events += [("send", bytes(flipped)), ("gap", False), ("send", f[:i]), ("gap", False)]
    got, expected, device, record = simulate(params, events, watch=True)
    assert got == expected == b""
    assert record["writes"] == []
    assert record["counters"] == (0, device.link.dropped) and device.link.dropped >= 2 * sum(len(f) - 1 for f in frames)


def test_random_faults_match_golden_in_amaranth_sim():
    params = _params(seed=3)
    events, counts = traffic(params, random.Random(3), faults=40)
    got, expected, device, record = simulate(params, events, idle=0.3, stall=0.3, seed=3)
    assert got == expected
    assert record["counters"] == (device.link.frames, device.link.dropped)
    assert all((receiving, busy) == (buffered, 0) for receiving, busy, buffered in record["state"])
    assert sum(counts.values()) == 40 and device.link.frames > 20


# ---- Verilator: random requests and faults, byte for byte against golden


def _verify(config, *, faults, **overrides):
    args = SimpleNamespace(config=config, seed=overrides.pop("seed", 1), faults=faults, **overrides)
    result, _, lines = run_block("link", args)
    assert result.ok, "\n".join(lines)
    runs = result.reports
    assert [(r["idle"], r["stall"]) for r in runs] == [tuple(p) for p in DEFAULT_PATTERNS]
    assert all(r["first_mismatch"] is None and not r["errors"] and not r["stream_violations"] for r in runs)
    assert sum(sum(r["faults"].values()) for r in runs) >= 4 * faults
    reached = {answer for r in runs for answer in r["statuses"]}
    assert {"NOP/OK", "UNKNOWN/BAD_OPCODE", "READ_MEM/BAD_LENGTH", "WRITE_MEM/BAD_ADDRESS", "READ_CSR/BAD_ADDRESS",
            "WRITE_CSR/OK", "SUBMIT/QUEUE_FULL", "SUBMIT/OK", "READ_MEM/OK"} <= reached
    return runs


@pytest.mark.verilator
def test_verilog_matches_golden_under_faults():
    _verify("tiny", faults=40)


@pytest.mark.verilator
@pytest.mark.slow
@pytest.mark.parametrize(("config", "overrides"), [("tiny", {}), ("default", {}), ("tiny", {"port_width": 16})],
                         ids=["tiny", "default", "tiny-port16"])
def test_verilog_matches_golden_under_a_thousand_faults(config, overrides):
    runs = _verify(config, faults=250, seed=7, **overrides)
    assert sum(r["dropped"] for r in runs) > 500

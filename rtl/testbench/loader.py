"""cocotb testbench of :class:`moegen.rtl.loader.ExpertLoader` on a
:class:`moegen.rtl.memory.SimulatedMemory`, against golden images and streams.

The simulated top is :class:`LoaderHarness`: the memory, the loader, and optionally the
consumer model of the benchmark. Parameters (``MOEGEN_TB_PARAMS``, built by
:func:`harness_params`): ``layout`` (hidden, ffn, cols, m, n, weight bits, act bits),
``device_hash``, ``rows``, ``loader`` (banks, bank_bytes, verified_images), ``memory``
(size_bytes, port_width, burst_len, outstanding, latency, jitter, bandwidth as
``[num, den]``, seed) and ``seed``; for ``loader_matches_golden``, ``commands`` (random actions
per pattern, on top of one run of every corruption and refusal), ``tokens`` (token counts to
draw from) and ``patterns`` (``[idle, stall]`` pairs, one scenario each); for
``loader_bench`` (a harness with the consumer model), ``settings``: per setting a ``name``,
``tokens``, ``slowdown`` and ``rounds`` (lists of image slots, one command each).

Each scenario fills memory with images of distinct experts, then mixes runs of them (with
wrong expected ids and other token counts), runs of corrupted copies (every
:class:`~moegen.golden.image.ImageErrorCode`), runs at addresses past the end of memory,
rewrites of images the loader has verified, and writes to unrelated memory while the loader
runs. Everything the loader emits must equal golden's streams, refused commands emit nothing,
and the counters match a model of the loader's verified-image table exactly.
"""

import random
import struct
from fractions import Fraction

import cocotb
import torch
from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly, Timer

from moegen.golden.expert import ExpertWeights, param_words, prune_expert, quantize_expert, weight_stream
from moegen.golden.formats import HEADER_SIZE, IMAGE_ALIGN, ImageLayout
from moegen.golden.image import ImageError, ImageErrorCode, read_image, with_header_field, write_image
from moegen.rtl.loader import STATUS_LAYOUT, ExpertLoader, LoaderGeometry, command_layout, done_layout
from moegen.rtl.memory import SimulatedMemory, write_layout
from moegen.simulation import tb_params, write_tb_report

from .streams import StreamSink, StreamSource, reset, start_clock

__all__ = ["LoaderHarness", "build_harness", "geometry", "harness_params", "make_expert"]


class LoaderHarness(wiring.Component):
    """A :class:`SimulatedMemory` feeding an :class:`ExpertLoader`, with the memory's write
    port, the loader's command stream and its counters as ports.

    Without ``consumer`` the loader's ``params``, ``weights`` and ``done`` streams are ports.
    With it, a consumer model takes them: one params word per cycle, one step record per
    ``slowdown`` cycles (an input, 1..255), every completion at once; it reports what it took
    and the cycle of the last completion.
    """

    def __init__(self, *, loader, memory, consumer=False):
        self.loader = loader
        self.memory = memory
        self.consumer = consumer
        ports = {
            "write": In(stream.Signature(write_layout(memory.addr_width, memory.port_width))),
            "cmd": In(stream.Signature(command_layout(loader.geometry.addr_width))),
            "status": Out(STATUS_LAYOUT),
            "cycle": Out(48),
        }
        if consumer:
            ports.update(slowdown=In(8), params_taken=Out(32), records_taken=Out(32), done_taken=Out(16),
                         errors_taken=Out(16), last_done_cycle=Out(48))
        else:
            ports.update(params=Out(stream.Signature(32)), weights=Out(stream.Signature(loader.geometry.step_bits)),
                         done=Out(stream.Signature(done_layout())))
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        m.submodules.memory = memory = self.memory
        m.submodules.loader = loader = self.loader
        wiring.connect(m, loader.mem, memory.read)
        wiring.connect(m, memory.written, loader.written)
        wiring.connect(m, wiring.flipped(self.write), memory.write)
        wiring.connect(m, wiring.flipped(self.cmd), loader.cmd)
        m.d.comb += self.status.eq(loader.status)
        m.d.sync += self.cycle.eq(self.cycle + 1)
        if not self.consumer:
            wiring.connect(m, loader.params, wiring.flipped(self.params))
            wiring.connect(m, loader.weights, wiring.flipped(self.weights))
            wiring.connect(m, loader.done, wiring.flipped(self.done))
            return m
        wait = Signal(8)  # cycles until the consumer takes its next record
        m.d.comb += [
            loader.params.ready.eq(1),
            loader.weights.ready.eq(wait == 0),
            loader.done.ready.eq(1),
        ]
        with m.If(loader.params.valid):
            m.d.sync += self.params_taken.eq(self.params_taken + 1)
        with m.If(loader.weights.valid & loader.weights.ready):
            m.d.sync += [self.records_taken.eq(self.records_taken + 1), wait.eq(self.slowdown - 1)]
        with m.Elif(wait != 0):
            m.d.sync += wait.eq(wait - 1)
        with m.If(loader.done.valid):
            m.d.sync += [self.done_taken.eq(self.done_taken + 1), self.last_done_cycle.eq(self.cycle)]
            with m.If(loader.done.payload.code != 0):
                m.d.sync += self.errors_taken.eq(self.errors_taken + 1)
        return m


def harness_params(config, *, overrides=None, memory=None, seed=1):
    """Testbench parameters for ``config``'s loader and memory; ``overrides`` replace loader
    parameters (banks, bank_bytes, verified_images, rows), ``memory`` memory parameters."""
    lay = config.image_layout
    loader = LoaderGeometry.from_config(config)
    params = {
        "layout": [lay.hidden, lay.ffn, lay.cols, lay.m, lay.n, lay.weight_bits, lay.act_bits],
        "device_hash": config.device_hash,
        "rows": config.array.rows,
        "loader": {"banks": loader.banks, "bank_bytes": loader.bank_bytes, "verified_images": loader.verified_images},
        "memory": {"size_bytes": config.memory.size_bytes, "port_width": config.memory.port_width,
                   "burst_len": config.memory.burst_len, "outstanding": config.memory.outstanding,
                   "latency": config.memory.latency, "jitter": 0, "bandwidth": [1, 1], "seed": 1},
        "seed": seed,
    }
    for key, value in (overrides or {}).items():
        if key == "rows":
            params["rows"] = value
        else:
            params["loader"][key] = value
    params["memory"].update(memory or {})
    return params


def _layout(params):
    return ImageLayout(*params["layout"])


def _loader_kwargs(params):
    mem = params["memory"]
    return {"layout": _layout(params), "device_hash": params["device_hash"], "rows": params["rows"],
            "port_width": mem["port_width"], "burst_len": mem["burst_len"], "outstanding": mem["outstanding"],
            "size_bytes": mem["size_bytes"], **params["loader"]}


def geometry(params):
    """The :class:`LoaderGeometry` of the loader ``params`` describe."""
    return LoaderGeometry(**_loader_kwargs(params))


def build_harness(params, *, consumer=False):
    """The :class:`LoaderHarness` ``params`` describe (``ValueError`` names a bad parameter)."""
    loader = ExpertLoader(**_loader_kwargs(params))
    mem = dict(params["memory"])
    mem["bandwidth"] = Fraction(*mem["bandwidth"])
    return LoaderHarness(loader=loader, memory=SimulatedMemory(**mem), consumer=consumer)


def make_expert(layout, seed):
    """A random M:N-sparse int expert of ``layout``'s shapes (golden quantization)."""
    g = torch.Generator().manual_seed(seed)
    hidden, ffn = layout.hidden, layout.ffn
    weights = ExpertWeights(torch.randn(ffn, hidden, generator=g), torch.randn(ffn, hidden, generator=g),
                            torch.randn(hidden, ffn, generator=g))
    calibration = torch.randn(16, hidden, generator=g)
    return quantize_expert(prune_expert(weights, layout.m, layout.n), calibration, m=layout.m, n=layout.n,
                           cols=layout.cols, weight_bits=layout.weight_bits, act_bits=layout.act_bits)


def _flip(image, offset):
    data = bytearray(image)
    data[offset] ^= 0x5A
    return bytes(data)


def corruptions(image, layout, rng):
    """(name, corrupted image) pairs, at least one per error code the image itself can carry."""
    params_off, lut_off = layout.offsets[3], layout.offsets[4]
    (magic,) = struct.unpack_from("<I", image, 0)
    (version,) = struct.unpack_from("<H", image, 4)
    (hash_,) = struct.unpack_from("<I", image, 8)
    cols = image[26]
    return [
        ("bad_magic", with_header_field(image, 0, "<I", magic ^ 0x100)),
        ("bad_version", with_header_field(image, 4, "<H", version + 1)),
        ("bad_header_size", with_header_field(image, 6, "<H", 32)),
        ("bad_header_crc", _flip(image, rng.randrange(12, 60))),
        ("bad_header_crc_field", _flip(image, 61)),
        ("hash_mismatch", with_header_field(image, 8, "<I", hash_ ^ (1 << rng.randrange(32)))),
        ("bad_shape_cols", with_header_field(image, 26, "<B", cols + 1)),
        ("bad_shape_hidden", with_header_field(image, 16, "<I", layout.hidden + 1)),
        ("bad_shape_offset", with_header_field(image, 36, "<I", layout.offsets[1] + IMAGE_ALIGN)),
        ("bad_shape_size", with_header_field(image, 52, "<I", layout.nbytes + IMAGE_ALIGN)),
        ("crc_first_byte", _flip(image, HEADER_SIZE)),
        ("crc_weight_byte", _flip(image, rng.randrange(HEADER_SIZE, params_off))),
        ("crc_params_byte", _flip(image, rng.randrange(params_off, lut_off))),
        ("crc_last_byte", _flip(image, len(image) - 1)),
        ("crc_field", with_header_field(image, 56, "<I", struct.unpack_from("<I", image, 56)[0] ^ 1)),
    ]


class Scenario:
    """Memory contents, commands and what golden and the loader's verified-image table say
    each command must do."""

    def __init__(self, params, rng):
        self.p = params
        self.rng = rng
        self.layout = _layout(params)
        self.loader = geometry(params)
        mem = params["memory"]
        self.size = mem["size_bytes"]
        self.port_bytes = mem["port_width"] // 8
        self.memory = bytearray(self.size)
        self.nbytes = self.layout.nbytes
        self.slots = self.slots_for(params)
        if self.slots < 1:
            raise ValueError(f"memory of {self.size} bytes holds no image of {self.nbytes} bytes and a scratch area")
        self.scratch = (self.slots * self.nbytes, self.size - IMAGE_ALIGN)
        self.straddle = self.size - IMAGE_ALIGN  # a header whose image runs past the end of memory
        self.experts = {}  # expert id -> image bytes
        self.verified = [None] * params["loader"]["verified_images"]
        self.next_verified = 0
        self.expected_bytes = 0
        self.verify_passes = 0
        self._golden = {}

    @staticmethod
    def slots_for(params):
        """Images the memory holds next to a scratch area and a header at its very end."""
        return (params["memory"]["size_bytes"] - 2 * IMAGE_ALIGN) // _layout(params).nbytes

    def good_image(self, expert_id):
        if expert_id not in self.experts:
            qe = make_expert(self.layout, self.p["seed"] * 1000 + expert_id)
            self.experts[expert_id] = write_image(qe, config_hash=self.p["device_hash"], expert_id=expert_id)
        return self.experts[expert_id]

    def writes(self, addr, data, *, every=False):
        """Word writes that change memory at ``addr`` to ``data``: only the words that differ,
        or ``every`` word (when the memory's contents are not known yet)."""
        P = self.port_bytes
        beats = []
        for start in range(addr - addr % P, addr + len(data), P):
            new = bytearray(self.memory[start: start + P])
            lo, hi = max(start, addr), min(start + P, addr + len(data))
            new[lo - start: hi - start] = data[lo - addr: hi - addr]
            if every or new != self.memory[start: start + P]:
                beats.append((start // P, int.from_bytes(new, "little")))
        return beats

    def apply(self, beats):
        """Mirror word writes in memory and forget the verified images they touch."""
        P = self.port_bytes
        for word, value in beats:
            self.memory[word * P: word * P + P] = value.to_bytes(P, "little")
            block = word * P // IMAGE_ALIGN
            for i, addr in enumerate(self.verified):
                if addr is not None and addr // IMAGE_ALIGN <= block < addr // IMAGE_ALIGN + self.nbytes // IMAGE_ALIGN:
                    self.verified[i] = None

    def run(self, addr, expert_id, tokens):
        """What the loader must do for a command: (code, params words, weight records), and
        the bytes it reads, given the table of verified images (which it updates)."""
        loader = self.loader
        if addr // IMAGE_ALIGN >= self.size // IMAGE_ALIGN:
            return ImageErrorCode.TRUNCATED, [], []
        self.expected_bytes += HEADER_SIZE
        data = bytes(self.memory[addr: addr + self.nbytes])
        code, qe = self._check(data, expert_id)
        if code in (0, ImageErrorCode.BAD_PAYLOAD_CRC):
            if addr not in self.verified:
                self.verify_passes += 1
                self.expected_bytes += loader.verify_bytes
                if code == 0 and self.verified:
                    self.verified[self.next_verified] = addr
                    self.next_verified = (self.next_verified + 1) % len(self.verified)
            elif code:
                raise AssertionError("a verified image changed without a write")
        if code:
            return code, [], []
        self.expected_bytes += loader.stream_bytes(tokens)
        return 0, param_words(qe), weight_stream(qe, tokens, self.p["rows"])

    def _check(self, data, expert_id):
        key = (data, expert_id)
        if key not in self._golden:
            try:
                _, qe = read_image(data, config_hash=self.p["device_hash"], expert_id=expert_id, layout=self.layout)
                self._golden[key] = (0, qe)
            except ImageError as error:
                self._golden[key] = (error.code, None)
        return self._golden[key]


def _decode(value, layout):
    return {name: (value >> field.offset) & ((1 << field.shape.width) - 1) for name, field in layout}


class TB:
    def __init__(self, dut, params, rng):
        self.dut = dut
        self.p = params
        self.rng = rng
        loader = geometry(params)
        self.addr_width = loader.mem_addr_width
        self.cmd_addr_width = loader.addr_width

    def write_beat(self, word, value):
        return word | value << self.addr_width

    def command(self, addr, expert, tokens):
        return addr | expert << self.cmd_addr_width | tokens << (self.cmd_addr_width + 16)

    async def write(self, source, scenario, beats):
        await source.send([self.write_beat(word, value) for word, value in beats])
        scenario.apply(beats)

    def status(self):
        return _decode(int(self.dut.status.value), STATUS_LAYOUT)


async def _settle(dut, cycles=2):
    await ClockCycles(dut.clk, cycles)
    await FallingEdge(dut.clk)


async def _scenario(dut, params, rng, idle, stall):
    """One scenario (module docstring) with the command source idling with probability
    ``idle`` and the sinks stalling with ``stall``; returns its report."""
    scenario = Scenario(params, rng)
    tb = TB(dut, params, rng)
    await reset(dut)
    writer = StreamSource(dut, "write", rng=random.Random(rng.random()))
    commands = StreamSource(dut, "cmd", idle=idle, rng=random.Random(rng.random()))
    sinks = {name: StreamSink(dut, name, stall=stall, rng=random.Random(rng.random()))
             for name in ("params", "weights", "done")}
    tasks = [cocotb.start_soon(sink.run()) for sink in sinks.values()]

    ids = rng.sample(range(1 << 16), scenario.slots + params["commands"])
    slot_expert = {}
    for slot in range(scenario.slots):
        slot_expert[slot] = ids.pop()
        image = scenario.good_image(slot_expert[slot])
        await tb.write(writer, scenario, scenario.writes(slot * scenario.nbytes, image, every=True))
    straddle_expert = slot_expert[0]
    header = scenario.good_image(straddle_expert)[:IMAGE_ALIGN]
    await tb.write(writer, scenario, scenario.writes(scenario.straddle, header, every=True))

    issued = []  # (addr, expert, tokens, slot) per command
    expected = []  # (code, params words, weight records) per command

    async def rewrite(slot, image):
        waited = 0
        while any(s == slot for *_, s in issued[len(sinks["done"].beats):]):
            await FallingEdge(dut.clk)  # only an image no pending command reads
            waited += 1
            assert waited < 100_000, f"the commands on slot {slot} never completed"
        await tb.write(writer, scenario, scenario.writes(slot * scenario.nbytes, image))

    async def run(addr, expert_id, slot):
        tokens = rng.choice(params["tokens"])
        code, words, records = scenario.run(addr, expert_id, tokens)
        issued.append((addr, expert_id, tokens, slot))
        expected.append((code, words, records))
        await commands.send([tb.command(addr, expert_id, tokens)])

    # every corruption and refusal once, then ``commands`` random actions
    labels = [label for label, _ in corruptions(scenario.good_image(slot_expert[0]), scenario.layout, rng)]
    actions = [("corrupt", label) for label in labels] + [("straddle", None), ("wrong_expert", None)]
    if scenario.size < 1 << tb.cmd_addr_width:
        actions.append(("beyond", None))  # a header past the end (memory sizes that are not powers of two)
    actions += [(rng.choices(["run", "wrong_expert", "restore", "replace", "straddle", "scratch"],
                             weights=[12, 1, 2, 1, 1, 1])[0], None) for _ in range(params["commands"])]
    rng.shuffle(actions)
    hot = list(range(min(3, scenario.slots)))  # reruns of these hit the verified-image table
    for action, label in actions:
        slot = rng.choice(hot) if rng.random() < 0.7 else rng.randrange(scenario.slots)
        good = scenario.good_image(slot_expert[slot])
        if action == "corrupt":
            await rewrite(slot, dict(corruptions(good, scenario.layout, rng))[label])
            await run(slot * scenario.nbytes, slot_expert[slot], slot)
            if rng.random() < 0.8:  # mostly repaired again, so later runs of the slot succeed
                await rewrite(slot, good)
        elif action in ("restore", "replace"):
            if action == "replace":
                slot_expert[slot] = ids.pop()
            await rewrite(slot, scenario.good_image(slot_expert[slot]))
            await run(slot * scenario.nbytes, slot_expert[slot], slot)
        elif action == "scratch":
            lo, hi = scenario.scratch
            if hi - lo >= scenario.port_bytes:  # an unrelated write while the loader runs
                at = rng.randrange(lo // scenario.port_bytes, hi // scenario.port_bytes)
                await tb.write(writer, scenario, [(at, rng.getrandbits(8 * scenario.port_bytes))])
        elif action == "straddle":
            await run(scenario.straddle, straddle_expert, -1)
        elif action == "beyond":
            await run(scenario.size, slot_expert[0], -1)
        elif action == "wrong_expert":
            await run(slot * scenario.nbytes, (slot_expert[slot] + 1) % (1 << 16), slot)
        else:
            await run(slot * scenario.nbytes, slot_expert[slot], slot)

    total_words = sum(len(w) for _, w, _ in expected)
    total_records = sum(len(r) for _, _, r in expected)
    budget = 200 + 4 * (scenario.expected_bytes // scenario.port_bytes) + 6 * (total_words + total_records)
    finished = await sinks["done"].wait_for(len(issued), timeout_cycles=int(budget / max(0.05, 1 - stall)))
    await _settle(dut, 8)
    for task in tasks:
        task.cancel()

    got_done = [_decode(v, done_layout()) for v in sinks["done"].beats]
    want_done = [{"expert": e, "code": int(c)} for (_, e, _, _), (c, _, _) in zip(issued, expected, strict=True)]
    want_words = [w for _, words, _ in expected for w in words]
    want_records = [r for _, _, records in expected for r in records]
    mismatches = []
    for name, got, want in (("done", got_done, want_done), ("params", sinks["params"].beats, want_words),
                            ("weights", sinks["weights"].beats, want_records)):
        bad = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
        if bad or len(got) != len(want):
            i = bad[0] if bad else min(len(got), len(want))
            mismatches.append({"stream": name, "index": i, "got_count": len(got), "want_count": len(want),
                               "got": got[i] if i < len(got) else None, "want": want[i] if i < len(want) else None})
    status = tb.status()
    codes = [int(c) for c, _, _ in expected]
    counters = {
        "header_errors": sum(1 for c in codes if c and c != ImageErrorCode.BAD_PAYLOAD_CRC),
        "crc_errors": codes.count(ImageErrorCode.BAD_PAYLOAD_CRC),
        "verify_passes": scenario.verify_passes,
        "bytes_loaded": scenario.expected_bytes,
    }
    return {
        "idle": idle, "stall": stall, "commands": len(issued), "ok": codes.count(0),
        "refused": {ImageErrorCode(c).name: codes.count(c) for c in sorted(set(codes)) if c},
        "params_words": total_words, "records": total_records, "finished": finished,
        "mismatches": mismatches,
        "stream_violations": [f"{name}: {v}" for name, sink in sinks.items() for v in sink.violations[:3]],
        "counter_errors": {k: {"got": status[k], "want": v} for k, v in counters.items() if status[k] != v},
        "status": {k: status[k] for k in ("load_cycles", "stall_cycles", "bytes_loaded", "verify_passes")},
        "cycles": sinks["done"].cycle,
    }


@cocotb.test()
async def loader_matches_golden(dut):
    """Golden streams for every good command, nothing for a bad one, exact error and byte
    counts, under random memory latency and every idle/backpressure pattern."""
    params = tb_params()
    if "patterns" not in params:
        return
    start_clock(dut)
    failures = []
    for pattern, (idle, stall) in enumerate(params["patterns"]):
        report = await _scenario(dut, params, random.Random(params["seed"] * 7919 + pattern), idle, stall)
        write_tb_report(report)
        if not report["finished"] or report["mismatches"] or report["stream_violations"] or report["counter_errors"]:
            failures.append(report)
    assert not failures, f"{len(failures)} failing patterns, first: {failures[0]}"


@cocotb.test()
async def loader_bench(dut):
    """Sequences of expert runs with the consumer model; reports cycles per round."""
    params = tb_params()
    if "settings" not in params:
        return
    start_clock(dut)
    rng = random.Random(params["seed"])
    scenario = Scenario(params, rng)
    tb = TB(dut, params, rng)
    loader = scenario.loader
    await reset(dut)
    writer = StreamSource(dut, "write")
    for slot in range(scenario.slots):
        await tb.write(writer, scenario, scenario.writes(slot * scenario.nbytes, scenario.good_image(slot + 1),
                                                         every=True))
    for setting in params["settings"]:
        await reset(dut)
        dut.slowdown.value = setting["slowdown"]
        commands = StreamSource(dut, "cmd")
        for round_index, sequence in enumerate(setting["rounds"]):
            before = tb.status()
            start = int(dut.cycle.value)
            taken = (int(dut.params_taken.value), int(dut.records_taken.value), int(dut.done_taken.value))
            cocotb.start_soon(commands.send([tb.command(slot * scenario.nbytes, slot + 1, setting["tokens"])
                                             for slot in sequence]))
            while int(dut.done_taken.value) < taken[2] + len(sequence):
                await Timer(1000 * 10, "ns")
                await ReadOnly()
            await FallingEdge(dut.clk)
            after = tb.status()
            write_tb_report({
                "setting": setting["name"], "round": round_index, "experts": len(sequence),
                "tokens": setting["tokens"], "slowdown": setting["slowdown"],
                "cycles": int(dut.last_done_cycle.value) - start + 1,
                "params_words": int(dut.params_taken.value) - taken[0],
                "records": int(dut.records_taken.value) - taken[1],
                "errors": int(dut.errors_taken.value),
                "run_bytes": loader.run_bytes, "verify_bytes": loader.verify_bytes,
                **{k: after[k] - before[k] for k in ("bytes_loaded", "load_cycles", "stall_cycles", "verify_passes")},
            })

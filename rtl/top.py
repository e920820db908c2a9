"""The accelerator: link, registers, command queue, command processor and device memory.

``docs/device.md`` is the contract (ports, commands, errors); :class:`moegen.golden.device.
DeviceModel` defines what the commands do. :class:`CommandProcessor` runs the commands one
after another with the router, the expert loader and engine, the accumulator and two DMA
engines (:mod:`moegen.rtl.dma`); :class:`Accelerator` wires it to the link endpoint, the
register file and device memory.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out, connect, flipped
from amaranth.utils import bits_for

from ..golden.device import (
    ALIGN,
    COMMAND_WORDS,
    QUEUE_COMMANDS,
    Command,
    CommandError,
    ErrorSource,
    route_words,
    x_words,
)
from .dma import WordReader, WordWriter
from .expert import COUNTERS, ExpertEngine
from .link import LinkEndpoint
from .loader import ExpertLoader
from .memory import (
    BlockFIFO,
    BlockRAMMemory,
    BurstArbiter,
    SimulatedMemory,
    SPRAMMemory,
    StreamSlice,
    burst_read_signature,
    unchecked_ram,
    word_addr_width,
    write_layout,
    written_signature,
)
from .regmap import RegisterFile, register_map
from .router import TopKRouter

__all__ = ["Accelerator", "CommandProcessor"]

#: Bits of the error code inside ``ERROR`` (``source << 8 | code``).
CODE_BITS = 8


def _error(source, code):
    return int(source) << CODE_BITS | int(code)


def _times(value, factor):
    """``value * factor`` for a constant ``factor``: a sum of shifted copies of ``value`` (carry
    chains), not a multiplier block, whose routing in and out alone takes a 100 MHz cycle on ECP5."""
    terms = [value << i for i in range(factor.bit_length()) if factor >> i & 1]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0] if terms else Const(0)


class CommandProcessor(wiring.Component):
    """Runs commands (``docs/device.md``) in order; bit-exact with ``DeviceModel``.

    A command is taken word by word (``FETCH``), which keeps only what the command needs of
    each word and compares its count and addresses with their limits as they arrive;
    ``DECODE`` checks its opcode, layer and count (``BAD_OPCODE``, ``BAD_LAYER``,
    ``BAD_COUNT``) and registers the buffers it names (placed, room to the end of memory,
    length); ``CHECK`` compares each length with its room (``BAD_ADDRESS``). The checks are
    split so that no cycle holds both a length and its comparison. The command's own states
    follow, then ``DONE`` (or ``FAIL``), and ``FETCH`` again. ``NOP`` and ``FENCE`` go from ``DECODE`` to ``DONE``.

    Members
    -------
    cmd : ``In(stream.Signature(32))``
        Command words, :data:`~moegen.golden.device.COMMAND_WORDS` per command.
    mem : ``Out(burst_read_signature(...))``
        Reads: the loader's first, then the command DMA's.
    write : ``Out(stream.Signature(write_layout(...)))``
        Word writes of ``ROUTE`` and ``ACC_STORE`` results.
    written : ``In(written_signature(...))``
        Every device-memory write (the loader forgets images written over).
    k, top_p : ``In(32).array(layers)``
        The per-layer ``K`` and ``TOP_P`` registers.
    clear_error, clear_counters : ``In(1)``
        ``CONTROL`` bits 0 and 1: clear ``ERROR``; zero the counters.
    busy : ``Out(1)``
        A command is running.
    error, fence : ``Out(32)``
        The ``ERROR`` and ``FENCE`` registers.
    totals : dict of counter name -> ``Out(32)``
        ``COMMANDS``, ``ROUTED_TOKENS``, engine and loader counters (see :func:`register_map`);
        only with ``device.counters``.
    """

    TOTALS = ("BUSY_CYCLES", "COMMANDS", "ROUTED_TOKENS", "ENGINE_BUSY", "ENGINE_STEPS", "STALL_WEIGHTS",
              "STALL_ACTIVATIONS", "STALL_OUTPUT", "LOAD_CYCLES", "LOAD_BYTES", "IMAGE_ERRORS")

    def __init__(self, config):
        self.config = config
        mem = config.memory
        self.addr_width = word_addr_width(mem.size_bytes, mem.port_width)
        self.port_shift = (mem.port_width // 8).bit_length() - 1
        members = {
            "cmd": In(stream.Signature(32)),
            "mem": Out(burst_read_signature(addr_width=self.addr_width, data_width=mem.port_width,
                                            burst_len=mem.burst_len)),
            "write": Out(stream.Signature(write_layout(self.addr_width, mem.port_width))),
            "written": In(written_signature(self.addr_width)),
            "k": In(32).array(config.model.layers),
            "top_p": In(32).array(config.model.layers),
            "clear_error": In(1),
            "clear_counters": In(1),
            "busy": Out(1),
            "error": Out(32),
            "fence": Out(32),
        }
        if config.device.counters:
            members.update({name.lower(): Out(32) for name in self.TOTALS})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        config = self.config
        r, a, model, mem = config.router, config.array, config.model, config.memory
        m.submodules.router = router = TopKRouter.from_config(r)
        # the loader's requests wait in the request slice below as well: one burst more in flight
        m.submodules.loader = loader = ExpertLoader.from_config(config, outstanding=mem.outstanding + 1)
        m.submodules.engine = engine = ExpertEngine.from_config(config)
        hidden_tiles = engine.hidden_tiles
        acc_depth = model.max_tokens * hidden_tiles
        # Widths: a buffer that passed CHECK lies in device memory, so a DMA transfer counts at
        # most its 32-bit words; ``count`` and ``progress`` count tokens (ROUTE: up to 0xFFFF),
        # experts or accumulator entries; ``nbytes`` holds a length up to the memory size, and
        # ``beyond`` whether it is longer.
        dma_width = bits_for(mem.size_bytes // 4)
        count_width = bits_for(max(0xFFFF, acc_depth, r.experts))
        m.submodules.reader = reader = WordReader(
            addr_width=self.addr_width, port_width=mem.port_width, burst_len=mem.burst_len, count_width=dma_width,
            buffer_words=mem.outstanding * mem.burst_len)
        m.submodules.writer = writer = WordWriter(addr_width=self.addr_width, port_width=mem.port_width,
                                                  count_width=dma_width)
        m.submodules.arbiter = arbiter = BurstArbiter(clients=2, addr_width=self.addr_width,
                                                      data_width=mem.port_width, burst_len=mem.burst_len,
                                                      outstanding=mem.outstanding + 2)
        connect(m, loader.mem, arbiter.clients[0])
        connect(m, reader.mem, arbiter.clients[1])
        # a register slice on the requests: the grant of the nested arbiters (this one, the
        # loader's) no longer meets the device's arbiter in one cycle. Its depth, and so the
        # rate of requests that hls.model's request_spacing follows, is request_slice_depth's
        # (at the end of this module).
        m.submodules.requests = requests = StreamSlice(arbiter.mem.req.payload.shape(),
                                                       depth=request_slice_depth(mem))
        connect(m, arbiter.mem.req, requests.i)
        connect(m, requests.o, flipped(self.mem.req))
        connect(m, flipped(self.mem.data), arbiter.mem.data)
        connect(m, writer.write, flipped(self.write))
        connect(m, flipped(self.written), loader.written)
        connect(m, loader.params, engine.params)
        connect(m, loader.weights, engine.weights)

        # the RUN_EXPERT table (written in TABLE, read while the expert runs): a row at or above
        # max_tokens fails the command, so the bits below max_tokens hold any row that is used
        row_bits = max(1, (model.max_tokens - 1).bit_length())
        table_w, table_r = unchecked_ram(m, "table", shape=data.StructLayout({"row": row_bits, "weight": 16}),
                                         depth=max(2, model.max_tokens))

        def table_index(index):
            return index if model.max_tokens > 1 else 0  # one token: entry 0 alone is used
        # the accumulator: an entry read in the cycle it is written is never used
        acc_w, acc_r = unchecked_ram(m, "acc", shape=data.ArrayLayout(signed(32), a.cols), depth=max(2, acc_depth))

        # The command being decoded or run, kept as FETCH takes its words (word 0, the opcode,
        # comes first): the opcode (7 for any above the last command), word 1 whole (the FENCE
        # id, the ROUTE layer, the RUN_EXPERT image), the count (``tokens``) and the expert, the
        # buffer addresses in units of ALIGN, and what the checks need of the words not kept:
        # whether the count is out of range and whether each address is aligned and at most the
        # memory size (one comparison on the incoming word serves every address).
        got = Signal(range(COMMAND_WORDS + 1))
        op = Signal(3)
        word1 = Signal(32)
        expert = Signal(16)
        tokens = Signal(16)
        count_bad = Signal()
        align_bits = (ALIGN - 1).bit_length()
        addr = [Signal(range(mem.size_bytes // ALIGN + 1), name=f"addr{i}") for i in range(2)]
        placed_word = [Signal(name=f"placed_word{i}") for i in range(3)]
        failure = Signal(16)

        def fail(source, code):
            m.d.sync += failure.eq(_error(source, code))
            m.next = "FAIL"

        def port_addr(units):
            """The port-word address of an address kept in units of ALIGN."""
            return Cat(Const(0, align_bits - self.port_shift), units)

        def padded(nbytes):
            return (nbytes + (1 << self.port_shift) - 1) >> self.port_shift << self.port_shift

        layer = Signal(range(max(2, model.layers)))
        count = Signal(count_width)  # generic down/up counter of the running command
        progress = Signal(count_width)

        # The buffers a command names, as DECODE registers them for CHECK: ``placed`` (every
        # address is aligned and at most the memory size), ``room`` (bytes from the address to
        # the end of memory), the length in words (``span``, the DMA count) and in bytes
        # (``nbytes``: 4 per word, padded to port words where the model pads). A buffer fits
        # when it is placed, not beyond memory and nbytes <= room. Up to 32-bit ports the DMA
        # count is ``nbytes`` in words (no padding). Buffer 0 (``addr[0]``, word 3, or word 1 for
        # ACC_STORE) is the ROUTE logits, the RUN_EXPERT activations and the ACC_STORE output;
        # 1 (``addr[1]``, word 4) the ROUTE output and the RUN_EXPERT table; 2 (word 1) the
        # RUN_EXPERT image, which has no length.
        placed = Signal()
        room = [Signal(range(mem.size_bytes + 1), name=f"room{i}") for i in range(2)]
        nbytes = [Signal(len(room[i]), name=f"nbytes{i}") for i in range(2)]
        beyond = [Signal(name=f"beyond{i}") for i in range(2)]
        if self.port_shift <= 2:
            span = [length[2:] for length in nbytes]
        else:
            span = [Signal(dma_width, name=f"span{i}") for i in range(2)]

        def buffer(i, length, *, pad=False):
            """Statements registering buffer ``i`` of ``length`` words."""
            size = padded(length << 2) if pad else length << 2
            statements = [room[i].eq(mem.size_bytes - (addr[i] << align_bits)), nbytes[i].eq(size),
                          beyond[i].eq(size[len(nbytes[i]):].any())]
            if self.port_shift > 2:
                statements.append(span[i].eq(length))
            return statements

        m.d.comb += self.error.eq(failure)
        with m.If(self.clear_error):
            m.d.sync += failure.eq(0)

        # ROUTE: logit words -> router beats
        lanes = r.lanes
        beats = -(-r.experts // r.lanes)
        logit = Array(Signal(signed(r.logit_width), name=f"logit{i}") for i in range(lanes))
        lane = Signal(range(max(2, lanes)))
        beat = Signal(range(max(2, beats)))
        beat_full = Signal()
        m.d.comb += [
            router.i.valid.eq(beat_full),
            router.i.payload.last.eq(beat == beats - 1),
            router.k.eq(Array(self.k)[layer]),
            router.top_p.eq(Array(self.top_p)[layer]),
            router.clear_errors.eq(self.clear_error),
        ]
        for i in range(lanes):
            m.d.comb += router.i.payload.logits[i].eq(logit[i])
        with m.If(router.i.valid & router.i.ready):
            m.d.sync += [beat_full.eq(0), beat.eq(Mux(beat == beats - 1, 0, beat + 1))]
            for i in range(lanes):
                m.d.sync += logit[i].eq(0)
        # router beats -> words: count, then index | weight << 8 per slot
        result = Signal(router.o.payload.shape())
        slot = Signal(range(r.k_max + 2))
        holding = Signal()
        slot_words = Array([result.count.as_unsigned()] + [
            result.index[i] | result.weight[i] << 8 for i in range(r.k_max)])
        m.d.comb += router.o.ready.eq(~holding)
        with m.If(router.o.valid & router.o.ready):
            m.d.sync += [result.eq(router.o.payload), holding.eq(1), slot.eq(0)]

        # RUN_EXPERT accumulation: one y beat at a time, three cycles each (below)
        y = Signal(engine.y.payload.shape())
        acc_step = Signal(range(4))
        acc_addr = Signal.like(acc_r.addr)
        acc_weight = Signal(len(table_r.data.weight))
        product = Signal(data.ArrayLayout(signed(32), a.cols))  # the sum wraps to 32 bits
        acc_sum = Signal.like(product)
        acc_pending = Signal()  # acc_sum is written at acc_addr
        tile = Signal(range(max(2, hidden_tiles)))
        y_done = Signal()
        loader_done = Signal()

        stored_lane = Signal(range(max(2, a.cols)))
        stored_tile = Signal(range(max(2, hidden_tiles)))
        last_lane = Mux(stored_tile == hidden_tiles - 1, (model.hidden - 1) % a.cols, a.cols - 1)
        entry_ready = Signal()

        engine_counters = {"ENGINE_BUSY": "busy", "ENGINE_STEPS": "steps", "STALL_WEIGHTS": "stall_weights",
                           "STALL_ACTIVATIONS": "stall_activations", "STALL_OUTPUT": "stall_output"}
        assert set(engine_counters.values()) == set(COUNTERS)
        # no counters at all without device.counters
        totals = {name: getattr(self, name.lower()) for name in self.TOTALS} if config.device.counters else {}

        def count_up(name, amount):
            """Statements adding ``amount`` to counter ``name`` (none without counters)."""
            return [totals[name].eq(totals[name] + amount)] if totals else []

        # the loader's counters run from reset: report them from the last clear
        status = loader.status
        loader_counts = {"LOAD_CYCLES": status.load_cycles[:32], "LOAD_BYTES": status.bytes_loaded[:32],
                         "IMAGE_ERRORS": Cat(status.crc_errors[:16], status.header_errors[:16])}
        for name, value in loader_counts.items() if totals else ():
            base = Signal(32, name=f"{name.lower()}_base")
            m.d.comb += totals[name].eq(value - base)
            with m.If(self.clear_counters):
                m.d.sync += base.eq(value)
        fence = Signal(32)
        m.d.comb += self.fence.eq(fence)

        # the DMA engines' handshakes are set per state below
        m.d.comb += engine.x.payload.eq(reader.o.payload)

        def read_cmd(addr, count):
            """Statements starting a :class:`WordReader` transfer of ``count`` words at ``addr``."""
            return [reader.cmd.valid.eq(1), reader.cmd.payload.addr.eq(port_addr(addr)),
                    reader.cmd.payload.words.eq(count)]

        def write_cmd(addr, count):
            """Statements starting a :class:`WordWriter` transfer of ``count`` words at ``addr``."""
            return [writer.cmd.valid.eq(1), writer.cmd.payload.addr.eq(port_addr(addr)),
                    writer.cmd.payload.words.eq(count)]

        with m.FSM(name="processor"):
            with m.State("FETCH"):
                m.d.comb += self.cmd.ready.eq(1)
                word = self.cmd.payload
                high_zero = word[16:] == 0
                word_placed = (word[:align_bits] == 0) & (word <= mem.size_bytes)
                with m.If(self.cmd.valid):
                    m.d.sync += got.eq(got + 1)
                    with m.If(got == 0):
                        m.d.sync += op.eq(Mux(word[3:].any(), 7, word[:3]))
                    with m.If(got == 1):
                        m.d.sync += [word1.eq(word), placed_word[2].eq(word_placed)]
                    # the count: word 1 of ACC_CLEAR, word 2 (its high half for RUN_EXPERT) of the others
                    with m.If(got == Mux(op == Command.ACC_CLEAR, 1, 2)):
                        with m.If(op == Command.ROUTE):
                            m.d.sync += [tokens.eq(word[:16]), count_bad.eq((word[:16] == 0) | ~high_zero)]
                        with m.Elif(op == Command.RUN_EXPERT):
                            m.d.sync += [tokens.eq(word[16:]), expert.eq(word[:16]),
                                         count_bad.eq(high_zero | (word[16:] > model.max_tokens))]
                        with m.Else():
                            m.d.sync += [tokens.eq(word[:16]),
                                         count_bad.eq((word[:16] == 0) | ~high_zero | (word[:16] > model.max_tokens))]
                    with m.If(got == Mux(op == Command.ACC_STORE, 1, 3)):
                        m.d.sync += [addr[0].eq(word[align_bits:]), placed_word[0].eq(word_placed)]
                    with m.If(got == 4):
                        m.d.sync += [addr[1].eq(word[align_bits:]), placed_word[1].eq(word_placed)]
                    with m.If(got == COMMAND_WORDS - 1):
                        m.d.sync += got.eq(0)
                        m.next = "DECODE"
            with m.State("DECODE"):
                # the opcode, layer and counts; the buffers go to CHECK (counts above their limits
                # fail here, so their low 16 bits make the lengths)
                m.d.comb += self.busy.eq(1)
                m.d.sync += [placed.eq(1), *(length.eq(0) for length in nbytes), *(flag.eq(0) for flag in beyond)]
                n = tokens
                with m.If(failure != 0):
                    m.next = "FETCH"  # discarded: an earlier command failed
                with m.Elif(op == Command.NOP):
                    m.next = "DONE"
                with m.Elif(op == Command.FENCE):
                    m.d.sync += fence.eq(word1)
                    m.next = "DONE"
                with m.Elif(op == Command.ROUTE):
                    m.d.sync += [layer.eq(word1), lane.eq(0), beat.eq(0), progress.eq(0), count.eq(0),
                                 placed.eq(placed_word[0] & placed_word[1]), *buffer(0, _times(n, r.experts)),
                                 *buffer(1, _times(n, route_words(r.k_max)), pad=True)]
                    with m.If(word1 >= model.layers):
                        fail(ErrorSource.COMMAND, CommandError.BAD_LAYER)
                    with m.Elif(count_bad):
                        fail(ErrorSource.COMMAND, CommandError.BAD_COUNT)
                    with m.Else():
                        m.next = "CHECK"
                with m.Elif(op == Command.RUN_EXPERT):
                    m.d.sync += [count.eq(0), progress.eq(0), placed.eq(Cat(placed_word).all()),
                                 *buffer(0, _times(n, x_words(model.hidden))), *buffer(1, n)]
                    with m.If(count_bad):
                        fail(ErrorSource.COMMAND, CommandError.BAD_COUNT)
                    with m.Else():
                        m.next = "CHECK"
                with m.Elif((op == Command.ACC_CLEAR) | (op == Command.ACC_STORE)):
                    m.d.sync += [count.eq(_times(n, hidden_tiles)), progress.eq(0), stored_lane.eq(0),
                                 stored_tile.eq(0), entry_ready.eq(0)]
                    with m.If(op == Command.ACC_STORE):
                        m.d.sync += [placed.eq(placed_word[0]), *buffer(0, _times(n, model.hidden), pad=True)]
                    with m.If(count_bad):
                        fail(ErrorSource.COMMAND, CommandError.BAD_COUNT)
                    with m.Else():
                        m.next = "CHECK"
                with m.Else():
                    fail(ErrorSource.COMMAND, CommandError.BAD_OPCODE)
            with m.State("CHECK"):
                # the buffers DECODE registered
                m.d.comb += self.busy.eq(1)
                fit = placed & ~Cat(beyond).any() & (nbytes[0] <= room[0]) & (nbytes[1] <= room[1])
                with m.If(~fit):
                    fail(ErrorSource.COMMAND, CommandError.BAD_ADDRESS)
                with m.Elif(op == Command.ROUTE):
                    m.next = "ROUTE_START"
                with m.Elif(op == Command.RUN_EXPERT):
                    m.next = "TABLE_START"
                with m.Else():
                    m.next = "ACC"

            # ---- ROUTE --------------------------------------------------------------
            with m.State("ROUTE_START"):
                m.d.comb += [
                    self.busy.eq(1),
                    *read_cmd(addr[0], span[0]),
                    *write_cmd(addr[1], span[1]),
                ]
                m.next = "ROUTE_RUN"
            with m.State("ROUTE_RUN"):
                m.d.comb += self.busy.eq(1)
                # logits in
                m.d.comb += reader.o.ready.eq(~beat_full)
                with m.If(reader.o.valid & reader.o.ready):
                    m.d.sync += logit[lane].eq(reader.o.payload[: r.logit_width])
                    last_of_token = progress == r.experts - 1
                    with m.If((lane == lanes - 1) | last_of_token):
                        m.d.sync += [beat_full.eq(1), lane.eq(0)]
                    with m.Else():
                        m.d.sync += lane.eq(lane + 1)
                    m.d.sync += progress.eq(Mux(last_of_token, 0, progress + 1))
                # results out
                m.d.comb += [writer.i.valid.eq(holding), writer.i.payload.eq(slot_words[slot])]
                with m.If(writer.i.valid & writer.i.ready):
                    with m.If(slot == r.k_max):
                        m.d.sync += [holding.eq(0), count.eq(count + 1)]
                    with m.Else():
                        m.d.sync += slot.eq(slot + 1)
                with m.If((count == tokens) & ~writer.busy):
                    m.d.sync += count_up("ROUTED_TOKENS", tokens)
                    m.next = "DONE"

            # ---- RUN_EXPERT ---------------------------------------------------------
            with m.State("TABLE_START"):
                m.d.comb += [
                    self.busy.eq(1),
                    *read_cmd(addr[1], span[1]),
                ]
                m.d.sync += count.eq(0)  # rows out of range seen
                m.next = "TABLE"
            with m.State("TABLE"):
                m.d.comb += [self.busy.eq(1), reader.o.ready.eq(1),
                             table_w.addr.eq(table_index(progress)),
                             table_w.data.eq(Cat(reader.o.payload[:row_bits], reader.o.payload[16:])),
                             table_w.en.eq(reader.o.valid)]
                with m.If(reader.o.valid):
                    m.d.sync += progress.eq(progress + 1)
                    with m.If(reader.o.payload[:16] >= model.max_tokens):
                        m.d.sync += count.eq(1)
                with m.If(~reader.busy & (progress == tokens)):
                    with m.If(count != 0):
                        fail(ErrorSource.COMMAND, CommandError.BAD_ROW)
                    with m.Else():
                        m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [
                    self.busy.eq(1),
                    loader.cmd.valid.eq(1),
                    loader.cmd.payload.addr.eq(word1),
                    loader.cmd.payload.expert.eq(expert),
                    loader.cmd.payload.tokens.eq(tokens),
                ]
                with m.If(loader.cmd.ready):
                    m.d.sync += [y_done.eq(0), loader_done.eq(0), tile.eq(0), acc_step.eq(0)]
                    m.next = "WAIT_PARAMS"
            with m.State("WAIT_PARAMS"):
                m.d.comb += self.busy.eq(1)
                with m.If(loader.done.valid):
                    m.d.comb += loader.done.ready.eq(1)
                    m.d.sync += failure.eq(loader.done.payload.code | ErrorSource.LOADER << CODE_BITS)
                    m.next = "FAIL"
                with m.Elif(loader.params.valid):
                    m.d.comb += [
                        engine.run.valid.eq(1),
                        engine.run.payload.eq(tokens),
                        *read_cmd(addr[0], span[0]),
                    ]
                    m.next = "EXPERT"
            with m.State("EXPERT"):
                m.d.comb += [self.busy.eq(1), engine.x.valid.eq(reader.o.valid), reader.o.ready.eq(engine.x.ready)]
                with m.If(loader.done.valid):
                    m.d.comb += loader.done.ready.eq(1)
                    m.d.sync += loader_done.eq(1)
                # accumulate, a register after each block RAM read, the multiply and the sum,
                # three cycles a y beat: 1 keep the entry's accumulator address and weight; 2
                # read the accumulator, multiply; 3 add; the sum is written the next cycle,
                # beside the next beat's step 1. A beat is taken (and its table entry read) in
                # step 0 or 3, so y.ready comes from registers alone.
                take_y = ~y_done & ((acc_step == 0) | ((acc_step == 3) & ~y.last))
                m.d.comb += [engine.y.ready.eq(take_y), table_r.addr.eq(table_index(engine.y.payload.token))]
                with m.Switch(acc_step):
                    with m.Case(1):
                        m.d.comb += table_r.en.eq(0)
                        m.d.sync += [acc_addr.eq(table_r.data.row * hidden_tiles + tile),
                                     acc_weight.eq(table_r.data.weight), acc_step.eq(2)]
                    with m.Case(2):
                        m.d.comb += acc_r.addr.eq(acc_addr)
                        for c in range(a.cols):
                            m.d.sync += product[c].eq(Cat(acc_weight, Const(0, 1)).as_signed() * y.values[c])
                        m.d.sync += acc_step.eq(3)
                    with m.Case(3):
                        for c in range(a.cols):
                            m.d.sync += acc_sum[c].eq(acc_r.data[c] + product[c])
                        m.d.sync += acc_step.eq(0)
                        with m.If(y.token + 1 == tokens):
                            m.d.sync += tile.eq(tile + 1)
                        with m.If(y.last):
                            m.d.sync += y_done.eq(1)
                with m.If(engine.y.valid & take_y):
                    m.d.sync += [y.eq(engine.y.payload), acc_step.eq(1)]
                m.d.comb += [acc_w.addr.eq(acc_addr), acc_w.data.eq(acc_sum), acc_w.en.eq(acc_pending)]
                m.d.sync += acc_pending.eq(acc_step == 3)
                with m.If(y_done & loader_done & ~acc_pending):
                    for name, field in engine_counters.items():
                        m.d.sync += count_up(name, getattr(engine.counters, field))
                    m.next = "DONE"

            # ---- ACC_CLEAR / ACC_STORE ----------------------------------------------
            with m.State("ACC"):
                m.d.comb += self.busy.eq(1)
                with m.If(op == Command.ACC_CLEAR):
                    m.d.comb += [acc_w.addr.eq(progress), acc_w.en.eq(1)]
                    for c in range(a.cols):
                        m.d.comb += acc_w.data[c].eq(0)
                    m.d.sync += progress.eq(progress + 1)
                    with m.If(progress + 1 == count):
                        m.next = "DONE"
                with m.Else():
                    m.d.comb += write_cmd(addr[0], span[0])
                    m.next = "STORE"
            with m.State("STORE"):
                m.d.comb += [self.busy.eq(1), acc_r.addr.eq(progress)]
                # entry_ready: acc_r.data holds entry `progress - 1` (registered read)
                with m.If(~entry_ready & (progress != count)):
                    m.d.sync += [entry_ready.eq(1), progress.eq(progress + 1)]
                with m.If(entry_ready):
                    m.d.comb += [writer.i.valid.eq(1),
                                 writer.i.payload.eq(Array(acc_r.data[c] for c in range(a.cols))[stored_lane])]
                    m.d.comb += acc_r.en.eq(0)
                    with m.If(writer.i.ready):
                        with m.If(stored_lane == last_lane):
                            m.d.sync += [stored_lane.eq(0), entry_ready.eq(0),
                                         stored_tile.eq(Mux(stored_tile == hidden_tiles - 1, 0, stored_tile + 1))]
                        with m.Else():
                            m.d.sync += stored_lane.eq(stored_lane + 1)
                with m.If((progress == count) & ~entry_ready & ~writer.busy):
                    m.next = "DONE"

            with m.State("FAIL"):
                m.d.comb += self.busy.eq(1)
                m.next = "FETCH"
            with m.State("DONE"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += count_up("COMMANDS", 1)
                m.next = "FETCH"
        m.d.sync += count_up("BUSY_CYCLES", self.busy)
        with m.If(self.clear_counters):
            m.d.sync += [totals[name].eq(0) for name in totals if name not in loader_counts]
        return m


class Accelerator(wiring.Component):
    """The whole device: ``rx``/``tx`` bytes in and out, ``idle`` (``docs/device.md``).

    Parameters
    ----------
    config : AccelConfig
    memory : str
        ``"sim"``: :class:`~moegen.rtl.memory.SimulatedMemory` with the config's latency;
        ``"harness"``: the same with its words in the Verilog RAM model of the harness;
        ``"bram"``: :class:`~moegen.rtl.memory.BlockRAMMemory` (boards); ``"spram"``:
        :class:`~moegen.rtl.memory.SPRAMMemory` (iCE40 UltraPlus boards).

    Members
    -------
    rx : ``In(stream.Signature(8))``
    tx : ``Out(stream.Signature(8))``
    idle : ``Out(1)``
        No partial request, no response byte, no queued or running command.
    """

    def __init__(self, config, *, memory="sim"):
        if memory not in ("sim", "harness", "bram", "spram"):
            raise ValueError(f"memory must be 'sim', 'harness', 'bram' or 'spram', not {memory!r}")
        self.config = config
        self.memory = memory
        self.registers = register_map(config)
        super().__init__({"rx": In(stream.Signature(8)), "tx": Out(stream.Signature(8)), "idle": Out(1)})

    def elaborate(self, platform):
        m = Module()
        config = self.config
        mem = config.memory
        queue_words = QUEUE_COMMANDS * COMMAND_WORDS
        m.submodules.link = link = LinkEndpoint.from_config(config, queue_words=queue_words)
        m.submodules.registers = regs = RegisterFile(self.registers)
        m.submodules.queue = queue = BlockFIFO(width=32, depth=queue_words)
        m.submodules.processor = processor = CommandProcessor(config)
        if self.memory == "bram":
            m.submodules.memory = memory = BlockRAMMemory.from_config(config)
        elif self.memory == "spram":
            m.submodules.memory = memory = SPRAMMemory.from_config(config)
        else:
            m.submodules.memory = memory = SimulatedMemory.from_config(config, external=self.memory == "harness")
        # one burst in flight more than the memory queues, and one waiting in the request FIFO
        m.submodules.reads = reads = BurstArbiter(clients=2, addr_width=memory.addr_width, data_width=mem.port_width,
                                                  burst_len=mem.burst_len, outstanding=mem.outstanding + 2)

        connect(m, flipped(self.rx), link.rx)
        connect(m, link.tx, flipped(self.tx))
        connect(m, link.csr, regs.bus)
        # reads: the command processor (loader, DMA) first, then the host
        connect(m, processor.mem, reads.clients[0])
        connect(m, link.mem_read, reads.clients[1])
        # the requests through a two-entry FIFO of registers (every burst arbiter's handshake
        # ends here; one cycle more, and a request may enter every cycle), the words straight back
        m.submodules.requests = requests = StreamSlice(reads.mem.req.payload.shape())
        connect(m, reads.mem.req, requests.i)
        connect(m, requests.o, memory.read.req)
        m.d.comb += [
            reads.mem.data.valid.eq(memory.read.data.valid),
            reads.mem.data.payload.eq(memory.read.data.payload),
            memory.read.data.ready.eq(reads.mem.data.ready),
        ]
        connect(m, memory.written, processor.written)
        # writes: the host first; the processor's results wait a cycle
        with m.If(link.mem_write.valid):
            m.d.comb += [memory.write.valid.eq(1), memory.write.payload.eq(link.mem_write.payload),
                         link.mem_write.ready.eq(memory.write.ready)]
        with m.Else():
            m.d.comb += [memory.write.valid.eq(processor.write.valid),
                         memory.write.payload.eq(processor.write.payload),
                         processor.write.ready.eq(memory.write.ready)]

        m.d.comb += [
            queue.w_en.eq(link.submit.valid),
            queue.w_data.eq(link.submit.payload),
            link.submit.ready.eq(queue.w_rdy),
            link.submit_space.eq(queue_words - queue.level),
            processor.cmd.valid.eq(queue.r_rdy),
            processor.cmd.payload.eq(queue.r_data),
            queue.r_en.eq(processor.cmd.ready),
        ]

        control = regs.pulses["CONTROL"]
        m.d.comb += [processor.clear_error.eq(control[0]), processor.clear_counters.eq(control[1])]
        for i in range(config.model.layers):
            m.d.comb += [processor.k[i].eq(regs.storage["K"][i]), processor.top_p[i].eq(regs.storage["TOP_P"][i])]

        busy = processor.busy | queue.r_rdy
        m.d.comb += self.idle.eq(~busy & ~link.receiving & ~link.busy)
        values = regs.values
        m.d.comb += [
            values["STATUS"][0].eq(Cat(busy, processor.error != 0, Const(0, 6), queue.level)),
            values["ERROR"][0].eq(processor.error),
            values["FENCE"][0].eq(processor.fence),
        ]
        if config.device.counters:
            cycles, frames_base, dropped_base = Signal(32), Signal(32), Signal(32)
            m.d.sync += cycles.eq(Mux(control[1], 0, cycles + 1))
            with m.If(control[1]):
                m.d.sync += [frames_base.eq(link.frames), dropped_base.eq(link.dropped)]
            m.d.comb += [
                values["CYCLES"][0].eq(cycles),
                values["LINK_FRAMES"][0].eq(link.frames - frames_base),
                values["LINK_DROPPED"][0].eq(link.dropped - dropped_base),
            ]
            for name in CommandProcessor.TOTALS:
                m.d.comb += values[name][0].eq(getattr(processor, name.lower()))
        return m


def request_slice_depth(memory):
    """Entries of the command processor's request slice for a ``memory`` config section: one
    where bursts may be longer than a word (a request every other cycle; runs of one-word
    bursts pass at half rate), else two."""
    return 1 if memory.burst_len > 1 else 2

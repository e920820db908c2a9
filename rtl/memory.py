"""Device memory: the burst read port the loader reads images through, a simulation model with
configurable latency and bandwidth, and a block-RAM memory for boards.

The burst read port (:func:`burst_read_signature`, seen from the requester) has two streams:

* ``req``: a burst request, ``addr`` (a word address; a word is ``port_width`` bits) and
  ``beats`` (``1..burst_len`` consecutive words);
* ``data``: the words, in request order, ``beats`` per request.

A memory accepts requests while it has room for them (``outstanding`` of them wait or are
being served); the requester limits how many it has in flight. Both memories here also have
a word write port (``write``) for the host, and report every accepted write on ``written``
(the loader forgets the images it verified when their bytes change).
"""

from fractions import Fraction
from types import SimpleNamespace

from amaranth import Array, Cat, ClockSignal, Const, Elaboratable, Instance, Module, Mux, Shape, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .params import check_int, reject

__all__ = [
    "PORT_WIDTHS",
    "SPRAM_BYTES",
    "SPRAM_COUNT",
    "UNCHECKED",
    "BlockFIFO",
    "BlockRAMMemory",
    "BurstArbiter",
    "SPRAMMemory",
    "ShiftFIFO",
    "SimulatedMemory",
    "SinglePortRAM",
    "StreamSlice",
    "burst_read_signature",
    "check_port_width",
    "registered_read_port",
    "stream_through",
    "unchecked_ram",
    "word_addr_width",
    "write_layout",
    "written_signature",
]

#: The fewest cycles from an accepted request to its first word: the request queue's
#: register, the word address register, the block RAM's registered read and the word register.
MIN_LATENCY = 4
#: The most requests a memory queues (``memory.outstanding``).
MAX_OUTSTANDING = 16
#: Width of the simulation model's cycle counter (request due times wrap with it).
NOW_WIDTH = 32


#: Attributes of a :class:`~amaranth.lib.memory.Memory` read through :func:`registered_read_port`:
#: yosys may return any value for a word read in the cycle it is written.
UNCHECKED = {"no_rw_check": 1}


def registered_read_port(m, memory, name=None):
    """A read port of ``memory`` (built with ``attrs=UNCHECKED``) that behaves as a synchronous
    one: ``data`` takes the word at ``addr`` when ``en`` (the word before a write in the same
    cycle), and holds otherwise; ``name`` prefixes its signals' names.

    It is an asynchronous port and a register, which yosys merges into the block RAM's
    registered read; with the memory's ``no_rw_check`` it then leaves out the bypass logic
    (a register of the written word and address, a comparator, a multiplexer) that gives a
    synchronous port its old-data collision behaviour on iCE40. Only for a memory whose users
    never use a word read in the cycle it was written.
    """
    port = memory.read_port(domain="comb")
    en = Signal(init=1, name=name and f"{name}_en")
    value = Signal(memory.shape, reset_less=True, name=name and f"{name}_data")
    with m.If(en):
        m.d.sync += value.eq(port.data)
    return SimpleNamespace(addr=port.addr, en=en, data=value)


def unchecked_ram(m, name, *, shape, depth, granularity=None):
    """A memory (submodule ``name``) whose users never use a word read in the cycle it is
    written: its write port and a :func:`registered_read_port`."""
    mem = Memory(shape=shape, depth=depth, init=[], attrs=UNCHECKED)
    m.submodules[name] = mem
    write = mem.write_port(granularity=granularity) if granularity else mem.write_port()
    return write, registered_read_port(m, mem, name=f"{name}_read")


class ShiftFIFO(Elaboratable):
    """A :class:`~amaranth.lib.fifo.SyncFIFO` (its ports ``w_en``, ``w_data``, ``w_rdy``,
    ``r_en``, ``r_data``, ``r_rdy`` and ``level``, and their timing) in registers that shift
    towards the head: ``r_data`` is the first register (no read multiplexer), and a register
    loads ``w_data`` or the next one through a LUT that packs with it."""

    def __init__(self, *, width, depth):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.width, self.depth = width, depth
        self.w_en, self.w_data, self.w_rdy = Signal(), Signal(width), Signal()
        self.r_en, self.r_data, self.r_rdy = Signal(), Signal(width), Signal()
        self.level = Signal(range(depth + 1))

    def elaborate(self, platform):
        m = Module()
        entries = [Signal(self.width, name=f"entry{k}") for k in range(self.depth)]
        do_write = Signal()
        do_read = Signal()
        m.d.comb += [
            self.w_rdy.eq(self.level != self.depth),
            self.r_rdy.eq(self.level != 0),
            do_write.eq(self.w_en & self.w_rdy),
            do_read.eq(self.r_en & self.r_rdy),
            self.r_data.eq(entries[0]),
        ]
        at = Signal(range(self.depth + 1))  # where a write lands: behind the entries that stay
        m.d.comb += at.eq(self.level - do_read)
        for k, entry in enumerate(entries):
            with m.If(do_write & (at == k)):
                m.d.sync += entry.eq(self.w_data)
            if k + 1 < self.depth:
                with m.Elif(do_read):
                    m.d.sync += entry.eq(entries[k + 1])
        m.d.sync += self.level.eq(self.level + do_write - do_read)
        return m


class StreamSlice(wiring.Component):
    """A stream through a :class:`ShiftFIFO` of ``depth`` entries: ``i.ready``, ``o.valid``
    and ``o.payload`` are registers, so no combinational path crosses it in either direction
    (a stall downstream no longer reaches the producer in the same cycle). One cycle of
    latency.

    Parameters
    ----------
    shape : shape-castable
        Of the payload.
    depth : int
        Entries, 1 or 2. With two (the default) a beat can pass every cycle; with one, every
        other cycle (its entry is free again only the cycle after it leaves), for half the
        flip-flops, where the beats seldom come faster (a burst's request, one per burst).

    Members
    -------
    i : ``In(stream.Signature(shape))``
    o : ``Out(stream.Signature(shape))``
    """

    def __init__(self, shape, *, depth=2):
        self.shape = shape
        self.depth = check_int(self, "depth", depth, 1, 2)
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = fifo = ShiftFIFO(width=Shape.cast(self.shape).width, depth=self.depth)
        stream_through(m, fifo, self.i, self.o)
        return m


def stream_through(m, fifo, source, sink):
    """Connect stream ``source`` to stream ``sink`` through ``fifo`` (the ports of a
    :class:`~amaranth.lib.fifo.SyncFIFO`)."""
    m.d.comb += [
        fifo.w_en.eq(source.valid),
        fifo.w_data.eq(source.payload),
        source.ready.eq(fifo.w_rdy),
        sink.valid.eq(fifo.r_rdy),
        sink.payload.eq(fifo.r_data),
        fifo.r_en.eq(sink.ready),
    ]


class BlockFIFO(SyncFIFOBuffered):
    """:class:`~amaranth.lib.fifo.SyncFIFOBuffered`, cycle for cycle, with its storage read
    through :func:`registered_read_port`: a FIFO never reads the word it writes (the read
    side takes a word only while one is stored, and a write never lands on a stored one), so
    the block RAM needs no collision logic (on iCE40, 70 logic cells fewer for 32 bits).

    ``block``: keep the storage in block RAM however small (yosys builds a few words from
    flip-flops and multiplexers, which on iCE40 cost more logic cells than a spare block RAM).

    ``lanes`` above 1: an entry is written a lane (``w_data``, ``width // lanes`` bits, the
    first lane lowest) per write into the block RAM itself, and enters the queue with its last
    lane, as the whole entry would have then (a narrow producer needs no gathering register).
    """

    def __init__(self, *, width, depth, block=False, lanes=1):
        super().__init__(width=width, depth=depth)
        if lanes > 1 and (depth < 2 or width % lanes):
            raise ValueError(f"lanes {lanes} need a depth of at least 2 and a width they divide, not "
                             f"depth {depth} and width {width}")
        self.block = block
        self.lanes = lanes
        if lanes > 1:
            self.w_data = Signal(width // lanes)

    def elaborate(self, platform):
        lanes = self.lanes
        if lanes == 1 and (self.depth <= 1 or platform == "formal"):
            return super().elaborate(platform)
        m = Module()
        inner_depth = self.depth - 1
        inner_level = Signal(range(inner_depth + 1))
        m.d.comb += [
            self.w_rdy.eq(inner_level != inner_depth),
            self.level.eq(inner_level + self.r_rdy),
            self.w_level.eq(self.level),
            self.r_level.eq(self.level),
        ]
        written = self.w_rdy & self.w_en
        lane = Signal(range(max(lanes, 2)))  # the lane the next write fills
        do_write = written & (lane == lanes - 1)  # an entry's last lane is written
        do_inner_read = (inner_level != 0) & (~self.r_rdy | self.r_en)

        attrs = {**UNCHECKED, "ram_style": "block"} if self.block else UNCHECKED
        m.submodules.storage = storage = Memory(shape=self.width, depth=inner_depth, init=[], attrs=attrs)
        write = storage.write_port(granularity=self.width // lanes) if lanes > 1 else storage.write_port()
        read = registered_read_port(m, storage)
        produce = Signal(range(inner_depth))
        consume = Signal(range(inner_depth))
        m.d.comb += [
            write.addr.eq(produce), write.data.eq(Cat(*[self.w_data] * lanes)),
            write.en.eq(Mux(written, (Const(1, lanes) << lane)[:lanes], 0) if lanes > 1 else do_write),
            read.addr.eq(consume), read.en.eq(do_inner_read), self.r_data.eq(read.data),
        ]
        if lanes > 1:
            with m.If(written):
                m.d.sync += lane.eq(Mux(lane == lanes - 1, 0, lane + 1))

        def advance(pointer):
            if inner_depth == 1 << len(pointer):
                return pointer + 1
            return Mux(pointer == inner_depth - 1, 0, pointer + 1)

        with m.If(do_write):
            m.d.sync += produce.eq(advance(produce))
        with m.If(do_inner_read):
            m.d.sync += [consume.eq(advance(consume)), self.r_rdy.eq(1)]
        with m.Elif(self.r_en):
            m.d.sync += self.r_rdy.eq(0)
        with m.If(do_write & ~do_inner_read):
            m.d.sync += inner_level.eq(inner_level + 1)
        with m.If(do_inner_read & ~do_write):
            m.d.sync += inner_level.eq(inner_level - 1)
        return m


def word_addr_width(size_bytes, port_width):
    """Bits of a word address into ``size_bytes`` of memory read ``port_width`` bits at a time."""
    return max(1, (size_bytes // (port_width // 8) - 1).bit_length())


def burst_read_signature(*, addr_width, data_width, burst_len):
    """The burst read port, from the requester's side (a memory takes it flipped)."""
    request = data.StructLayout({"addr": unsigned(addr_width), "beats": unsigned(burst_len.bit_length())})
    return wiring.Signature({
        "req": Out(stream.Signature(request)),
        "data": In(stream.Signature(data_width)),
    })


def written_signature(addr_width):
    """A write notice, from the memory's side: ``valid`` in every cycle a word is written,
    with its word ``addr``."""
    return wiring.Signature({"valid": Out(1), "addr": Out(unsigned(addr_width))})


def write_layout(addr_width, data_width):
    """Payload of a memory's ``write`` stream: one whole word at a word address."""
    return data.StructLayout({"addr": unsigned(addr_width), "data": unsigned(data_width)})


#: The Verilog module an ``external`` :class:`SimulatedMemory` instantiates instead of an
#: Amaranth memory (whose initializer would spell out every word of a multi-megabyte memory):
#: ``moegen_sim_ram`` with parameters ``WIDTH``, ``DEPTH``, ``ADDR_WIDTH`` and the ports below,
#: one write and one registered read per cycle (``host/harness/ram.v``).
EXTERNAL_RAM = "moegen_sim_ram"


def _external_ram(m, addr_width, width, depth):
    """Write and read ports (``addr``, ``data``, ``en``) of an :data:`EXTERNAL_RAM` instance."""
    write = SimpleNamespace(addr=Signal(addr_width), data=Signal(width), en=Signal())
    read = SimpleNamespace(addr=Signal(addr_width), data=Signal(width), en=Signal(init=1))
    m.submodules.storage = Instance(
        EXTERNAL_RAM, p_WIDTH=width, p_DEPTH=depth, p_ADDR_WIDTH=addr_width, i_clk=ClockSignal(),
        i_w_addr=write.addr, i_w_data=write.data, i_w_en=write.en, i_r_addr=read.addr, i_r_en=read.en,
        o_r_data=read.data)
    return write, read


#: Widths of a device-memory port, in bits.
PORT_WIDTHS = (8, 16, 32, 64, 128, 256, 512)


def check_port_width(component, port_width):
    """``port_width`` must be one of :data:`PORT_WIDTHS`; returns it."""
    if port_width not in PORT_WIDTHS:
        reject(component, f"port_width must be one of {', '.join(map(str, PORT_WIDTHS))}, not {port_width!r}")
    return port_width


def _check_geometry(component, size_bytes, port_width, burst_len, outstanding):
    check_port_width(component, port_width)
    check_int(component, "size_bytes", size_bytes, port_width // 8, 1 << 32)
    if size_bytes % (port_width // 8):
        reject(component, f"size_bytes must be a multiple of the port's {port_width // 8} bytes, not {size_bytes}")
    check_int(component, "burst_len", burst_len, 1, 256)
    check_int(component, "outstanding", outstanding, 1, MAX_OUTSTANDING)


class _BurstMemory(wiring.Component):
    """Storage, write port and in-order burst reads; the subclasses choose the timing."""

    def __init__(self, *, size_bytes, port_width, burst_len, outstanding, latency, jitter, bandwidth, seed,
                 external=False, single_port=None):
        self.size_bytes = size_bytes
        self.port_width = port_width
        self.burst_len = burst_len
        self.outstanding = outstanding
        self.latency = latency
        self.jitter = jitter
        self.bandwidth = bandwidth
        self.seed = seed
        self.words = size_bytes // (port_width // 8)
        self.addr_width = word_addr_width(size_bytes, port_width)
        super().__init__({
            "read": In(burst_read_signature(addr_width=self.addr_width, data_width=port_width, burst_len=burst_len)),
            "write": In(stream.Signature(write_layout(self.addr_width, port_width))),
            "written": Out(written_signature(self.addr_width)),
        })
        #: One :class:`SinglePortRAM` holds the words (reads wait while a word is written), or
        #: ``None``: a simple dual-port RAM does.
        self.single_port = single_port
        #: The words (a simulator or a testbench may read and preload them); ``None`` when
        #: ``external`` (the Verilog module :data:`EXTERNAL_RAM` holds them) or single-port.
        self.storage = None if external or single_port else Memory(shape=self.port_width, depth=self.words, init=[])

    def elaborate(self, platform):
        m = Module()
        if self.single_port is not None:
            m.submodules.storage = ram = self.single_port
            write = SimpleNamespace(addr=Signal(self.addr_width), data=ram.w_data, en=ram.w_en)
            read = SimpleNamespace(addr=Signal(self.addr_width), data=ram.r_data, en=Signal())
            m.d.comb += [ram.addr.eq(Mux(write.en, write.addr, read.addr)), ram.r_en.eq(read.en)]
        elif self.storage is None:
            write, read = _external_ram(m, self.addr_width, self.port_width, self.words)
        else:
            m.submodules.storage = storage = self.storage
            write = storage.write_port()
            read = storage.read_port()

        m.d.comb += [
            self.write.ready.eq(1),
            write.addr.eq(self.write.payload.addr),
            write.data.eq(self.write.payload.data),
            write.en.eq(self.write.valid),
            self.written.valid.eq(self.write.valid),
            self.written.addr.eq(self.write.payload.addr),
        ]

        timed = self.latency > MIN_LATENCY or self.jitter > 0
        fields = {"addr": unsigned(self.addr_width), "beats": unsigned(self.burst_len.bit_length())}
        if timed:
            fields["due"] = unsigned(NOW_WIDTH)
        entry = data.StructLayout(fields)
        m.submodules.queue = queue = SyncFIFO(width=entry.size, depth=self.outstanding)
        head = data.View(entry, queue.r_data)
        request = self.read.req.payload
        incoming = Signal(entry)
        m.d.comb += [
            self.read.req.ready.eq(queue.w_rdy),
            queue.w_en.eq(self.read.req.valid),
            queue.w_data.eq(incoming),
            incoming.addr.eq(request.addr),
            incoming.beats.eq(request.beats),
        ]

        due = Signal()  # the head request's first word may be read now
        if timed:
            now = Signal(NOW_WIDTH)
            m.d.sync += now.eq(now + 1)
            delay = Signal(NOW_WIDTH)
            if self.jitter:
                lfsr = Signal(32, init=self.seed)
                with m.If(self.read.req.valid & self.read.req.ready):
                    # Galois LFSR, x^32 + x^22 + x^2 + x + 1
                    m.d.sync += lfsr.eq(Mux(lfsr[0], (lfsr >> 1) ^ 0x80200003, lfsr >> 1))
                m.d.comb += delay.eq(self.latency - (MIN_LATENCY - 1) + lfsr % (self.jitter + 1))
            else:
                m.d.comb += delay.eq(self.latency - (MIN_LATENCY - 1))
            m.d.comb += incoming.due.eq(now + delay)
            # wrap-safe now >= due: a request is never due more than 2**31 cycles ago
            m.d.comb += due.eq(~(now - head.due)[NOW_WIDTH - 1])
        else:
            m.d.comb += due.eq(1)

        credit_ok = Signal()
        spend = Signal()
        if self.bandwidth < 1:
            num, den = self.bandwidth.numerator, self.bandwidth.denominator
            credit = Signal(range(den + 1), init=den)
            m.d.comb += credit_ok.eq(credit + num >= den)
            with m.If(spend):
                m.d.sync += credit.eq(credit + num - den)
            with m.Else():
                m.d.sync += credit.eq(Mux(credit + num > den, den, credit + num))
        else:
            m.d.comb += credit_ok.eq(1)

        # Three stages, each a register: the word's address (it fans out to every block RAM of
        # the storage), the RAM's registered read, the word out (the RAMs' outputs and their
        # multiplexer stay inside the memory). A stalled ``data`` stream holds all three.
        beat = Signal(range(max(self.burst_len, 2)))
        addr_valid = Signal()
        read_valid = Signal()
        out_valid = Signal()
        out_word = Signal(self.port_width)
        out_free = ~out_valid | self.read.data.ready
        read_free = ~read_valid | out_free
        # a single-port RAM reads only in cycles without a write
        port_free = ~self.write.valid if self.single_port is not None else 1
        reading = addr_valid & read_free & port_free
        m.d.comb += [
            spend.eq(queue.r_rdy & due & credit_ok & (~addr_valid | reading)),
            read.en.eq(reading),
            self.read.data.valid.eq(out_valid),
            self.read.data.payload.eq(out_word),
        ]
        with m.If(spend):
            m.d.sync += [read.addr.eq(head.addr + beat), addr_valid.eq(1)]
            with m.If(beat == head.beats - 1):
                m.d.comb += queue.r_en.eq(1)
                m.d.sync += beat.eq(0)
            with m.Else():
                m.d.sync += beat.eq(beat + 1)
        with m.Elif(reading):
            m.d.sync += addr_valid.eq(0)
        with m.If(read_free):
            m.d.sync += read_valid.eq(reading)
        with m.If(out_free):
            m.d.sync += [out_valid.eq(read_valid), out_word.eq(read.data)]
        return m


class BlockRAMMemory(_BurstMemory):
    """Device memory in block RAM, for boards whose images fit on chip.

    One simple dual-port RAM of ``port_width``-bit words: the write port is the host's, the
    read port serves bursts in order at one word per cycle. The first word of a burst comes
    :data:`MIN_LATENCY` cycles after its request is accepted (when the previous burst is done);
    a stalled ``data`` stream holds the word and the memory.

    Parameters
    ----------
    size_bytes : int
        Capacity, a multiple of the port's bytes.
    port_width : int
        Bits per word: 8, 16, ..., 512.
    burst_len : int
        Largest burst in words, 1..256.
    outstanding : int
        Requests queued or being served at once, 1..16.

    Members
    -------
    read : ``In(burst_read_signature(...))``
        Burst requests in, words out.
    write : ``In(stream.Signature(write_layout(...)))``
        Word writes; always ready.
    written : ``Out(written_signature(addr_width))``
        The word address of every accepted write, in the cycle it is written.
    """

    def __init__(self, *, size_bytes, port_width, burst_len=16, outstanding=2):
        _check_geometry(self, size_bytes, port_width, burst_len, outstanding)
        super().__init__(size_bytes=size_bytes, port_width=port_width, burst_len=burst_len, outstanding=outstanding,
                         latency=MIN_LATENCY, jitter=0, bandwidth=Fraction(1), seed=1)

    @classmethod
    def from_config(cls, config):
        mem = config.memory
        return cls(size_bytes=mem.size_bytes, port_width=mem.port_width, burst_len=mem.burst_len,
                   outstanding=mem.outstanding)


class SPRAMMemory(_BurstMemory):
    """Device memory in the iCE40 UltraPlus' single-port RAMs (:class:`SinglePortRAM`).

    It behaves like :class:`BlockRAMMemory` (the same ports, in-order bursts, ``write``
    always ready, the first word :data:`MIN_LATENCY` cycles after its request), except that
    the RAM has one port: a burst's next word is read only in a cycle without a write, so
    host writes delay reads and never wait.

    Parameters
    ----------
    size_bytes, port_width, burst_len, outstanding : int
        As for :class:`BlockRAMMemory`; at most :data:`SPRAM_BYTES` times four bytes (the
        four SPRAMs of an iCE40UP5K).
    primitive : bool
        ``SB_SPRAM256KA`` instances (a bitstream, or a Verilator build with yosys'
        simulation model of the cell); ``False``: an Amaranth memory that behaves the same.
    """

    def __init__(self, *, size_bytes, port_width, burst_len=16, outstanding=2, primitive=True):
        _check_geometry(self, size_bytes, port_width, burst_len, outstanding)
        ram = SinglePortRAM(depth=size_bytes // (port_width // 8), width=port_width, primitive=primitive)
        super().__init__(size_bytes=size_bytes, port_width=port_width, burst_len=burst_len, outstanding=outstanding,
                         latency=MIN_LATENCY, jitter=0, bandwidth=Fraction(1), seed=1, single_port=ram)

    @classmethod
    def from_config(cls, config, **overrides):
        mem = config.memory
        params = {"size_bytes": mem.size_bytes, "port_width": mem.port_width, "burst_len": mem.burst_len,
                  "outstanding": mem.outstanding, **overrides}
        return cls(**params)


#: Bytes of one iCE40 UltraPlus SPRAM (``SB_SPRAM256KA``: 16,384 words of 16 bits).
SPRAM_BYTES = 32768
#: SPRAMs of an iCE40UP5K.
SPRAM_COUNT = 4


class SinglePortRAM(wiring.Component):
    """A single-port RAM of ``depth`` words of ``width`` bits: in each cycle one word is
    written (``w_en``) or read (``r_en``) at ``addr``; a write wins over a read.

    A read's word is on ``r_data`` in the next cycle and stays there until the next read,
    through any writes (the SPRAM's own output is undefined after a write cycle, so the
    word is kept in a register when a write follows a read).

    On iCE40 UltraPlus (``primitive``) the words are in ``SB_SPRAM256KA`` cells of 16,384
    16-bit words: ``width // 16`` cells side by side per bank of 16,384 words (a byte-wide RAM
    uses the cell's nibble write masks, two words per cell word), banks selected by the high
    address bits; :data:`SPRAM_COUNT` cells at most.

    Parameters
    ----------
    depth : int
        Words, at least 2.
    width : int
        Bits per word: 8, 16, ..., 512.
    primitive : bool
        ``SB_SPRAM256KA`` instances, else an Amaranth memory.
    """

    def __init__(self, *, depth, width, primitive=True):
        check_port_width(self, width)
        self.depth = check_int(self, "depth", depth, 2, 1 << 32)
        self.width = width
        self.primitive = bool(primitive)
        #: Cell words per RAM word (16-bit cells side by side) and RAM words per cell word.
        self.columns = max(1, width // 16)
        self.packed = 16 // width if width < 16 else 1
        self.banks = -(-depth // (16384 * self.packed))
        if self.primitive and self.columns * self.banks > SPRAM_COUNT:
            reject(self, f"{depth} words of {width} bits need {self.columns * self.banks} SPRAMs of 16,384 x 16 "
                         f"bits; an iCE40UP5K has {SPRAM_COUNT} (at most {SPRAM_COUNT * SPRAM_BYTES} bytes)")
        super().__init__({
            "addr": In(range(depth)),
            "w_data": In(width),
            "w_en": In(1),
            "r_en": In(1),
            "r_data": Out(width),
        })

    def elaborate(self, platform):
        m = Module()
        reading = self.r_en & ~self.w_en
        raw = Signal(self.width)  # the cells' (or the model's) output, valid after a read until a write
        if self.primitive:
            self._cells(m, reading, raw)
        else:
            m.submodules.words = words = Memory(shape=self.width, depth=self.depth, init=[])
            write, read = words.write_port(), words.read_port()
            m.d.comb += [write.addr.eq(self.addr), write.data.eq(self.w_data), write.en.eq(self.w_en),
                         read.addr.eq(self.addr), read.en.eq(reading), raw.eq(read.data)]
        fresh = Signal()  # raw holds the last read's word
        held = Signal(self.width)
        with m.If(reading):
            m.d.sync += fresh.eq(1)
        with m.Elif(self.w_en):
            m.d.sync += fresh.eq(0)
        with m.If(fresh):
            m.d.sync += held.eq(raw)
        m.d.comb += self.r_data.eq(Mux(fresh, raw, held))
        return m

    def _cells(self, m, reading, raw):
        packed = self.packed
        lane_bits = (packed - 1).bit_length()
        cell_addr = Signal(14 + (self.banks - 1).bit_length())  # the cell word and the bank above it
        m.d.comb += cell_addr.eq(self.addr >> lane_bits)
        bank = cell_addr[14:] if self.banks > 1 else 0
        lane = self.addr[:lane_bits] if packed > 1 else 0
        read_bank = Signal(range(max(2, self.banks)))
        read_lane = Signal(range(max(2, packed)))
        with m.If(reading):
            m.d.sync += [read_bank.eq(bank), read_lane.eq(lane)]
        outputs = []
        for b in range(self.banks):
            selected = (self.w_en | reading) & (bank == b)
            column_outputs = []
            for c in range(self.columns):
                out = Signal(16, name=f"spram{b}_{c}_out")
                if packed > 1:
                    data_in = self.w_data.replicate(packed)
                    masks = Signal(4)
                    m.d.comb += masks.eq(((1 << (4 // packed)) - 1) << (lane * (4 // packed)))
                else:
                    data_in = self.w_data[16 * c:16 * (c + 1)]
                    masks = 0b1111
                m.submodules[f"spram{b}_{c}"] = Instance(
                    "SB_SPRAM256KA",
                    i_ADDRESS=cell_addr[:14], i_DATAIN=data_in, i_MASKWREN=masks, i_WREN=self.w_en,
                    i_CHIPSELECT=selected, i_CLOCK=ClockSignal(), i_STANDBY=0, i_SLEEP=0, i_POWEROFF=1,
                    o_DATAOUT=out)
                column_outputs.append(out)
            outputs.append(Cat(*column_outputs))
        word = Array(outputs)[read_bank] if self.banks > 1 else outputs[0]
        m.d.comb += raw.eq(word.word_select(read_lane, self.width) if packed > 1 else word[:self.width])


class SimulatedMemory(_BurstMemory):
    """Device memory for simulation, with a configurable latency and bandwidth.

    It behaves like :class:`BlockRAMMemory` (the same ports, in-order bursts) and adds the
    timing of an external memory: a request accepted in cycle ``c`` has its first word in
    cycle ``c + latency + j`` at the earliest, with ``j`` drawn uniformly from ``0..jitter``
    per request (a 32-bit LFSR seeded with ``seed``), and words leave at no more than
    ``bandwidth`` words per cycle on average. Requests queue while earlier ones are served, so
    a requester that keeps ``outstanding`` bursts in flight hides the latency.

    Parameters
    ----------
    size_bytes, port_width, burst_len, outstanding : int
        As for :class:`BlockRAMMemory`.
    latency : int
        Cycles from an accepted request to its first word, 0..1024; values below
        :data:`MIN_LATENCY` behave as :data:`MIN_LATENCY` (the request queue, the address
        register, the block-RAM read and the word register).
    jitter : int
        Largest random extra latency per request, 0..1024.
    bandwidth : Fraction, int or float
        Words per cycle, in (0, 1]; a float is rounded to a fraction with a denominator of
        at most 256.
    seed : int
        Nonzero LFSR seed, 1..2**32-1.
    external : bool
        Hold the words in the Verilog module :data:`EXTERNAL_RAM` (Verilator harness builds)
        instead of an Amaranth memory.

    Members
    -------
    read, write, written
        As for :class:`BlockRAMMemory`.
    """

    def __init__(self, *, size_bytes, port_width, burst_len=16, outstanding=2, latency=16, jitter=0, bandwidth=1,
                 seed=1, external=False):
        _check_geometry(self, size_bytes, port_width, burst_len, outstanding)
        check_int(self, "latency", latency, 0, 1024)
        check_int(self, "jitter", jitter, 0, 1024)
        check_int(self, "seed", seed, 1, (1 << 32) - 1)
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, Fraction)):
            reject(self, f"bandwidth must be a number in (0, 1], not {bandwidth!r}")
        rate = Fraction(bandwidth).limit_denominator(256)
        if not 0 < rate <= 1:
            reject(self, f"bandwidth must be a number in (0, 1] words per cycle, not {bandwidth!r}")
        super().__init__(size_bytes=size_bytes, port_width=port_width, burst_len=burst_len, outstanding=outstanding,
                         latency=max(latency, MIN_LATENCY), jitter=jitter, bandwidth=rate, seed=seed,
                         external=bool(external))

    @classmethod
    def from_config(cls, config, **overrides):
        """The memory of ``config`` (its latency); ``overrides`` set any other parameter."""
        mem = config.memory
        params = {"size_bytes": mem.size_bytes, "port_width": mem.port_width, "burst_len": mem.burst_len,
                  "outstanding": mem.outstanding, "latency": mem.latency, **overrides}
        return cls(**params)


class BurstArbiter(wiring.Component):
    """Shares one burst read port among ``clients`` requesters, lower index first.

    A request is passed through in the cycle it is offered (no added latency) when the port
    has fewer than ``outstanding`` bursts in flight; a burst that completes frees its place
    the next cycle, so no path runs from the words' handshake to the requests' (in nested
    arbiters such a path crossed every level twice). While a passed request waits for
    ``mem.req.ready`` the grant is held, so the port keeps the stream rules. A client's
    ``req.ready`` does not depend on its own ``req.valid`` (only on those ahead of it), so a
    request's handshake does not come back down through nested arbiters. Words return to the
    client whose burst they belong to, in order.

    In front of a memory that queues ``q`` requests, ``outstanding=q + 1`` keeps the memory
    as busy as its requesters can: a burst leaves the memory's queue when its last word's
    address is registered, ``MIN_LATENCY - 1`` cycles before that word is delivered, and
    stays in flight here until then; the memory's own ``req.ready`` holds a request while its
    queue is full.

    Parameters
    ----------
    clients : int
        Requesters, 1..8.
    addr_width, data_width : int
        Of the port (word address bits, word bits).
    burst_len : int
        Largest burst, 1..256.
    outstanding : int
        Bursts the port may have in flight, 1..18 (a memory queues up to 16; the device's
        arbiter keeps two more).

    Members
    -------
    clients : ``In(burst_read_signature(...)).array(clients)``
        The requesters' ports.
    mem : ``Out(burst_read_signature(...))``
        The shared port.
    in_flight : ``Out(range(outstanding + 1))``
        Bursts accepted and not yet complete.
    """

    def __init__(self, *, clients, addr_width, data_width, burst_len, outstanding):
        check_int(self, "clients", clients, 1, 8)
        check_int(self, "addr_width", addr_width, 1, 32)
        check_int(self, "data_width", data_width, 1, 4096)
        check_int(self, "burst_len", burst_len, 1, 256)
        check_int(self, "outstanding", outstanding, 1, MAX_OUTSTANDING + 2)
        self.count = clients
        self.burst_len = burst_len
        self.outstanding = outstanding
        port = burst_read_signature(addr_width=addr_width, data_width=data_width, burst_len=burst_len)
        super().__init__({
            "clients": In(port).array(clients),
            "mem": Out(port),
            "in_flight": Out(range(outstanding + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        route_layout = data.StructLayout({"client": unsigned(max(1, (self.count - 1).bit_length())),
                                          "beats": unsigned(self.burst_len.bit_length())})
        # the oldest burst's route is a register (no read multiplexer before the words' owner)
        m.submodules.routes = routes = ShiftFIFO(width=route_layout.size, depth=self.outstanding)
        route = data.View(route_layout, routes.r_data)
        beat = Signal(range(max(self.burst_len, 2)))
        done = Signal()
        owner = route.client
        delivered = self.mem.data.valid & routes.r_rdy
        m.d.comb += [
            self.in_flight.eq(routes.level),
            self.mem.data.ready.eq(Array(c.data.ready for c in self.clients)[owner]),
            done.eq(delivered & self.mem.data.ready & (beat == route.beats - 1)),
            routes.r_en.eq(done),
        ]
        for index, client in enumerate(self.clients):
            m.d.comb += [client.data.valid.eq(delivered & (owner == index)),
                         client.data.payload.eq(self.mem.data.payload)]
        with m.If(delivered & self.mem.data.ready):
            m.d.sync += beat.eq(Mux(done, 0, beat + 1))

        held = Signal()  # a passed request waits for the port; keep its grant
        held_client = Signal(route_layout.members["client"])
        room = routes.w_rdy
        grant = Signal(route_layout.members["client"])
        for index in reversed(range(self.count)):
            with m.If(self.clients[index].req.valid):
                m.d.comb += grant.eq(index)
        with m.If(held):
            m.d.comb += grant.eq(held_client)
        offered = Array(c.req.valid for c in self.clients)[grant]
        m.d.comb += [
            self.mem.req.valid.eq(held | (offered & room)),
            self.mem.req.payload.eq(Array(c.req.payload.as_value() for c in self.clients)[grant]),
        ]
        accepted = self.mem.req.valid & self.mem.req.ready
        # ready: whether the client's request would pass now (the first client's is registers)
        for index, client in enumerate(self.clients):
            first = ~Cat(c.req.valid for c in self.clients[:index]).any() if index else Const(1)
            m.d.comb += client.req.ready.eq(self.mem.req.ready & Mux(held, held_client == index, room & first))
        m.d.sync += [held.eq(self.mem.req.valid & ~self.mem.req.ready), held_client.eq(grant)]
        new_route = data.View(route_layout, routes.w_data)
        m.d.comb += [routes.w_en.eq(accepted), new_route.client.eq(grant),
                     new_route.beats.eq(self.mem.req.payload.beats)]
        return m

"""32-bit word streams to and from device memory, for the command processor.

Device memory is read and written in whole ``port_width``-bit words (8 to 512 bits); the
command processor works in 32-bit words. :class:`WordReader` turns "``words`` 32-bit words
from word address ``addr``" into burst reads and a stream of 32-bit words; :class:`WordWriter`
turns a stream of 32-bit words into whole-port-word writes. Word ``i`` of a buffer is bytes
``4i .. 4i+3`` of it (little-endian), whatever the port width: within a port word the lower
32 bits come first; a narrow port supplies a 32-bit word over several port words, lowest
bytes first. A writer pads the buffer's last port word with zeros, so buffers are whole port
words (the command addresses are 64-byte aligned; a host rounds buffer sizes up likewise).
"""

from amaranth import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .memory import BlockFIFO, burst_read_signature, check_port_width, write_layout
from .params import check_int

__all__ = ["WordReader", "WordWriter", "port_words"]



def port_words(words, port_width):
    """Port words that hold ``words`` 32-bit words."""
    return -(-words * 32 // port_width)


def transfer_layout(addr_width, count_width):
    """A transfer: the first port word's ``addr`` and the count of 32-bit ``words``."""
    return data.StructLayout({"addr": unsigned(addr_width), "words": unsigned(count_width)})


class WordReader(wiring.Component):
    """Reads ``words`` 32-bit words from device memory, one transfer at a time.

    Bursts of up to ``burst_len`` port words are requested only while the reader's buffer has
    room for every word in flight, so ``mem.data`` is always ready and the reader never holds
    the shared memory port. With ``buffer_words >= outstanding * burst_len`` and a consumer
    that takes a word per cycle, a wide port streams at one 32-bit word per cycle (requests
    are made at most every other cycle, so bursts of one port word give half that).

    Parameters
    ----------
    addr_width : int
        Bits of a port-word address.
    port_width : int
        Bits of a memory word: 8, 16, ..., 512.
    burst_len : int
        Largest burst, 1..256.
    count_width : int
        Bits of a transfer's word count.
    buffer_words : int
        Port words buffered, at least ``burst_len``.

    Members
    -------
    cmd : ``In(stream.Signature(transfer_layout(addr_width, count_width)))``
        Transfers; taken while idle. A count of 0 completes at once.
    o : ``Out(stream.Signature(32))``
        The words, in address order.
    mem : ``Out(burst_read_signature(...))``
    busy : ``Out(1)``
        A transfer is in progress (words still to deliver).
    """

    def __init__(self, *, addr_width, port_width, burst_len, count_width, buffer_words):
        self.addr_width = check_int(self, "addr_width", addr_width, 1, 32)
        self.port_width = check_port_width(self, port_width)
        self.burst_len = check_int(self, "burst_len", burst_len, 1, 256)
        self.count_width = check_int(self, "count_width", count_width, 1, 32)
        self.buffer_words = check_int(self, "buffer_words", buffer_words, burst_len, 4096)
        super().__init__({
            "cmd": In(stream.Signature(transfer_layout(addr_width, count_width))),
            "o": Out(stream.Signature(32)),
            "mem": Out(burst_read_signature(addr_width=addr_width, data_width=port_width, burst_len=burst_len)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        pw = self.port_width
        # in block RAM even when it holds a few words (iCE40: one 4-kbit RAM for 70 flip-flops)
        m.submodules.buffer = buffer = BlockFIFO(width=pw, depth=self.buffer_words, block=True)
        m.d.comb += [
            self.mem.data.ready.eq(1),
            buffer.w_en.eq(self.mem.data.valid),
            buffer.w_data.eq(self.mem.data.payload),
        ]

        # requests: port words still to request, and words requested but not yet popped. The
        # next request's size and whether the buffer has room for it are registered, a cycle
        # behind: a cycle after a request they are stale and no request is made; else only
        # pops (more room) and a command start (nothing to request yet) moved since.
        to_request = Signal(self.count_width + 1)
        next_addr = Signal(self.addr_width)
        held = Signal(range(self.buffer_words + 1))
        beats = Signal(range(self.burst_len + 1))
        fits = Signal()
        just_requested = Signal()
        next_beats = Mux(to_request < self.burst_len, to_request, self.burst_len)
        m.d.sync += [beats.eq(next_beats), fits.eq((to_request != 0) & (held + next_beats <= self.buffer_words))]
        m.d.comb += [
            self.mem.req.valid.eq(fits & ~just_requested),
            self.mem.req.payload.addr.eq(next_addr),
            self.mem.req.payload.beats.eq(beats),
        ]
        requested = self.mem.req.valid & self.mem.req.ready
        m.d.sync += just_requested.eq(requested)
        popped = buffer.r_en & buffer.r_rdy
        m.d.sync += held.eq(held + Mux(requested, beats, 0) - popped)

        # delivery: words still to deliver; lane of the current port word (wide ports) or
        # port words gathered so far (narrow ports)
        to_deliver = Signal(self.count_width)
        m.d.comb += self.busy.eq(to_deliver != 0)
        m.d.comb += self.cmd.ready.eq(~self.busy & (to_request == 0))
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                to_deliver.eq(self.cmd.payload.words),
                to_request.eq(port_words(1, pw) * self.cmd.payload.words if pw < 32
                              else (self.cmd.payload.words + (pw // 32 - 1)) >> (pw // 32).bit_length() - 1),
                next_addr.eq(self.cmd.payload.addr),
            ]
        with m.Elif(requested):
            m.d.sync += [to_request.eq(to_request - beats), next_addr.eq(next_addr + beats)]

        delivered = self.o.valid & self.o.ready
        with m.If(delivered):
            m.d.sync += to_deliver.eq(to_deliver - 1)
        if pw >= 32:
            ratio = pw // 32
            lane = Signal(range(max(ratio, 2)))
            m.d.comb += [
                self.o.valid.eq(buffer.r_rdy & self.busy),
                self.o.payload.eq(buffer.r_data.word_select(lane, 32) if ratio > 1 else buffer.r_data),
                buffer.r_en.eq(delivered & ((lane == ratio - 1) | (to_deliver == 1))),
            ]
            if ratio > 1:
                with m.If(delivered):
                    m.d.sync += lane.eq(Mux((lane == ratio - 1) | (to_deliver == 1), 0, lane + 1))
        else:
            ratio = 32 // pw
            gathered = Signal(range(ratio + 1))
            word = Signal(32)
            m.d.comb += [
                self.o.valid.eq(gathered == ratio),
                self.o.payload.eq(word),
                buffer.r_en.eq(gathered != ratio),
            ]
            with m.If(popped):
                m.d.sync += [word.eq(Cat(word[pw:], buffer.r_data)), gathered.eq(gathered + 1)]
            with m.Elif(delivered):
                m.d.sync += gathered.eq(0)
        return m


class WordWriter(wiring.Component):
    """Writes a stream of 32-bit words into device memory as whole port words.

    A transfer (``cmd``: first port-word address and word count) takes exactly ``words``
    words from ``i``; the last port word is zero-padded. Wide ports gather ``port_width/32``
    words per write; narrow ports write ``32/port_width`` port words per 32-bit word. One
    32-bit word per cycle when the memory takes a write per cycle.

    Members
    -------
    cmd : ``In(stream.Signature(transfer_layout(addr_width, count_width)))``
    i : ``In(stream.Signature(32))``
    write : ``Out(stream.Signature(write_layout(addr_width, port_width)))``
    busy : ``Out(1)``
        A transfer has words left to take or a port word left to write.
    """

    def __init__(self, *, addr_width, port_width, count_width):
        self.addr_width = check_int(self, "addr_width", addr_width, 1, 32)
        self.port_width = check_port_width(self, port_width)
        self.count_width = check_int(self, "count_width", count_width, 1, 32)
        super().__init__({
            "cmd": In(stream.Signature(transfer_layout(addr_width, count_width))),
            "i": In(stream.Signature(32)),
            "write": Out(stream.Signature(write_layout(addr_width, port_width))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        pw = self.port_width
        to_take = Signal(self.count_width)
        addr = Signal(self.addr_width)
        pending = Signal()  # a port word waits for the memory
        m.d.comb += [
            self.busy.eq((to_take != 0) | pending),
            self.cmd.ready.eq(~self.busy),
            self.write.valid.eq(pending),
            self.write.payload.addr.eq(addr),
        ]
        written = self.write.valid & self.write.ready
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [to_take.eq(self.cmd.payload.words), addr.eq(self.cmd.payload.addr)]
        with m.If(written):
            m.d.sync += [pending.eq(0), addr.eq(addr + 1)]
        taken = self.i.valid & self.i.ready
        with m.If(taken):
            m.d.sync += to_take.eq(to_take - 1)

        if pw >= 32:
            ratio = pw // 32
            lane = Signal(range(max(ratio, 2)))
            gathered = Signal(pw)
            m.d.comb += [
                self.i.ready.eq((to_take != 0) & ~pending),
                self.write.payload.data.eq(gathered),
            ]
            with m.If(taken):
                placed = Signal(pw)
                if ratio > 1:
                    m.d.comb += placed.eq(gathered | (self.i.payload << (lane * 32)))
                else:
                    m.d.comb += placed.eq(self.i.payload)
                m.d.sync += gathered.eq(placed)
                complete = (lane == ratio - 1) | (to_take == 1)
                with m.If(complete):
                    m.d.sync += [pending.eq(1), lane.eq(0)]
                if ratio > 1:
                    with m.Else():
                        m.d.sync += lane.eq(lane + 1)
            with m.If(written):
                m.d.sync += gathered.eq(0)
        else:
            ratio = 32 // pw
            word = Signal(32)
            left = Signal(range(ratio + 1))  # port words of `word` still to write
            m.d.comb += [
                self.i.ready.eq((to_take != 0) & (left == 0) & ~pending),
                self.write.payload.data.eq(word[:pw]),
            ]
            with m.If(taken):
                m.d.sync += [word.eq(self.i.payload), left.eq(ratio - 1), pending.eq(1)]
            with m.Elif(written & (left != 0)):
                m.d.sync += [word.eq(word >> pw), left.eq(left - 1), pending.eq(1)]
        return m

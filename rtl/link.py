"""LinkEndpoint: the device side of the framed CRC-32 host link (:mod:`moegen.golden.link`).

The endpoint gives, for the same request bytes, the same response bytes as
:class:`~moegen.golden.link.LinkModel` with ``mem_word`` the memory port's bytes and
``csr_mapped`` the CSR bus's ``mapped``, and the same ``frames``/``dropped`` counts; a frame
that stops arriving for ``idle_timeout`` cycles is dropped as the model's ``timeout()`` does.

How a request runs, one state after another (the endpoint takes no new byte until the
response's last byte has left):

1. **Receive**: bytes are parsed one per cycle with a running CRC-32; a write's payload goes
   into a block RAM of ``max_payload`` bytes. A header announcing an oversize payload is
   dropped with its sync byte and its other nine bytes are parsed again (the header register
   serves as their pushback buffer), as the model rescans them. After the last CRC byte one
   cycle checks the CRC residue; a bad frame is dropped with nothing executed.
2. **Decide** (one cycle): a retry of a write (same nonzero sequence number and opcode as the
   last executed request) replays the remembered status; otherwise every check of the
   model's order that needs no bus (opcode, lengths, alignment, memory range, command queue
   room), each computed in the cycle of the CRC check and registered.
3. **CSR range check** (CSR requests only, two cycles per word): every word must be mapped,
   else ``BAD_ADDRESS`` with nothing read or written.
4. **Write** (OK writes only): the buffered payload goes out one item per cycle (a memory
   word, a CSR word or a command word), plus one cycle of buffer read latency.
5. **Respond**: six header bytes, the payload and four CRC bytes, one byte per cycle when
   ``tx`` is ready. Reads are fetched while the header goes out: CSR words one per cycle,
   memory words in bursts of up to ``burst_len`` words into a FIFO of two bursts.
"""

from amaranth import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import crc, data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..golden.link import CRC_BYTES, REQUEST_HEADER, RESPONSE_HEADER, SYNC_REQUEST, SYNC_RESPONSE, Opcode, Status
from .memory import (
    BlockFIFO,
    burst_read_signature,
    check_port_width,
    unchecked_ram,
    word_addr_width,
    write_layout,
)
from .params import check_int, reject
from .regmap import csr_bus_signature

__all__ = ["QUEUE_WORDS", "LinkEndpoint", "request_header_layout"]

#: Command FIFO depth in words that :meth:`LinkEndpoint.from_config` assumes: eight 8-word commands.
QUEUE_WORDS = 64


def request_header_layout():
    """The nine request header bytes after the sync byte, as they arrive (little-endian)."""
    return data.StructLayout({"seq": unsigned(8), "opcode": unsigned(8), "reserved": unsigned(8),
                              "address": unsigned(32), "length": unsigned(16)})


class LinkEndpoint(wiring.Component):
    """The device end of the host link: request frames in, response frames out, executed on
    the CSR bus, the device memory and the command queue.

    Throughput: one byte per cycle on ``rx`` while a frame arrives and on ``tx`` while a
    response leaves (``READ_MEM`` payloads keep that pace when the memory returns a burst
    within ``burst_len * port_width / 8`` cycles of its request).

    Latency: the first response byte is offered in the third cycle after the one that took
    the request's last byte (CRC check, decision), plus two cycles per word of a CSR access
    (range check) and ``items + 1`` cycles for a write (``items`` memory, CSR or command
    words, when their sink is ready); a ``READ_MEM`` payload is fetched from the second
    header byte on, so its first byte waits for the memory's read latency beyond five.
    ``rx`` is not ready from the request's last byte until its response's last byte is
    taken, nor for the nine cycles
    that re-parse a refused oversize header; inside a frame it is always ready, so a frame
    is dropped (and counted in ``dropped``) after exactly ``idle_timeout`` consecutive cycles
    in which the host offered no byte.

    Parameters
    ----------
    max_payload : int
        Largest payload in bytes, 4..65535, a multiple of ``max(4, port_width // 8)``; the
        payload buffer holds this much.
    idle_timeout : int
        Cycles of silence inside a frame before it is dropped, 1..2**30.
    mem_bytes : int
        Device memory size, a multiple of the port's bytes.
    port_width : int
        Memory word in bits: 8, 16, ..., 512. Memory accesses are whole words.
    burst_len : int
        Largest read burst in words, 1..256.
    queue_words : int
        Depth of the command FIFO behind ``submit`` in words, 1..65535.

    Members
    -------
    rx : ``In(stream.Signature(8))``
        Request bytes.
    tx : ``Out(stream.Signature(8))``
        Response bytes.
    csr : ``Out(csr_bus_signature())``
        The register file.
    mem_read : ``Out(burst_read_signature(...))``
        Device-memory reads (at most two bursts in flight, one request at a time).
    mem_write : ``Out(stream.Signature(write_layout(...)))``
        Device-memory word writes.
    submit : ``Out(stream.Signature(32))``
        Command words of ``SUBMIT`` requests, in payload order.
    submit_space : ``In(range(queue_words + 1))``
        Free words in the command FIFO; a ``SUBMIT`` of more words answers ``QUEUE_FULL``.
    receiving : ``Out(1)``
        A request frame is partly received (or being checked, or its bytes re-parsed).
    busy : ``Out(1)``
        A request is being decided or executed, or its response is being sent.
    frames : ``Out(32)``
        Request frames with a good CRC (each answered: executed or replayed); wraps.
    dropped : ``Out(32)``
        Request frames dropped for a bad CRC, an oversize header or the idle timeout; wraps.
    """

    def __init__(self, *, max_payload, idle_timeout, mem_bytes, port_width, burst_len, queue_words):
        check_port_width(self, port_width)
        self.port_bytes = port_width // 8
        self.buffer_bytes = max(4, self.port_bytes)  # payload buffer word: a CSR word or a memory word
        check_int(self, "max_payload", max_payload, 4, 65535)
        if max_payload % self.buffer_bytes:
            reject(self, f"max_payload must be a multiple of {self.buffer_bytes} bytes, not {max_payload}")
        check_int(self, "idle_timeout", idle_timeout, 1, 1 << 30)
        check_int(self, "mem_bytes", mem_bytes, self.port_bytes, 1 << 32)
        if mem_bytes % self.port_bytes:
            reject(self, f"mem_bytes must be a multiple of the port's {self.port_bytes} bytes, not {mem_bytes}")
        check_int(self, "burst_len", burst_len, 1, 256)
        check_int(self, "queue_words", queue_words, 1, 65535)
        self.max_payload = max_payload
        self.idle_timeout = idle_timeout
        self.mem_bytes = mem_bytes
        self.port_width = port_width
        self.burst_len = burst_len
        self.queue_words = queue_words
        self.addr_width = word_addr_width(mem_bytes, port_width)
        #: Words per read request, and the read FIFO's depth (two requests).
        self.fetch_beats = min(burst_len, max_payload // self.port_bytes)
        self.fifo_depth = 2 * self.fetch_beats
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "csr": Out(csr_bus_signature()),
            "mem_read": Out(burst_read_signature(addr_width=self.addr_width, data_width=port_width,
                                                 burst_len=burst_len)),
            "mem_write": Out(stream.Signature(write_layout(self.addr_width, port_width))),
            "submit": Out(stream.Signature(32)),
            "submit_space": In(range(queue_words + 1)),
            "receiving": Out(1),
            "busy": Out(1),
            "frames": Out(32),
            "dropped": Out(32),
        })

    @classmethod
    def from_config(cls, config, **overrides):
        """The endpoint of ``config`` (link and memory sections, :data:`QUEUE_WORDS`);
        ``overrides`` set any parameter."""
        params = {"max_payload": config.link.max_payload, "idle_timeout": config.link.idle_timeout,
                  "mem_bytes": config.memory.size_bytes, "port_width": config.memory.port_width,
                  "burst_len": config.memory.burst_len, "queue_words": QUEUE_WORDS, **overrides}
        return cls(**params)

    def elaborate(self, platform):
        m = Module()
        P, B = self.port_bytes, self.buffer_bytes
        port_shift = (P - 1).bit_length()
        items_max = self.max_payload // min(P, 4)

        # ---- byte input: an oversize header's own bytes (``pushed`` of them) before rx. The
        # header register is their pushback buffer: it shifts in every byte the parser takes
        # outside a frame too, so while its bytes are parsed again it rotates, and a header
        # found among them fills it with its last nine bytes as any header does.
        header_bits = Signal(8 * (REQUEST_HEADER.size - 1))
        pushed = Signal(range(REQUEST_HEADER.size))
        accepting = Signal()  # the parser takes a byte this cycle if one is offered
        byte = Signal(8)
        offered = Signal()
        take = Signal()
        m.d.comb += [
            byte.eq(Mux(pushed != 0, header_bits[:8], self.rx.payload)),
            offered.eq((pushed != 0) | self.rx.valid),
            self.rx.ready.eq(accepting & (pushed == 0)),
            take.eq(accepting & offered),
        ]
        with m.If(take & (pushed != 0)):
            m.d.sync += pushed.eq(pushed - 1)

        # one CRC-32 for both directions: a request is received whole before its response starts
        m.submodules.crc = frame_crc = crc.catalog.CRC32_ISO_HDLC(8).create()
        sending = Signal()  # the response's bytes feed the CRC
        m.d.comb += frame_crc.data.eq(Mux(sending, self.tx.payload, byte))

        header = data.View(request_header_layout(), header_bits)
        incoming_bits = Cat(header_bits[8:], byte)  # the header with this cycle's byte shifted in
        incoming = data.View(request_header_layout(), incoming_bits)
        count = Signal(range(max(self.max_payload, REQUEST_HEADER.size)))  # bytes of this section so far

        def last_index(nbytes):
            """``nbytes - 1`` at ``count``'s width, for a section of 1..max_payload bytes."""
            return (nbytes[:len(count)] - 1)[:len(count)]

        # the last byte index of a payload (the request's or the response's, both of the header's
        # length), kept beside the header as it shifts in: no subtraction before a comparison
        length_last = Signal.like(count)

        # the payload: written while a frame arrives, read while it is executed
        buffer_write, buffer_read = unchecked_ram(m, "buffer", shape=8 * B, depth=self.max_payload // B, granularity=8)
        m.d.comb += [
            buffer_write.addr.eq(count >> (B - 1).bit_length()),
            buffer_write.data.eq(Cat(byte for _ in range(B))),
        ]

        def writes(opcode):
            return opcode.matches(Opcode.WRITE_CSR, Opcode.WRITE_MEM, Opcode.SUBMIT)

        idle = Signal(range(max(2, self.idle_timeout)))
        mid_frame = Signal()
        with m.If(mid_frame & ~take):
            m.d.sync += idle.eq(idle + 1)
        with m.Else():
            m.d.sync += idle.eq(0)
        timed_out = mid_frame & ~take & (idle == self.idle_timeout - 1)

        # ---- the request being executed
        seq, opcode, address, length = header.seq, header.opcode, header.address, header.length
        is_csr = opcode.matches(Opcode.READ_CSR, Opcode.WRITE_CSR)
        is_mem = opcode.matches(Opcode.READ_MEM, Opcode.WRITE_MEM)
        is_submit = opcode == Opcode.SUBMIT
        status = Signal(8)
        replay = Signal()
        items = Signal(range(items_max + 1))  # CSR, memory or command words of the request
        csr_base = address[2:]
        mem_base = address[port_shift:]
        last = Signal(data.StructLayout({"valid": 1, "seq": 8, "opcode": 8, "status": 8}))

        # The checks in the model's order: past the BAD_LENGTH of an oversize request the
        # length is at most max_payload, and the later checks compare only its low bits (a
        # memory range check adds them to the address's low bits, which reach the size).
        # Registered, for DECIDE: the header is whole in CHECK, the cycle before, and the
        # queue's free space shrinks only by this endpoint's own submits (a command the
        # processor takes in that cycle frees its room for the next request).
        verdict = Signal(8)
        decided = Signal(8)
        word_length_bad = (length[:2] != 0) | (length == 0)
        short_length = length[:self.max_payload.bit_length()]
        mem_bits = self.mem_bytes.bit_length()
        beyond_memory = address[mem_bits:].any() | (address[:mem_bits] + short_length > self.mem_bytes)
        with m.If(opcode > max(Opcode)):
            m.d.comb += verdict.eq(Status.BAD_OPCODE)
        with m.Elif(length > self.max_payload):
            m.d.comb += verdict.eq(Status.BAD_LENGTH)
        with m.Elif((is_csr | is_submit) & word_length_bad):
            m.d.comb += verdict.eq(Status.BAD_LENGTH)
        with m.Elif(is_csr & (address[:2] != 0)):
            m.d.comb += verdict.eq(Status.BAD_ADDRESS)
        with m.Elif(is_mem & (length[:port_shift] != 0 if port_shift else 0)):
            m.d.comb += verdict.eq(Status.BAD_LENGTH)
        with m.Elif(is_mem & ((address[:port_shift] != 0 if port_shift else 0)
                              | beyond_memory)):
            m.d.comb += verdict.eq(Status.BAD_ADDRESS)
        with m.Elif(is_submit & (short_length[2:] > self.submit_space)):
            m.d.comb += verdict.eq(Status.QUEUE_FULL)
        with m.Else():
            m.d.comb += verdict.eq(Status.OK)
        m.d.sync += decided.eq(verdict)

        def remember(final_status):
            m.d.sync += [status.eq(final_status), last.valid.eq(seq != 0), last.seq.eq(seq),
                         last.opcode.eq(opcode), last.status.eq(final_status)]

        # ---- CSR bus: the word is the range check's, the write pipeline's or the read engine's
        item = Signal(range(items_max + 1))  # range check and write pipeline: the next item
        fetched = Signal(range(items_max + 1))  # reads: items requested
        csr_index = Signal(range(items_max + 1))
        # the word's CSR address: the base's low bits plus the index, in range without a carry
        # out of them and with the base's high bits zero
        csr_bits = len(self.csr.addr)
        csr_word = Signal(max(csr_bits, len(csr_index)) + 1)
        m.d.comb += [csr_word.eq(csr_base[:csr_bits] + csr_index), self.csr.addr.eq(csr_word)]
        csr_in_range = ~csr_word[csr_bits:].any() & ~csr_base[csr_bits:].any()
        csr_decoded = Signal()  # CSR_CHECK: csr_ok holds the check of word ``item``
        csr_ok = Signal()

        # ---- write pipeline: buffer word read (one cycle), then the item to its sink
        stage_valid = Signal()
        stage_item = Signal(range(items_max + 1))
        sink_ready = Mux(is_mem, self.mem_write.ready, Mux(is_submit, self.submit.ready, 1))
        advance = ~stage_valid | sink_ready
        mem_items_shift, word_items_shift = (B // P - 1).bit_length(), (B // 4 - 1).bit_length()
        m.d.comb += buffer_read.addr.eq(Mux(is_mem, item >> mem_items_shift, item >> word_items_shift))
        mem_lane = stage_item[:mem_items_shift] if B > P else 0
        word_lane = stage_item[:word_items_shift] if B > 4 else 0
        mem_item = buffer_read.data.word_select(mem_lane, 8 * P) if B > P else buffer_read.data
        word_item = buffer_read.data.word_select(word_lane, 32) if B > 4 else buffer_read.data
        m.d.comb += [
            self.mem_write.payload.addr.eq(mem_base + stage_item),
            self.mem_write.payload.data.eq(mem_item),
            self.csr.w_data.eq(word_item),
            self.submit.payload.eq(word_item),
        ]

        # ---- read engine: CSR words or memory bursts into a FIFO that the response drains
        fifo_width = max(32, self.port_width)
        m.submodules.fifo = fifo = BlockFIFO(width=fifo_width, depth=self.fifo_depth)
        reserved = Signal(range(self.fifo_depth + 1))  # words requested and not yet sent
        fetching = Signal()  # in a response whose payload is read
        request_valid = Signal()
        request = self.mem_read.req.payload
        beats = Signal(range(self.fetch_beats + 1))
        # whether the FIFO has room for the next burst, a cycle late: in that cycle words only
        # leave it (a burst's request_valid holds the next issue for a cycle), and ``beats``
        # only falls as ``fetched`` grows (with nothing reserved there is room for any burst)
        room = Signal()
        m.d.sync += room.eq(reserved <= self.fifo_depth - beats)
        issue_csr = fetching & is_csr & (fetched < items) & (reserved < self.fifo_depth)
        issue_mem = fetching & is_mem & ~request_valid & (fetched < items) & room
        csr_returning = Signal()
        pop = Signal()
        # the next burst's beats, a cycle behind ``items`` and ``fetched``: the fetch starts
        # after the response header's first byte (DECIDE set both before), and ``fetched``
        # moves by a burst only when one is issued, the next issue waiting at least a cycle for
        # request_valid to fall
        m.d.sync += beats.eq(Mux(items - fetched < self.fetch_beats, items - fetched, self.fetch_beats))
        m.d.comb += [
            self.csr.r_stb.eq(issue_csr),
            self.mem_read.req.valid.eq(request_valid),
            self.mem_read.data.ready.eq(1),
            fifo.w_en.eq(csr_returning | self.mem_read.data.valid),
            fifo.w_data.eq(Mux(csr_returning, self.csr.r_data, self.mem_read.data.payload)),
            fifo.r_en.eq(pop),
        ]
        m.d.sync += csr_returning.eq(issue_csr)
        with m.If(issue_csr):
            m.d.sync += fetched.eq(fetched + 1)
        with m.If(issue_mem):
            m.d.sync += [fetched.eq(fetched + beats), request_valid.eq(1), request.addr.eq(mem_base + fetched),
                         request.beats.eq(beats)]
        with m.Elif(self.mem_read.req.ready):
            m.d.sync += request_valid.eq(0)
        m.d.sync += reserved.eq(reserved + Mux(issue_csr, 1, 0) + Mux(issue_mem, beats, 0) - pop)

        # ---- response bytes
        # a register: replay and status are set before SEND_HEADER, whose first byte (the sync
        # byte, and no fetch yet) is the only one sent before it follows them
        reads = Signal()
        m.d.sync += reads.eq(~replay & (status == Status.OK) & opcode.matches(Opcode.READ_CSR, Opcode.READ_MEM))
        response_length = Mux(reads, length, 0)
        response_header = Cat(Const(SYNC_RESPONSE, 8), seq, opcode, status, response_length)
        assert len(response_header) == 8 * RESPONSE_HEADER.size
        entry_byte = Signal(range(max(4, P)))
        entry_last = Mux(is_csr, 3, P - 1)
        sent = Signal()
        m.d.comb += sent.eq(self.tx.valid & self.tx.ready)

        with m.FSM() as fsm:
            with m.State("HUNT"):
                m.d.comb += [accepting.eq(1), frame_crc.start.eq(take & (byte == SYNC_REQUEST))]
                with m.If(take):
                    m.d.sync += [header_bits.eq(incoming_bits), length_last.eq(last_index(incoming.length))]
                with m.If(take & (byte == SYNC_REQUEST)):
                    m.d.sync += count.eq(0)
                    m.next = "HEADER"

            with m.State("HEADER"):
                m.d.comb += [accepting.eq(1), mid_frame.eq(1), frame_crc.valid.eq(take)]
                payload_length = Mux(writes(incoming.opcode), incoming.length, 0)
                with m.If(timed_out):
                    m.d.sync += self.dropped.eq(self.dropped + 1)
                    m.next = "HUNT"
                with m.Elif(take):
                    m.d.sync += [header_bits.eq(incoming_bits), length_last.eq(last_index(incoming.length)),
                                 count.eq(count + 1)]
                    with m.If(count == REQUEST_HEADER.size - 2):
                        m.d.sync += count.eq(0)
                        with m.If(payload_length > self.max_payload):
                            m.d.sync += [self.dropped.eq(self.dropped + 1), pushed.eq(REQUEST_HEADER.size - 1)]
                            m.next = "HUNT"
                        with m.Elif(payload_length != 0):
                            m.next = "PAYLOAD"
                        with m.Else():
                            m.next = "TRAILER"

            with m.State("PAYLOAD"):
                m.d.comb += [accepting.eq(1), mid_frame.eq(1), frame_crc.valid.eq(take),
                             buffer_write.en.eq(Mux(take, 1 << count[:(B - 1).bit_length()], 0))]
                with m.If(timed_out):
                    m.d.sync += self.dropped.eq(self.dropped + 1)
                    m.next = "HUNT"
                with m.Elif(take):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == length_last):
                        m.d.sync += count.eq(0)
                        m.next = "TRAILER"

            with m.State("TRAILER"):
                m.d.comb += [accepting.eq(1), mid_frame.eq(1), frame_crc.valid.eq(take)]
                with m.If(timed_out):
                    m.d.sync += self.dropped.eq(self.dropped + 1)
                    m.next = "HUNT"
                with m.Elif(take):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == CRC_BYTES - 1):
                        m.next = "CHECK"

            with m.State("CHECK"):
                with m.If(frame_crc.match_detected):
                    m.d.sync += self.frames.eq(self.frames + 1)
                    m.next = "DECIDE"
                with m.Else():
                    m.d.sync += self.dropped.eq(self.dropped + 1)
                    m.next = "HUNT"

            with m.State("DECIDE"):
                retry = last.valid & (last.seq == seq) & (last.opcode == opcode) & writes(opcode)
                m.d.sync += [replay.eq(retry), items.eq(Mux(is_mem, length >> port_shift, length[2:])),
                             item.eq(0), fetched.eq(0), count.eq(0), entry_byte.eq(0), csr_decoded.eq(0)]
                with m.If(retry):
                    m.d.sync += status.eq(last.status)
                    m.next = "SEND_HEADER"
                with m.Elif(is_csr & (decided == Status.OK)):
                    m.next = "CSR_CHECK"
                with m.Else():
                    remember(decided)
                    with m.If((decided == Status.OK) & writes(opcode)):
                        m.next = "WRITE"
                    with m.Else():
                        m.next = "SEND_HEADER"

            with m.State("CSR_CHECK"):
                # two cycles a word: its address decoded into a register, then the verdict
                m.d.comb += csr_index.eq(item)
                m.d.sync += [csr_ok.eq(self.csr.mapped & csr_in_range), csr_decoded.eq(~csr_decoded)]
                with m.If(csr_decoded & ~csr_ok):
                    remember(Status.BAD_ADDRESS)
                    m.next = "SEND_HEADER"
                with m.Elif(csr_decoded & (item == items - 1)):
                    remember(Status.OK)
                    m.d.sync += item.eq(0)
                    with m.If(opcode == Opcode.WRITE_CSR):
                        m.next = "WRITE"
                    with m.Else():
                        m.next = "SEND_HEADER"
                with m.Elif(csr_decoded):
                    m.d.sync += item.eq(item + 1)

            with m.State("WRITE"):
                m.d.comb += [
                    csr_index.eq(stage_item),
                    buffer_read.en.eq(advance),
                    self.mem_write.valid.eq(stage_valid & is_mem),
                    self.csr.w_stb.eq(stage_valid & is_csr),
                    self.submit.valid.eq(stage_valid & is_submit),
                ]
                with m.If(advance):
                    m.d.sync += [stage_valid.eq(item < items), stage_item.eq(item)]
                    with m.If(item < items):
                        m.d.sync += item.eq(item + 1)
                    with m.Else():
                        m.next = "SEND_HEADER"

            with m.State("SEND_HEADER"):
                m.d.comb += [
                    self.tx.valid.eq(1),
                    self.tx.payload.eq(response_header.word_select(count[:3], 8)),
                    fetching.eq(reads & (count != 0)),
                    csr_index.eq(fetched),
                    sending.eq(1),
                    frame_crc.start.eq(sent & (count == 0)),
                    frame_crc.valid.eq(sent & (count != 0)),
                ]
                with m.If(sent):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == RESPONSE_HEADER.size - 1):
                        m.d.sync += count.eq(0)
                        with m.If(response_length != 0):
                            m.next = "SEND_PAYLOAD"
                        with m.Else():
                            m.next = "SEND_CRC"

            with m.State("SEND_PAYLOAD"):
                m.d.comb += [
                    self.tx.valid.eq(fifo.r_rdy),
                    self.tx.payload.eq(fifo.r_data.word_select(entry_byte, 8)),
                    fetching.eq(1),
                    csr_index.eq(fetched),
                    sending.eq(1),
                    frame_crc.valid.eq(sent),
                    pop.eq(sent & (entry_byte == entry_last)),
                ]
                with m.If(sent):
                    m.d.sync += [count.eq(count + 1), entry_byte.eq(Mux(entry_byte == entry_last, 0, entry_byte + 1))]
                    with m.If(count == length_last):  # a response with a payload: its length is the request's
                        m.d.sync += count.eq(0)
                        m.next = "SEND_CRC"

            with m.State("SEND_CRC"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(frame_crc.crc.word_select(count[:2], 8))]
                with m.If(sent):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == CRC_BYTES - 1):
                        m.next = "HUNT"

        receive_states = ("HEADER", "PAYLOAD", "TRAILER", "CHECK")
        m.d.comb += [
            self.receiving.eq((pushed != 0) | Cat(fsm.ongoing(s) for s in receive_states).any()),
            self.busy.eq(~fsm.ongoing("HUNT") & ~Cat(fsm.ongoing(s) for s in receive_states).any()),
        ]
        return m

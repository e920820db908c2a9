"""ExpertLoader: expert images from device memory to the expert engine's params and weights streams.

The loader runs commands (load and run the image at an address, for an expected expert and a
token count) in order, and for each produces either exactly the golden streams
(:func:`~moegen.golden.expert.param_words`, then
:func:`~moegen.golden.expert.weight_stream`) and an ``OK`` completion, or no output at all
and a completion with an :class:`~moegen.golden.image.ImageErrorCode`.

How a command runs (``docs/decisions.md``, "Expert loader"):

1. The 64-byte header is read and checked in golden's order (header in range, magic,
   version, header CRC-32, config hash, expert id, shapes and section offsets against the
   config, image in range).
2. **Verify pass**: unless the image is *verified* (see below), the whole payload is read
   once and its CRC-32 computed as it streams; nothing is stored and nothing is emitted. A
   mismatch completes the command with ``BAD_PAYLOAD_CRC``. A weight of a corrupt image can
   therefore never reach the engine, although the CRC covers the whole payload and the
   parameters the engine needs first lie at its end.
3. **Stream pass**: the params and activation-table words are read into a params FIFO, then
   the weight tiles in engine order into the banks; the emitter sends the params words, then
   replays each tile from its bank once per token tile (``ceil(tokens / rows)``).

A verified image is one whose payload passed step 2 at the same address and whose bytes have
not been written since: the loader keeps ``verified_images`` such addresses and forgets every
one whose image a device-memory write (``written``) touches. A verified image runs in one pass
(header and stream), so a decode loop that reruns resident experts reads each byte once.

Structure: :class:`ImageChecker` (steps 1 and 2) hands checked commands to
:class:`TileStreamer` (step 3); a :class:`~moegen.rtl.memory.BurstArbiter` shares the memory
port, the streamer's reads first. Double buffering: the banks form a ring. Tiles are packed
into a bank in engine order until the next one does not fit (or the image ends); the bank is
then *full*, the emitter reads it while the next banks fill, and frees it when its tiles are
replayed. A bank is written only while it is *filling* and read only while it is *full*.
Both stages run ahead of the emitter: the next command's header, verify pass, params and
first banks load while the current expert's tiles are still being consumed.
"""

import struct

from amaranth import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import crc, data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..golden.formats import HEADER_SIZE, IMAGE_ALIGN, ImageLayout
from ..golden.image import MAGIC, VERSION, ImageErrorCode
from .memory import (
    MAX_OUTSTANDING,
    PORT_WIDTHS,
    BlockFIFO,
    BurstArbiter,
    ShiftFIFO,
    burst_read_signature,
    unchecked_ram,
    word_addr_width,
    written_signature,
)
from .params import reject

__all__ = [
    "STATUS_LAYOUT",
    "BankState",
    "ExpertLoader",
    "ImageChecker",
    "LoaderGeometry",
    "TileStreamer",
    "checked_layout",
    "command_layout",
    "done_layout",
    "loader_parameters",
]

CODE_WIDTH = 4
EXPERT_WIDTH = 16
TOKENS_WIDTH = 16
# header byte offsets of the expert id and of the payload CRC-32 (the fields every accepted
# image has: LoaderGeometry.header_constants)
_EXPERT_AT = 12
_PAYLOAD_CRC_AT = 56
#: Performance and error counters (``status``); cycle and byte counters wrap at 2**48.
STATUS_LAYOUT = data.StructLayout({
    "load_cycles": unsigned(48),
    "stall_cycles": unsigned(48),
    "bytes_loaded": unsigned(48),
    "header_errors": unsigned(32),
    "crc_errors": unsigned(32),
    "verify_passes": unsigned(32),
    "last_error": unsigned(CODE_WIDTH),
})


class BankState:
    """Values of a bank's state (:attr:`TileStreamer.probes`)."""

    FREE = 0
    FILLING = 1
    FULL = 2


def command_layout(addr_width):
    """A command: the image's byte ``addr`` (a multiple of 64; the low six bits are ignored),
    the ``expert`` id its header must carry, and the ``tokens`` of the run."""
    return data.StructLayout({
        "addr": unsigned(addr_width),
        "expert": unsigned(EXPERT_WIDTH),
        "tokens": unsigned(TOKENS_WIDTH),
    })


def checked_layout(addr_width, tokens_width=TOKENS_WIDTH):
    """A checked command, from :class:`ImageChecker` to :class:`TileStreamer`: ``code`` (0:
    the image runs), the image's 64-byte ``block`` address, ``expert`` and ``tokens`` (the
    low ``tokens_width`` bits the loader keeps: :attr:`LoaderGeometry.tokens_width`)."""
    return data.StructLayout({
        "code": unsigned(CODE_WIDTH),
        "block": unsigned(addr_width - 6),
        "expert": unsigned(EXPERT_WIDTH),
        "tokens": unsigned(tokens_width),
    })


def done_layout():
    """A completion: the command's ``expert`` and ``code`` (0 when it ran, else an
    :class:`~moegen.golden.image.ImageErrorCode`)."""
    return data.StructLayout({"expert": unsigned(EXPERT_WIDTH), "code": unsigned(CODE_WIDTH)})


def _ceil(a, b):
    return -(-a // b)


def loader_parameters(config, **overrides):
    """The :class:`ExpertLoader` parameters of ``config``; ``overrides`` replace any of them."""
    lay = config.image_layout
    return {
        "layout": lay, "device_hash": config.device_hash, "rows": config.array.rows,
        "banks": config.loader.banks, "bank_bytes": config.loader.bank_bytes,
        "port_width": config.memory.port_width, "burst_len": config.memory.burst_len,
        "outstanding": config.memory.outstanding, "size_bytes": config.memory.size_bytes,
        "max_tokens": config.model.max_tokens,
        # every image the memory can hold, up to the table's 64 entries
        "verified_images": min(64, max(1, config.memory.size_bytes // lay.nbytes)),
        **overrides,
    }


class LoaderGeometry:
    """What an :class:`ExpertLoader`'s parameters imply: bank words, tile sizes, bytes per
    pass. Plain Python (no hardware), for the component, its testbench and its benchmark.

    Parameters are those of :class:`ExpertLoader`; a bad one raises ``ValueError`` naming it.
    """

    def __init__(self, *, layout, device_hash, rows, banks=2, bank_bytes=8192, port_width=64, burst_len=16,
                 outstanding=2, size_bytes=1 << 20, max_tokens=(1 << TOKENS_WIDTH) - 1, verified_images=4):
        if not isinstance(layout, ImageLayout):
            raise ValueError(f"layout must be an ImageLayout, not {layout!r}")
        self.layout = layout
        self.device_hash = _checked("device_hash", device_hash, 0, (1 << 32) - 1)
        self.rows = _checked("rows", rows, 1, 64)
        self.banks = _checked("banks", banks, 2, 8)
        self.bank_bytes = _checked("bank_bytes", bank_bytes, 1, 1 << 24)
        if port_width not in PORT_WIDTHS:
            raise ValueError(f"port_width must be one of {', '.join(map(str, PORT_WIDTHS))}, not {port_width!r}")
        self.port_width = port_width
        self.burst_len = _checked("burst_len", burst_len, 1, 256)
        self.outstanding = _checked("outstanding", outstanding, 1, MAX_OUTSTANDING + 1)
        self.size_bytes = _checked("size_bytes", size_bytes, 128, 1 << 32)
        if size_bytes % IMAGE_ALIGN:
            raise ValueError(f"size_bytes must be a multiple of {IMAGE_ALIGN}, not {size_bytes}")
        self.max_tokens = _checked("max_tokens", max_tokens, 1, (1 << TOKENS_WIDTH) - 1)
        # a command's tokens are kept at this width (the counts the array runs fit it)
        self.tokens_width = max_tokens.bit_length()
        self.verified_images = _checked("verified_images", verified_images, 0, 64)

        gate, _, down = layout.matrices
        P = self.port_bytes = port_width // 8
        self.step_bits = gate.step_bits
        self.step_bytes = gate.step_bytes
        # bank word: whole port words, wide enough that a step record spans at most two
        self.word_bytes = P * _ceil(self.step_bytes, P)
        self.lanes = self.word_bytes // P
        self.bank_words = _ceil(bank_bytes, self.word_bytes)
        self.tile_counts = (gate.tiles, down.tiles)
        self.tiles_per_image = 2 * gate.tiles + down.tiles
        self.groups = (gate.groups, down.groups)
        self.tile_beats = (_ceil(gate.tile_bytes, P), _ceil(down.tile_bytes, P))
        self.tile_words = tuple(_ceil(beats, self.lanes) for beats in self.tile_beats)
        self.tile_strides = (gate.tile_stride, down.tile_stride)
        for name, words, stride in zip(("gate/up", "down"), self.tile_words, self.tile_strides, strict=True):
            if words > self.bank_words:
                raise ValueError(f"bank_bytes must hold one {name} tile of {stride} bytes, not {bank_bytes}")
        self.param_counts = (2 * layout.ffn + layout.hidden + 2, (1 << layout.act_bits) // 4)
        self.entry_bytes = max(P, 4)
        self.segment_beats = tuple(_ceil(4 * words, P) for words in self.param_counts)
        self.segment_entries = tuple(_ceil(4 * words, self.entry_bytes) for words in self.param_counts)
        self.header_beats = HEADER_SIZE // P
        self.verify_beats = (layout.nbytes - HEADER_SIZE) // P
        self.addr_width = (size_bytes - 1).bit_length()
        self.mem_addr_width = word_addr_width(size_bytes, port_width)

    @classmethod
    def from_config(cls, config, **overrides):
        return cls(**loader_parameters(config, **overrides))

    def stream_bytes(self, tokens):
        """Bytes the stream pass reads for a run of ``tokens``: params and table words, then
        the tiles (each rounded up to whole port words; tile padding is not read)."""
        gate_tiles, down_tiles = self.tile_counts
        beats = sum(self.segment_beats)
        if tokens:
            beats += 2 * gate_tiles * self.tile_beats[0] + down_tiles * self.tile_beats[1]
        return beats * self.port_bytes

    @property
    def run_bytes(self):
        """Bytes one run of a verified image reads (header and stream pass, tokens > 0)."""
        return HEADER_SIZE + self.stream_bytes(1)

    @property
    def verify_bytes(self):
        """Bytes a verify pass reads: the whole payload."""
        return self.verify_beats * self.port_bytes

    def record_offsets(self):
        """Byte offsets of step records within a bank word (tiles start on word boundaries)."""
        return sorted({g * self.step_bytes % self.word_bytes for groups in self.groups for g in range(groups)})

    def header_constants(self):
        """(byte offset, bytes) of the header fields every accepted image has, per error code."""
        lay = self.layout
        return {
            ImageErrorCode.BAD_MAGIC: [(0, MAGIC)],
            ImageErrorCode.BAD_VERSION: [(4, struct.pack("<HH", VERSION, HEADER_SIZE))],
            ImageErrorCode.HASH_MISMATCH: [(8, struct.pack("<I", self.device_hash))],
            ImageErrorCode.BAD_SHAPE: [
                (16, struct.pack("<IIBBBBB", lay.hidden, lay.ffn, lay.m, lay.n, lay.cols, lay.weight_bits,
                                 lay.act_bits)),
                (32, struct.pack("<6I", *lay.offsets)),
            ],
        }


def _checked(name, value, lo, hi):
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _geometry(component, geometry):
    if not isinstance(geometry, LoaderGeometry):
        reject(component, f"geometry must be a LoaderGeometry, not {geometry!r}")
    return geometry


class ImageChecker(wiring.Component):
    """Checks each command's image before any of it is used.

    For every command, in order, one ``checked`` record: code 0 when the image may run, else
    the first failing :class:`~moegen.golden.image.ImageErrorCode` in golden's order (header
    in memory, magic, version, header CRC-32, config hash, expert id, shapes and offsets,
    image in memory, payload CRC-32). It reads the 64-byte header, checking each word as it
    arrives (only the payload CRC-32 field is kept), then, unless the image is verified, the
    whole payload once (the verify pass: the CRC-32 is computed as it streams and nothing is
    kept). A passed verify pass makes the image's address verified (a table of
    ``verified_images`` entries, replaced round robin) until a write lands inside the image.

    Parameters
    ----------
    geometry : LoaderGeometry

    Members
    -------
    cmd : ``In(stream.Signature(command_layout(addr_width)))``
        Commands.
    mem : ``Out(burst_read_signature(...))``
        Header and payload reads; ``mem.data`` is always ready.
    written : ``In(written_signature(word_addr_width))``
        Every write into device memory.
    checked : ``Out(stream.Signature(checked_layout(addr_width, tokens_width)))``
        One record per command.
    verifying : ``Out(1)``
        High for one cycle when a verify pass starts.
    """

    def __init__(self, *, geometry):
        self.geometry = g = _geometry(self, geometry)
        super().__init__({
            "cmd": In(stream.Signature(command_layout(g.addr_width))),
            "mem": Out(burst_read_signature(addr_width=g.mem_addr_width, data_width=g.port_width,
                                            burst_len=g.burst_len)),
            "written": In(written_signature(g.mem_addr_width)),
            "checked": Out(stream.Signature(checked_layout(g.addr_width, g.tokens_width))),
            "verifying": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        P = g.port_bytes
        block_shift = (IMAGE_ALIGN // P).bit_length() - 1  # port words per 64-byte block, log2
        size_blocks = g.size_bytes // IMAGE_ALIGN
        image_blocks = g.layout.nbytes // IMAGE_ALIGN

        # reads: one job (header or payload) at a time, a burst at a time; then wait for its words
        longest = max(g.verify_beats, g.header_beats)
        job_addr = Signal(g.mem_addr_width)
        job_left = Signal(range(longest + 1))  # words still to request
        to_receive = Signal(range(longest + 1))
        first = Signal()  # the next word is the job's first
        req = self.mem.req
        with m.If((~req.valid | req.ready) & (job_left != 0)):
            size = Mux(job_left > g.burst_len, g.burst_len, job_left)
            m.d.sync += [req.valid.eq(1), req.payload.addr.eq(job_addr), req.payload.beats.eq(size),
                         job_addr.eq(job_addr + size), job_left.eq(job_left - size)]
        with m.Elif(req.ready):
            m.d.sync += req.valid.eq(0)

        def read(addr, beats):
            return [job_addr.eq(addr), job_left.eq(beats), to_receive.eq(beats), first.eq(1)]

        # the words, always taken, through a register: they come through every burst arbiter
        beat = Signal()
        word = Signal.like(self.mem.data.payload)
        m.d.comb += self.mem.data.ready.eq(1)
        m.d.sync += [beat.eq(self.mem.data.valid), word.eq(self.mem.data.payload)]
        received = Signal()  # the job's last word was checked in the previous cycle
        with m.If(beat):
            m.d.sync += [to_receive.eq(to_receive - 1), first.eq(0)]
        m.d.sync += received.eq(beat & (to_receive == 1))
        m.submodules.crc = checksum = crc.catalog.CRC32_ISO_HDLC(8 * P).create()
        m.d.comb += [checksum.data.eq(word), checksum.valid.eq(beat), checksum.start.eq(beat & first)]

        # verified images: block addresses whose payload passed, forgotten when written
        cur = Signal(checked_layout(g.addr_width, g.tokens_width))  # the command (its code unused)
        block = cur.block
        # a write is compared with the current image and the verified ones as it lands, and the
        # answers are registered: it counts a cycle after it lands, against the image (or the
        # entries) of that cycle, so the comparison is made with their next values; in that
        # cycle it already counts against a lookup (``hit``), and an image inserted as it
        # lands is forgotten the next cycle
        landing = self.written.addr[block_shift:]

        def lands_in(start):
            """The write landing now falls inside the image that starts at block ``start``, an
            image that fits in memory (else the answer is never used): the difference wraps
            modulo 2**len(block) for a write below ``start``, to at least ``image_blocks``."""
            return self.written.valid & ((landing - start)[:len(block)] < image_blocks)

        next_block = Signal.like(block)  # the current image's block in the next cycle
        m.d.comb += next_block.eq(block)
        touched_block = Signal()  # the write seen now lands inside the current image
        m.d.sync += touched_block.eq(lands_in(next_block))
        dirty = Signal()  # the current image was written while it was checked
        with m.If(touched_block):
            m.d.sync += dirty.eq(1)
        insert = Signal()
        hit = Signal()
        if g.verified_images:
            known = [Signal(len(block), name=f"verified{i}") for i in range(g.verified_images)]
            known_valid = [Signal(name=f"verified{i}_valid") for i in range(g.verified_images)]
            insert_at = Signal(range(max(g.verified_images, 2)))
            touched = [Signal(name=f"verified{i}_touched") for i in range(g.verified_images)]
            for i, (entry, valid) in enumerate(zip(known, known_valid, strict=True)):
                inserting = insert & (insert_at == i)
                m.d.sync += touched[i].eq(lands_in(Mux(inserting, block, entry)))
                with m.If(inserting):
                    m.d.sync += [entry.eq(block), valid.eq(1)]
                with m.Elif(touched[i]):
                    m.d.sync += valid.eq(0)
            m.d.comb += hit.eq(Cat(v & (e == block) & ~t
                                   for e, v, t in zip(known, known_valid, touched, strict=True)).any())
            with m.If(insert):
                m.d.sync += insert_at.eq(Mux(insert_at == g.verified_images - 1, 0, insert_at + 1))

        # header checks: each header word is compared as it arrives. Per checked header byte,
        # the code it belongs to and the byte it must hold (a constant, or the expected expert
        # id's); a code's flag sticks once one of its bytes differed, until the next command
        expected = {}
        for code, fields in g.header_constants().items():
            for at, raw in fields:
                expected.update((at + k, (code, Const(byte, 8))) for k, byte in enumerate(raw))
        expected.update((_EXPERT_AT + k, (ImageErrorCode.EXPERT_MISMATCH, cur.expert.word_select(k, 8)))
                        for k in range(EXPERT_WIDTH // 8))
        bad = {code: Signal(name=f"bad_{code.name.lower()}") for code, _ in expected.values()}
        payload_crc = Signal(32)  # the header's payload CRC-32 field, kept for the verify pass
        # the header word in ``word``: the bytes it must hold, per code the bytes it checks (a
        # mask), both registered beside the word as it comes from memory, and per byte whether
        # it differs from the one it must hold
        must = Signal(8 * P)
        checks = {code: Signal(P, name=f"checks_{code.name.lower()}") for code in bad}
        arriving = Signal(range(g.header_beats + 1))  # header words that came from memory
        differs = Cat(word.word_select(j, 8) != must.word_select(j, 8) for j in range(P))

        def expect_word(i):
            """``must`` and ``checks`` for header word ``i``, loaded as it comes from memory
            (unchecked bytes: 0, in no mask)."""
            lanes = [expected.get(i * P + j, (None, Const(0, 8))) for j in range(P)]
            m.d.sync += must.eq(Cat(value for _, value in lanes))
            m.d.sync += [mask.eq(Cat(c == code for c, _ in lanes)) for code, mask in checks.items()]

        def header_word(i):
            """Keep header word ``i``'s bytes of the payload CRC-32 field."""
            for j in range(P):
                at = i * P + j - _PAYLOAD_CRC_AT
                if 0 <= at < 4:
                    m.d.sync += payload_crc.word_select(at, 8).eq(word.word_select(j, 8))

        # the header's code: its first failing check in golden's order
        fits = block <= size_blocks - image_blocks if image_blocks <= size_blocks else Const(0, 1)
        codes = [
            (ImageErrorCode.BAD_MAGIC, ~bad[ImageErrorCode.BAD_MAGIC]),
            (ImageErrorCode.BAD_VERSION, ~bad[ImageErrorCode.BAD_VERSION]),
            (ImageErrorCode.BAD_HEADER_CRC, checksum.match_detected),
            (ImageErrorCode.HASH_MISMATCH, ~bad[ImageErrorCode.HASH_MISMATCH]),
            (ImageErrorCode.EXPERT_MISMATCH, ~bad[ImageErrorCode.EXPERT_MISMATCH]),
            (ImageErrorCode.BAD_SHAPE, ~bad[ImageErrorCode.BAD_SHAPE]),
            (ImageErrorCode.TRUNCATED, fits),
        ]
        header_code = Signal(CODE_WIDTH)
        for code, ok in reversed(codes):
            with m.If(~ok):
                m.d.comb += header_code.eq(code)

        # the verdicts (the header's code, the payload CRC-32's match) are registered: a job is
        # decided in the cycle after ``received``, so no path runs from the checks into the
        # state machine and the next read
        decide = Signal()
        decided_code = Signal(CODE_WIDTH)
        payload_ok = Signal()
        m.d.sync += [decide.eq(received), decided_code.eq(header_code), payload_ok.eq(checksum.crc == payload_crc)]

        error = Signal(CODE_WIDTH)
        base = Cat(Const(0, block_shift), block)
        with m.FSM(name="check"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.comb += next_block.eq(self.cmd.payload.addr[6:])
                    m.d.sync += [cur.block.eq(self.cmd.payload.addr[6:]), cur.expert.eq(self.cmd.payload.expert),
                                 cur.tokens.eq(self.cmd.payload.tokens), dirty.eq(0), error.eq(0)]
                    m.d.sync += [flag.eq(0) for flag in bad.values()]
                    with m.If(self.cmd.payload.addr[6:] >= size_blocks):
                        m.d.sync += error.eq(ImageErrorCode.TRUNCATED)
                        m.next = "HANDOFF"
                    with m.Else():
                        m.d.sync += read(Cat(Const(0, block_shift), self.cmd.payload.addr[6:]), g.header_beats)
                        m.d.sync += arriving.eq(0)
                        m.next = "HEADER"
            with m.State("HEADER"):
                # the word's index in the header is header_beats - to_receive; the one coming
                # from memory (``arriving`` of them came before it) is checked in the next cycle
                with m.If(self.mem.data.valid):
                    m.d.sync += arriving.eq(arriving + 1)
                    with m.Switch(arriving):
                        for i in range(g.header_beats):
                            with m.Case(i):
                                expect_word(i)
                with m.If(beat):
                    with m.Switch(to_receive):
                        for i in range(g.header_beats):
                            with m.Case(g.header_beats - i):
                                header_word(i)
                    for code, flag in bad.items():
                        with m.If((differs & checks[code]).any()):
                            m.d.sync += flag.eq(1)
                with m.If(decide):
                    with m.If(decided_code != 0):
                        m.d.sync += error.eq(decided_code)
                        m.next = "HANDOFF"
                    with m.Elif(hit):
                        m.next = "HANDOFF"
                    with m.Else():
                        m.d.comb += self.verifying.eq(1)
                        m.d.sync += read(base + g.header_beats, g.verify_beats)
                        m.next = "VERIFY"
            with m.State("VERIFY"), m.If(decide):
                with m.If(payload_ok):
                    m.d.comb += insert.eq(~dirty & ~touched_block)
                with m.Else():
                    m.d.sync += error.eq(ImageErrorCode.BAD_PAYLOAD_CRC)
                m.next = "HANDOFF"
            with m.State("HANDOFF"):
                m.d.comb += [
                    self.checked.valid.eq(1),
                    self.checked.payload.code.eq(error),
                    self.checked.payload.block.eq(block),
                    self.checked.payload.expert.eq(cur.expert),
                    self.checked.payload.tokens.eq(cur.tokens),
                ]
                with m.If(self.checked.ready):
                    m.next = "IDLE"
        return m


class _Dest:
    """Where the words of a streamer's burst go."""

    PARAMS = 0
    BANK = 1


class TileStreamer(wiring.Component):
    """Streams checked images to the expert engine through the bank ring.

    For each ``checked`` record, in order: a refused one (code != 0) completes at once with
    its code and emits nothing; an accepted one has its params and table words read into the
    params FIFO and its tiles, in engine order, into the banks, emits
    :func:`~moegen.golden.expert.param_words` then
    :func:`~moegen.golden.expert.weight_stream` (each tile replayed from its bank once per
    token tile), and completes with code 0 after its last record was accepted.

    Banks form a ring: tiles are packed into a bank until the next does not fit or the image
    ends; the bank is then full and the emitter reads it while the next ones fill, and frees
    it when its tiles are replayed. A bank is written only while *filling* and read only while
    *full* (:attr:`probes`). Reads of the next image start as soon as a bank is free, so they
    overlap the current image's replays.

    Parameters
    ----------
    geometry : LoaderGeometry

    Members
    -------
    checked : ``In(stream.Signature(checked_layout(addr_width, tokens_width)))``
        Checked commands.
    mem : ``Out(burst_read_signature(...))``
        Params, table and tile reads; ``mem.data`` is always ready.
    params, weights, done
        As for :class:`ExpertLoader`.
    idle : ``Out(1)``
        No image is being emitted (the emitter waits for the next checked record).
    starved : ``Out(1)``
        An image is being emitted and the stream it needs next is ready and not valid.

    Attributes
    ----------
    probes
        Per bank: its :class:`BankState` (``bank_state``), whether it is written
        (``bank_written``) and whether the emitter reads it (``bank_read``) this cycle; and
        ``overflow``, an internal FIFO refusing a write (never, by construction).
    """

    def __init__(self, *, geometry):
        self.geometry = g = _geometry(self, geometry)
        self.probes = _Probes(g.banks)
        super().__init__({
            "checked": In(stream.Signature(checked_layout(g.addr_width, g.tokens_width))),
            "mem": Out(burst_read_signature(addr_width=g.mem_addr_width, data_width=g.port_width,
                                            burst_len=g.burst_len)),
            "params": Out(stream.Signature(32)),
            "weights": Out(stream.Signature(g.step_bits)),
            "done": Out(stream.Signature(done_layout())),
            "idle": Out(1),
            "starved": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        P, B = g.port_bytes, g.banks
        phase_one = 2 * g.tile_counts[0]  # tiles before the first down tile: gate and up interleaved
        block_shift = (IMAGE_ALIGN // P).bit_length() - 1
        probes = self.probes

        # ---- descriptors to the emitter, params FIFO
        desc_layout = data.StructLayout({"code": unsigned(CODE_WIDTH), "expert": unsigned(EXPERT_WIDTH),
                                         "tokens": unsigned(g.tokens_width)})
        m.submodules.images = images = ShiftFIFO(width=desc_layout.size, depth=4)
        desc_in = data.View(desc_layout, images.w_data)
        desc_out = data.View(desc_layout, images.r_data)

        params_depth = sum(g.segment_entries)  # one image's params and table words
        # one spare entry: the buffered FIFO refuses a write while its output register refills
        per_entry = g.entry_bytes // P  # port words per params FIFO entry (a narrow port's 32-bit words)
        m.submodules.param_fifo = param_fifo = BlockFIFO(width=8 * g.entry_bytes, depth=params_depth + 1,
                                                         lanes=per_entry)
        capacity = params_depth * per_entry
        param_credit = Signal(range(capacity + 1), init=capacity)  # port words the FIFO can still take

        # ---- banks: two memories per bank (even and odd words), written a port word at a time
        word_bits = 8 * g.word_bytes
        half_depth = max(g.bank_words // 2 + 1, 2)  # the odd word after the last; never zero address bits
        halves = []
        for b in range(B):
            pair = []
            for parity in ("even", "odd"):
                pair.append(unchecked_ram(m, f"bank{b}_{parity}", shape=word_bits, depth=half_depth, granularity=8 * P))
            halves.append(pair)
        bank_state = probes.bank_state
        state_of = Array(bank_state)
        ntiles_width = (g.bank_words // min(g.tile_words)).bit_length()
        bank_tiles = Array(Signal(ntiles_width, name=f"bank{b}_tiles") for b in range(B))

        # ---- requests: the current job, a burst at a time; each accepted burst's routing is queued
        job = _Job(g)
        tag_layout = data.StructLayout({
            "dest": unsigned(1), "bank": unsigned((B - 1).bit_length()),
            "word": unsigned(len(job.word)), "first": unsigned(1), "close": unsigned(1),
            "beats": unsigned(g.burst_len.bit_length()),
        })
        # as deep as the bursts the loader's arbiter lets be in flight (it pops with them)
        m.submodules.tags = tags = ShiftFIFO(width=tag_layout.size, depth=g.outstanding + 1)
        tag = data.View(tag_layout, tags.r_data)
        offered = Signal(tag_layout)  # routing of the burst on offer
        req = self.mem.req
        size = job.size()
        present = Signal()
        m.d.comb += present.eq((~req.valid | req.ready) & ~job.free
                               & ((job.dest != _Dest.PARAMS) | (param_credit >= size)))
        with m.If(present):
            m.d.sync += [
                req.valid.eq(1),
                req.payload.addr.eq(job.addr),
                req.payload.beats.eq(size),
                offered.dest.eq(job.dest),
                offered.bank.eq(job.bank),
                offered.word.eq(job.word),
                offered.first.eq(job.first),
                offered.close.eq(job.close & (size == job.left)),
                offered.beats.eq(size),
                job.addr.eq(job.addr + size),
                job.left.eq(job.left - size),
                job.first.eq(0),
            ]
        with m.Elif(req.ready):
            m.d.sync += req.valid.eq(0)
        m.d.comb += [tags.w_en.eq(req.valid & req.ready), tags.w_data.eq(offered)]

        # ---- receiver: words to the params FIFO or a bank
        beat = Signal()
        beat_index = Signal(range(max(g.burst_len, 2)))
        burst_done = Signal()
        word_in = self.mem.data.payload
        m.d.comb += [
            self.mem.data.ready.eq(1),
            beat.eq(self.mem.data.valid & tags.r_rdy),
            burst_done.eq(beat & (beat_index == tag.beats - 1)),
            tags.r_en.eq(burst_done),
        ]
        with m.If(beat):
            m.d.sync += beat_index.eq(Mux(burst_done, 0, beat_index + 1))
        starting = tag.first & (beat_index == 0)

        to_params = beat & (tag.dest == _Dest.PARAMS)
        m.d.comb += [param_fifo.w_en.eq(to_params), param_fifo.w_data.eq(word_in)]

        write_word = Signal(range(g.bank_words + 1))
        write_lane = Signal(range(max(g.lanes, 2)))
        at_word = Mux(starting, tag.word, write_word)
        at_lane = Mux(starting, 0, write_lane)
        to_bank = beat & (tag.dest == _Dest.BANK)
        with m.If(to_bank):
            if g.lanes > 1:
                wrap = at_lane == g.lanes - 1
                m.d.sync += [write_word.eq(Mux(wrap, at_word + 1, at_word)), write_lane.eq(Mux(wrap, 0, at_lane + 1))]
            else:
                m.d.sync += write_word.eq(at_word + 1)
        lane_enable = (Const(1, g.lanes) << at_lane)[: g.lanes]
        for b, pair in enumerate(halves):
            selected = to_bank & (tag.bank == b)
            m.d.comb += probes.bank_written[b].eq(selected)
            for parity, (port, _) in enumerate(pair):
                m.d.comb += [
                    port.addr.eq(at_word >> 1),
                    port.data.eq(Cat(*[word_in] * g.lanes)),
                    port.en.eq(Mux(selected & (at_word[0] == parity), lane_enable, 0)),
                ]
        bank_filled = burst_done & tag.close & (tag.dest == _Dest.BANK)

        # ---- fetch: checked command -> descriptor -> params and table words -> tiles
        run = Signal(checked_layout(g.addr_width, g.tokens_width))
        fetch_bank = Signal(range(B))
        bank_word = Signal(range(g.bank_words + 1))
        bank_count = Signal(ntiles_width)
        tile = Signal(range(g.tiles_per_image))
        pointers = [Signal(g.mem_addr_width, name=f"{name}_ptr") for name in ("gate", "up", "down")]
        set_filling = Signal()
        base = Cat(Const(0, block_shift), run.block)
        tile_words = [Const(w, len(job.word)) for w in g.tile_words]
        down_now = tile >= phase_one
        words_now = Mux(down_now, tile_words[1], tile_words[0])
        words_next = Mux(tile + 1 >= phase_one, tile_words[1], tile_words[0])
        last_tile = tile == g.tiles_per_image - 1
        closes = last_tile | (bank_word + words_now + words_next > g.bank_words)
        gate_off, up_off, down_off, params_off, lut_off, _ = g.layout.offsets

        with m.FSM(name="fetch"):
            with m.State("IDLE"):
                m.d.comb += self.checked.ready.eq(1)
                with m.If(self.checked.valid):
                    m.d.sync += run.eq(self.checked.payload)
                    m.next = "DESCRIBE"
            with m.State("DESCRIBE"):
                m.d.comb += [images.w_en.eq(1), desc_in.code.eq(run.code), desc_in.expert.eq(run.expert),
                             desc_in.tokens.eq(run.tokens)]
                with m.If(images.w_rdy):
                    m.d.sync += [
                        pointers[0].eq(base + gate_off // P),
                        pointers[1].eq(base + up_off // P),
                        pointers[2].eq(base + down_off // P),
                        tile.eq(0),
                    ]
                    with m.If(run.code != 0):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "PARAMS"
            with m.State("PARAMS"), m.If(job.free):
                m.d.sync += job.load(_Dest.PARAMS, base + params_off // P, g.segment_beats[0], close=0)
                m.next = "TABLE"
            with m.State("TABLE"), m.If(job.free):
                m.d.sync += job.load(_Dest.PARAMS, base + lut_off // P, g.segment_beats[1], close=0)
                with m.If(run.tokens != 0):
                    m.next = "TILES"
                with m.Else():
                    m.next = "IDLE"
            with m.State("TILES"):
                new_bank = bank_word == 0
                with m.If(job.free & (~new_bank | (state_of[fetch_bank] == BankState.FREE))):
                    m.d.comb += set_filling.eq(new_bank)
                    which = Mux(down_now, 2, tile[0])
                    beats = Mux(down_now, g.tile_beats[1], g.tile_beats[0])
                    m.d.sync += job.load(_Dest.BANK, Array(pointers)[which], beats, bank=fetch_bank,
                                         word=bank_word, close=closes)
                    for i, stride in enumerate((g.tile_strides[0], g.tile_strides[0], g.tile_strides[1])):
                        with m.If(which == i):
                            m.d.sync += pointers[i].eq(pointers[i] + stride // P)
                    with m.If(closes):
                        m.d.sync += [
                            bank_tiles[fetch_bank].eq(bank_count + 1),
                            fetch_bank.eq(Mux(fetch_bank == B - 1, 0, fetch_bank + 1)),
                            bank_word.eq(0),
                            bank_count.eq(0),
                        ]
                    with m.Else():
                        m.d.sync += [bank_word.eq(bank_word + words_now), bank_count.eq(bank_count + 1)]
                    m.d.sync += tile.eq(tile + 1)
                    with m.If(last_tile):
                        m.next = "IDLE"

        # ---- emitter: params words, then records from full banks, then the completion
        emit_bank = Signal(range(B))
        release = Signal()
        for b in range(B):
            with m.If(set_filling & (fetch_bank == b)):
                m.d.sync += bank_state[b].eq(BankState.FILLING)
            with m.If(bank_filled & (tag.bank == b)):
                m.d.sync += bank_state[b].eq(BankState.FULL)
            with m.If(release & (emit_bank == b)):
                m.d.sync += bank_state[b].eq(BankState.FREE)

        expert = Signal(EXPERT_WIDTH)
        code = Signal(CODE_WIDTH)
        tokens = Signal(g.tokens_width)
        segment = Signal()
        word_count = Signal(range(max(g.param_counts)))
        words_per_entry = g.entry_bytes // 4
        lane = Signal(range(max(words_per_entry, 2)))
        if words_per_entry > 1:
            m.d.comb += self.params.payload.eq(param_fifo.r_data.word_select(lane, 32))
        else:
            m.d.comb += self.params.payload.eq(param_fifo.r_data)
        param_pop = Signal()
        m.d.comb += param_fifo.r_en.eq(param_pop)
        m.d.sync += param_credit.eq(param_credit - Mux(present & (job.dest == _Dest.PARAMS), size, 0)
                                    + Mux(param_pop, per_entry, 0))

        m.submodules.records = records = ShiftFIFO(width=g.step_bits, depth=3)
        m.d.comb += [
            self.weights.valid.eq(records.r_rdy),
            self.weights.payload.eq(records.r_data),
            records.r_en.eq(self.weights.ready),
        ]
        in_flight = Signal()  # a bank read issued last cycle, its record enters the FIFO now
        read = Signal()
        tile_index = Signal(range(g.tiles_per_image))
        in_bank = Signal(ntiles_width)
        group = Signal(range(max(*g.groups, 2)))
        token = Signal(g.tokens_width)  # below tokens
        tile_start = Signal(range(g.bank_words + 1))
        rec_word = Signal(range(g.bank_words + 1))
        rec_offset = Signal(range(max(g.word_bytes, 2)))
        down_tile = tile_index >= phase_one
        groups_now = Mux(down_tile, g.groups[1], g.groups[0])
        emit_words = Mux(down_tile, tile_words[1], tile_words[0])

        with m.FSM(name="emit") as emit_fsm:
            with m.State("WAIT"), m.If(images.r_rdy):
                m.d.comb += images.r_en.eq(1)
                m.d.sync += [expert.eq(desc_out.expert), code.eq(desc_out.code), tokens.eq(desc_out.tokens),
                             segment.eq(0), word_count.eq(0), lane.eq(0)]
                with m.If(desc_out.code != 0):
                    m.next = "DONE"
                with m.Else():
                    m.next = "PARAMS"
            with m.State("PARAMS"):
                m.d.comb += self.params.valid.eq(param_fifo.r_rdy)
                with m.If(self.params.valid & self.params.ready):
                    last_word = word_count == Mux(segment, g.param_counts[1], g.param_counts[0]) - 1
                    m.d.comb += param_pop.eq(last_word | (lane == words_per_entry - 1))
                    m.d.sync += [word_count.eq(Mux(last_word, 0, word_count + 1)),
                                 lane.eq(Mux(param_pop, 0, lane + 1))]
                    with m.If(last_word):
                        m.d.sync += segment.eq(1)
                        with m.If(segment):
                            m.d.sync += [tile_index.eq(0), in_bank.eq(0), group.eq(0), token.eq(0),
                                         tile_start.eq(0), rec_word.eq(0), rec_offset.eq(0)]
                            with m.If(tokens != 0):
                                m.next = "WEIGHTS"
                            with m.Else():
                                m.next = "DRAIN"
            with m.State("WEIGHTS"):
                m.d.comb += read.eq((state_of[emit_bank] == BankState.FULL) & (records.level + in_flight < 3))
                with m.If(read):
                    with m.If(group != groups_now - 1):
                        wraps = rec_offset + g.step_bytes >= g.word_bytes
                        m.d.sync += [
                            group.eq(group + 1),
                            rec_word.eq(rec_word + wraps),
                            rec_offset.eq(Mux(wraps, rec_offset + g.step_bytes - g.word_bytes,
                                              rec_offset + g.step_bytes)),
                        ]
                    with m.Else():
                        m.d.sync += [group.eq(0), rec_offset.eq(0)]
                        with m.If(token + g.rows < tokens):
                            m.d.sync += [token.eq(token + g.rows), rec_word.eq(tile_start)]
                        with m.Else():
                            m.d.sync += [token.eq(0), tile_index.eq(tile_index + 1)]
                            with m.If(in_bank == bank_tiles[emit_bank] - 1):
                                m.d.comb += release.eq(1)
                                m.d.sync += [emit_bank.eq(Mux(emit_bank == B - 1, 0, emit_bank + 1)),
                                             in_bank.eq(0), tile_start.eq(0), rec_word.eq(0)]
                            with m.Else():
                                m.d.sync += [in_bank.eq(in_bank + 1), tile_start.eq(tile_start + emit_words),
                                             rec_word.eq(tile_start + emit_words)]
                            with m.If(tile_index == g.tiles_per_image - 1):
                                m.next = "DRAIN"
            with m.State("DRAIN"), m.If(~records.r_rdy & ~in_flight):
                m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1), self.done.payload.expert.eq(expert),
                             self.done.payload.code.eq(code)]
                with m.If(self.done.ready):
                    m.next = "WAIT"

        # bank read: the words holding the record, then its bytes at the record's offset
        read_parity = Signal()
        read_bank = Signal(range(B))
        read_offset = Signal(range(max(g.word_bytes, 2)))
        m.d.sync += [in_flight.eq(read), read_parity.eq(rec_word[0]), read_bank.eq(emit_bank),
                     read_offset.eq(rec_offset)]
        even_data, odd_data = [], []
        for b, ((_, even), (_, odd)) in enumerate(halves):
            selected = read & (emit_bank == b)
            m.d.comb += [
                probes.bank_read[b].eq(selected),
                even.addr.eq((rec_word + 1) >> 1),
                odd.addr.eq(rec_word >> 1),
                even.en.eq(selected),
                odd.en.eq(selected),
            ]
            even_data.append(even.data)
            odd_data.append(odd.data)
        low = Mux(read_parity, Array(odd_data)[read_bank], Array(even_data)[read_bank])
        high = Mux(read_parity, Array(even_data)[read_bank], Array(odd_data)[read_bank])
        window = Cat(low, high)
        record = Signal(g.step_bits)
        with m.Switch(read_offset):
            for offset in g.record_offsets():
                with m.Case(offset):
                    m.d.comb += record.eq(window[8 * offset: 8 * offset + g.step_bits])
        m.d.comb += [records.w_en.eq(in_flight), records.w_data.eq(record)]

        unchecked = (param_fifo, tags, records)  # written without waiting: room was reserved
        m.d.comb += probes.overflow.eq(Cat(fifo.w_en & ~fifo.w_rdy for fifo in unchecked).any())
        in_weights = emit_fsm.ongoing("WEIGHTS")
        m.d.comb += [
            self.idle.eq(emit_fsm.ongoing("WAIT")),
            self.starved.eq(Mux(in_weights, self.weights.ready & ~self.weights.valid,
                                emit_fsm.ongoing("PARAMS") & self.params.ready & ~self.params.valid)),
        ]
        return m


class ExpertLoader(wiring.Component):
    """Double-buffered expert loader with header and CRC-32 checks and prefetch.

    Commands run in order; each yields one ``done`` record in command order. For a command
    whose image passes every check the loader emits, and then completes with code 0:

    * on ``params``: :func:`~moegen.golden.expert.param_words` of the image (the params
      section's ``2*ffn + hidden + 2`` words, then the activation table four entries a word);
    * on ``weights``: :func:`~moegen.golden.expert.weight_stream` for the command's
      ``tokens`` on ``rows`` token lanes (every weight tile once per token tile, replayed from
      its bank, never read from memory twice), starting only after the last params word.

    A command whose image fails a check emits nothing and completes with the failing
    :class:`~moegen.golden.image.ImageErrorCode`, checked in golden's order; ``TRUNCATED``
    means the image does not lie inside the ``size_bytes`` of memory. The next command runs
    normally. A verified image (module docstring) skips the verify pass.

    Parameters
    ----------
    layout : ImageLayout
        The config's image layout; images of other shapes are refused (``BAD_SHAPE``).
    device_hash : int
        The config's 32-bit device hash; images built for another are refused.
    rows : int
        Token lanes of the array, 1..64: a tile is replayed ``ceil(tokens / rows)`` times.
    banks : int
        On-chip weight banks, 2..8.
    bank_bytes : int
        Bytes per bank, up to 2**24; a bank must hold the largest weight tile's records.
    port_width : int
        Bits of the memory read port: 8, 16, ..., 512.
    burst_len : int
        Largest burst in words, 1..256.
    outstanding : int
        Requests the memory queues, 1..17 (a memory queues up to 16; in the accelerator the
        command processor's request slice counts as one more); the loader keeps one burst
        more in flight.
    size_bytes : int
        Device-memory size, a multiple of 64 in 128..2**32.
    max_tokens : int
        Most tokens of a command, 1..65535: the loader keeps a command's tokens at the width
        of ``max_tokens`` (a count above it runs as its low bits).
    verified_images : int
        Image addresses remembered as verified, 0..64 (0: every command runs a verify pass).

    Members
    -------
    cmd : ``In(stream.Signature(command_layout(addr_width)))``
        Commands: byte address, expected expert id, tokens (0 runs no weights; at most
        ``max_tokens``).
    mem : ``Out(burst_read_signature(...))``
        The burst read port into device memory; ``mem.data`` is always ready.
    written : ``In(written_signature(word_addr_width))``
        The word address of every write into device memory (a memory's ``written``).
    params : ``Out(stream.Signature(32))``
        Parameter words of each image that runs.
    weights : ``Out(stream.Signature(step_bits))``
        Step records in engine order.
    done : ``Out(stream.Signature(done_layout()))``
        One completion per command, in command order, after its last output was accepted.
    status : ``Out(STATUS_LAYOUT)``
        Counters: cycles with a burst requested and not yet received (``load_cycles``),
        cycles the consumer waited on the loader (``stall_cycles``: while a command is
        pending, the stream the consumer needs next is ready and not valid), bytes received,
        images refused for a header reason (codes 1..7) or for the payload CRC, verify passes
        run, and the code of the last refused command.
    """

    def __init__(self, *, layout, device_hash, rows, banks=2, bank_bytes=8192, port_width=64, burst_len=16,
                 outstanding=2, size_bytes=1 << 20, max_tokens=(1 << TOKENS_WIDTH) - 1, verified_images=4):
        try:
            self.geometry = g = LoaderGeometry(
                layout=layout, device_hash=device_hash, rows=rows, banks=banks, bank_bytes=bank_bytes,
                port_width=port_width, burst_len=burst_len, outstanding=outstanding, size_bytes=size_bytes,
                max_tokens=max_tokens, verified_images=verified_images)
        except ValueError as error:
            reject(self, str(error))
        self.checker = ImageChecker(geometry=g)
        self.streamer = TileStreamer(geometry=g)
        self.probes = self.streamer.probes
        super().__init__({
            "cmd": In(stream.Signature(command_layout(g.addr_width))),
            "mem": Out(burst_read_signature(addr_width=g.mem_addr_width, data_width=port_width, burst_len=burst_len)),
            "written": In(written_signature(g.mem_addr_width)),
            "params": Out(stream.Signature(32)),
            "weights": Out(stream.Signature(g.step_bits)),
            "done": Out(stream.Signature(done_layout())),
            "status": Out(STATUS_LAYOUT),
        })

    @classmethod
    def from_config(cls, config, **overrides):
        """The loader of ``config``; ``overrides`` replace any parameter."""
        return cls(**loader_parameters(config, **overrides))

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        # queued commands: what the checker keeps of them (block address, expert id, tokens)
        queued = data.StructLayout({"block": unsigned(g.addr_width - 6), "expert": unsigned(EXPERT_WIDTH),
                                    "tokens": unsigned(g.tokens_width)})
        m.submodules.commands = commands = ShiftFIFO(width=queued.size, depth=2)
        head = data.View(queued, commands.r_data)
        m.submodules.checker = checker = self.checker
        m.submodules.streamer = streamer = self.streamer
        m.submodules.arbiter = arbiter = BurstArbiter(clients=2, addr_width=g.mem_addr_width,
                                                      data_width=g.port_width, burst_len=g.burst_len,
                                                      outstanding=g.outstanding + 1)
        m.d.comb += [
            self.cmd.ready.eq(commands.w_rdy),
            commands.w_en.eq(self.cmd.valid),
            commands.w_data.eq(Cat(self.cmd.payload.addr[6:], self.cmd.payload.expert,
                                   self.cmd.payload.tokens[:g.tokens_width])),
            checker.cmd.valid.eq(commands.r_rdy),
            checker.cmd.payload.addr.eq(Cat(Const(0, 6), head.block)),
            checker.cmd.payload.expert.eq(head.expert),
            checker.cmd.payload.tokens.eq(head.tokens),
            commands.r_en.eq(checker.cmd.ready),
        ]
        # the streamer's reads first: they feed the consumer; the checker's fill the gaps
        wiring.connect(m, streamer.mem, arbiter.clients[0])
        wiring.connect(m, checker.mem, arbiter.clients[1])
        wiring.connect(m, arbiter.mem, wiring.flipped(self.mem))
        wiring.connect(m, wiring.flipped(self.written), checker.written)
        wiring.connect(m, checker.checked, streamer.checked)
        wiring.connect(m, streamer.params, wiring.flipped(self.params))
        wiring.connect(m, streamer.weights, wiring.flipped(self.weights))
        wiring.connect(m, streamer.done, wiring.flipped(self.done))

        status = self.status
        pending = Signal(range(16))  # commands accepted and not yet completed (at most 11 in the stages)
        accepted = self.cmd.valid & self.cmd.ready
        completed = self.done.valid & self.done.ready
        m.d.sync += pending.eq(pending + accepted - completed)
        refused = completed & (self.done.payload.code != 0)
        crc_error = self.done.payload.code == ImageErrorCode.BAD_PAYLOAD_CRC
        with m.If(refused):
            m.d.sync += status.last_error.eq(self.done.payload.code)
        m.d.sync += [
            status.load_cycles.eq(status.load_cycles + ((arbiter.in_flight != 0) | self.mem.req.valid)),
            status.stall_cycles.eq(status.stall_cycles + (
                streamer.starved | (streamer.idle & self.params.ready & (pending != 0)))),
            status.bytes_loaded.eq(status.bytes_loaded + Mux(self.mem.data.valid & self.mem.data.ready,
                                                             g.port_bytes, 0)),
            status.header_errors.eq(status.header_errors + (refused & ~crc_error)),
            status.crc_errors.eq(status.crc_errors + (refused & crc_error)),
            status.verify_passes.eq(status.verify_passes + checker.verifying),
        ]
        return m


class _Probes:
    """Internal signals the formal checks observe: per bank its :class:`BankState`, whether
    it is written this cycle, and whether the emitter reads it this cycle; and whether an
    internal FIFO written without a handshake refused a write (which would lose data)."""

    def __init__(self, banks):
        self.bank_state = [Signal(2, name=f"bank{b}_state") for b in range(banks)]
        self.bank_written = [Signal(name=f"bank{b}_written") for b in range(banks)]
        self.bank_read = [Signal(name=f"bank{b}_read") for b in range(banks)]
        self.overflow = Signal(name="overflow")


class _Job:
    """A run of consecutive memory words to one destination, requested a burst at a time."""

    def __init__(self, g):
        self.burst_len = g.burst_len
        self.addr = Signal(g.mem_addr_width, name="job_addr")
        self.left = Signal(range(g.verify_beats + 1), name="job_left")
        self.dest = Signal(1, name="job_dest")
        self.bank = Signal(range(g.banks), name="job_bank")
        self.word = Signal(range(g.bank_words + 1), name="job_word")
        self.first = Signal(name="job_first")
        self.close = Signal(name="job_close")

    @property
    def free(self):
        """Every burst of the job has been requested (a new job may be loaded)."""
        return self.left == 0

    def size(self):
        """Words of the next burst."""
        return Mux(self.left > self.burst_len, self.burst_len, self.left)

    def load(self, dest, addr, beats, *, bank=0, word=0, close=1):
        """Statements that start a job; ``close`` marks its last burst (the end of a bank's
        last tile)."""
        return [self.dest.eq(dest), self.addr.eq(addr), self.left.eq(beats), self.bank.eq(bank),
                self.word.eq(word), self.first.eq(1), self.close.eq(close)]

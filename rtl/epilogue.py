"""The SwiGLU epilogue: array accumulators to the gate activation, the gated product and the
expert output, bit-exact with :func:`moegen.golden.expert.expert_int` steps 3 to 6."""

from amaranth import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from ..golden.expert import FACTOR_BITS
from .memory import UNCHECKED, registered_read_port
from .params import check_int
from .requant import SHIFT_BITS, Requantizer

__all__ = ["Epilogue", "Projection", "epilogue_input_layout", "factor_layout", "gated_layout", "output_layout"]


class Projection(enum.Enum, shape=2):
    """Which matrix a result row comes from."""

    GATE = 0
    UP = 1
    DOWN = 2


def _factor_shape():
    return data.StructLayout({"mult": unsigned(FACTOR_BITS), "shift": unsigned(SHIFT_BITS)})


def factor_layout(max_tokens):
    """Payload of the token-factor stream: ``(tok_mult, tok_shift)`` of one token."""
    return data.StructLayout({"token": unsigned(bits_for(max_tokens - 1)), "factor": _factor_shape()})


def epilogue_input_layout(cols, acc_width, max_tokens, tiles, tag_width):
    """Payload of the epilogue's input: one result row of the array and where it belongs."""
    return data.StructLayout({
        "acc": data.ArrayLayout(signed(acc_width), cols),
        "kind": Projection,
        "token": unsigned(bits_for(max_tokens - 1)),
        "tile": unsigned(bits_for(tiles - 1)),
        "tag": unsigned(tag_width),
    })


def gated_layout(cols, act_width, tag_width):
    """Payload of the gated-product stream ``h``: one token's ``cols`` channels of an ffn tile."""
    return data.StructLayout({"values": data.ArrayLayout(signed(act_width), cols), "tag": unsigned(tag_width)})


def output_layout(cols, act_width, max_tokens, hidden, tag_width):
    """Payload of the expert output stream ``y``: one token's ``cols`` channels of a hidden
    tile, starting at output channel ``channel``."""
    return data.StructLayout({
        "values": data.ArrayLayout(signed(act_width), cols),
        "token": unsigned(bits_for(max_tokens - 1)),
        "channel": unsigned(bits_for(hidden - 1)),
        "tag": unsigned(tag_width),
    })


def _alongside(m, requant, value, name):
    """``value`` as it was when the beat now on ``requant.o`` entered ``requant.i``: a
    :class:`~moegen.rtl.requant.Requantizer` moves all its stages together exactly when
    ``i.ready``, so ``LATENCY`` registers moving with it keep a beat's side-band beside it
    (a FIFO would hold the same entries, with pointers and a read multiplexer)."""
    for stage in range(Requantizer.LATENCY):
        delayed = Signal.like(value, name=f"{name}_{stage + 1}")
        with m.If(requant.i.ready):
            m.d.sync += delayed.eq(value)
        value = delayed
    return value


class Epilogue(wiring.Component):
    """Requantization, activation table and gated multiply of an int8 SwiGLU expert.

    Each input beat is one token's ``cols`` accumulators of one tile of the gate, up or down
    projection (:class:`Projection`); beats are processed in order, one per cycle:

    * gate: ``g = requantize(acc, tok_mult*gate_mult, tok_shift+gate_shift)`` per channel, then
      ``a = act_lut[g mod 2**act_width]`` is kept for the token (one tile's worth);
    * up: ``u`` likewise with the up factors, then ``h = requantize(a*u, gated_mult,
      gated_shift)`` leaves on ``h``. The gate beat of the same token and tile must come
      first (any number of beats earlier);
    * down: ``y = requantize(acc, down_mult, down_shift)`` leaves on ``y``.

    Parameters load from ``params`` in the order of :func:`moegen.golden.expert.param_words`
    (gate, up, down channel factors ``mult | shift << 16``, gated mult, gated shift, the
    activation table four entries per word); ``start`` restarts that load and input waits
    until it is complete (``loaded``). Channels past ``ffn``/``hidden`` in a tile have
    factor 0. Token factors arrive on ``factors`` at any time before the token's first beat
    (and are not rewritten before its last one).
    One :class:`~moegen.rtl.requant.Requantizer` of ``cols`` lanes serves all three
    projections, a second one the gated product.

    Parameters
    ----------
    cols : int
        Lanes per beat (the array's columns), 1..64.
    hidden, ffn : int
        Expert shapes, 1..65535.
    max_tokens : int
        Tokens per run, 1..65535.
    acc_width : int
        Accumulator bits, 8..32.
    act_width : int
        Bits of activations and of every requantized value, 2..8.
    tag_width : int
        Bits of the caller's tag, carried from ``i`` to ``h`` and ``y`` unchanged, 1..32.
    pipeline : bool
        A register between the activation read and the gated multiply (one cycle more on the
        ``h`` path).

    Members
    -------
    start : ``In(1)``
        Pulse: forget the parameters and load them again from ``params``.
    params : ``In(stream.Signature(32))``
        Parameter words.
    loaded : ``Out(1)``
        Every parameter word since the last ``start`` has arrived.
    factors : ``In(stream.Signature(factor_layout(max_tokens)))``
        Token factors; always ready.
    i : ``In(stream.Signature(epilogue_input_layout(...)))``
        Result rows of the array.
    h : ``Out(stream.Signature(gated_layout(cols, act_width, tag_width)))``
        Gated products of up rows, in input order.
    y : ``Out(stream.Signature(output_layout(...)))``
        Expert outputs of down rows, in input order.
    """

    def __init__(self, *, cols, hidden, ffn, max_tokens, acc_width=32, act_width=8, tag_width=1, pipeline=True):
        self.cols = check_int(self, "cols", cols, 1, 64)
        self.hidden = check_int(self, "hidden", hidden, 1, 65535)
        self.ffn = check_int(self, "ffn", ffn, 1, 65535)
        self.max_tokens = check_int(self, "max_tokens", max_tokens, 1, 65535)
        self.acc_width = check_int(self, "acc_width", acc_width, 8, 32)
        self.act_width = check_int(self, "act_width", act_width, 2, 8)
        self.tag_width = check_int(self, "tag_width", tag_width, 1, 32)
        self.pipeline = bool(pipeline)
        self.ffn_tiles = -(-ffn // cols)
        self.hidden_tiles = -(-hidden // cols)
        self.param_words = 2 * ffn + hidden + 2 + (1 << act_width) // 4
        tiles = max(self.ffn_tiles, self.hidden_tiles)
        super().__init__({
            "start": In(1),
            "params": In(stream.Signature(32)),
            "loaded": Out(1),
            "factors": In(stream.Signature(factor_layout(max_tokens))),
            "i": In(stream.Signature(epilogue_input_layout(cols, acc_width, max_tokens, tiles, tag_width))),
            "h": Out(stream.Signature(gated_layout(cols, act_width, tag_width))),
            "y": Out(stream.Signature(output_layout(cols, act_width, max_tokens, hidden, tag_width))),
        })

    def elaborate(self, platform):
        m = Module()
        cols, aw = self.cols, self.act_width
        factor = _factor_shape()

        # Channel factors: one entry of `cols` factors per tile; gate tiles, up tiles, down tiles.
        # It and the activation table are written only while the parameters load, before any
        # row is read, so no read meets a write (UNCHECKED).
        channel_factors = Memory(shape=data.ArrayLayout(factor, cols),
                                 depth=2 * self.ffn_tiles + self.hidden_tiles, init=[], attrs=UNCHECKED)
        m.submodules.channel_factors = channel_factors
        # The activation table, four entries per word as the params stream carries it.
        table = Memory(shape=data.ArrayLayout(signed(aw), 4), depth=max(2, (1 << aw) // 4), init=[],
                       attrs=UNCHECKED)
        m.submodules.table = table
        gated_mult = Signal(31, reset_less=True)  # a multiplier input register (loaded again each run)
        gated_shift = Signal(SHIFT_BITS)

        self._load_params(m, channel_factors, table, gated_mult, gated_shift)

        m.d.comb += self.factors.ready.eq(1)

        # Stage 1: take a row, read its token's and its tile's factors.
        sideband = data.StructLayout({"kind": Projection, "token": self.i.payload.token.shape(),
                                      "tile": self.i.payload.tile.shape(), "tag": unsigned(self.tag_width)})
        s1_valid = Signal()
        s1_acc = Signal.like(self.i.payload.acc)
        s1_side = Signal(sideband)
        s2_valid = Signal()
        s2_free = Signal()
        s1_free = ~s1_valid | s2_free
        m.d.comb += self.i.ready.eq(s1_free & self.loaded)
        channel_read = registered_read_port(m, channel_factors, "channel_read")
        kind = self.i.payload.kind
        section = Mux(kind == Projection.GATE, 0,
                      Mux(kind == Projection.UP, self.ffn_tiles, 2 * self.ffn_tiles))
        m.d.comb += [
            channel_read.addr.eq(section + self.i.payload.tile),
            channel_read.en.eq(s1_free),
        ]
        with m.If(s1_free):
            m.d.sync += [
                s1_valid.eq(self.i.valid & self.i.ready),
                s1_acc.eq(self.i.payload.acc),
                s1_side.kind.eq(kind),
                s1_side.token.eq(self.i.payload.token),
                s1_side.tile.eq(self.i.payload.tile),
                s1_side.tag.eq(self.i.payload.tag),
            ]

        # Stage 2: the per-(token, channel) multiplier is the product of the two factors;
        # down rows have no token factor.
        m.submodules.requant = requant = Requantizer(acc_width=self.acc_width, out_width=aw, lanes=cols,
                                                     mult_bits=2 * FACTOR_BITS)
        s2_side = Signal(sideband)
        # Registers around the multipliers are reset-less (their values matter only beside a
        # valid bit that resets): yosys folds only such registers into a SB_MAC16.
        s2_payload = Signal(requant.i.payload.shape(), reset_less=True)
        m.d.comb += [s2_free.eq(~s2_valid | requant.i.ready), requant.i.payload.eq(s2_payload)]
        token_factor = Signal(factor)
        m.d.comb += token_factor.eq(Mux(s1_side.kind == Projection.DOWN, 1, self._token_factor(m, s1_free)))
        with m.If(s2_free):
            m.d.sync += [s2_valid.eq(s1_valid), s2_side.eq(s1_side)]
            for lane in range(cols):
                chan = channel_read.data[lane]
                m.d.sync += [
                    s2_payload.acc[lane].eq(s1_acc[lane]),
                    s2_payload.mult[lane].eq(token_factor.mult * chan.mult),
                    s2_payload.shift[lane].eq(token_factor.shift + chan.shift),
                ]
        m.d.comb += [
            requant.i.valid.eq(s2_valid),
        ]

        # After the requantizer: gate rows go to the table, up rows to the gated multiply,
        # down rows out on y.
        out_side = data.View(sideband, _alongside(m, requant, s2_side.as_value(), "requant_side"))
        out_kind = out_side.kind
        gated_free = Signal()
        m.d.comb += [
            requant.o.ready.eq(Mux(out_kind == Projection.GATE, 1,
                                   Mux(out_kind == Projection.UP, gated_free, self.y.ready))),
            self.y.valid.eq(requant.o.valid & (out_kind == Projection.DOWN)),
            self.y.payload.values.eq(requant.o.payload),
            self.y.payload.token.eq(out_side.token),
            self.y.payload.channel.eq(out_side.tile * cols),
            self.y.payload.tag.eq(out_side.tag),
        ]
        taken = requant.o.valid & requant.o.ready

        activations = Memory(shape=data.ArrayLayout(signed(aw), cols), depth=max(2, self.max_tokens), init=[])
        m.submodules.activations = activations
        act_write = activations.write_port()
        act_read = activations.read_port(transparent_for=(act_write,))

        # Gate: look up a = act_lut[g] (one table port per lane), store it next cycle.
        gate_valid = Signal()
        gate_token = Signal.like(out_side.token)
        gate_lanes = [Signal(2, name=f"gate_entry_{lane}") for lane in range(cols)]
        m.d.sync += [gate_valid.eq(taken & (out_kind == Projection.GATE)), gate_token.eq(out_side.token)]
        looked_up = []
        for lane in range(cols):
            code = requant.o.payload[lane][:aw]  # the gate's code modulo 2**act_width
            port = registered_read_port(m, table, f"table_read_{lane}")
            m.d.comb += [port.addr.eq(code >> 2), port.en.eq(1)]
            m.d.sync += gate_lanes[lane].eq(code[:2])
            looked_up.append(port.data.as_value().word_select(gate_lanes[lane], aw))
        m.d.comb += [act_write.addr.eq(gate_token), act_write.data.eq(Cat(*looked_up)), act_write.en.eq(gate_valid)]

        # Up: read a (written by this token's gate row), with ``pipeline`` register it (the block
        # RAM's output and its write bypass take most of a cycle), multiply, requantize with the
        # gated factor. |a * u| <= 2**(aw-1) * qmax < 2**(2*aw-2): u is saturated symmetrically.
        m.submodules.gated = gated = Requantizer(acc_width=2 * aw - 1, out_width=aw, lanes=cols)
        u1_valid = Signal()
        u1_values = Signal.like(requant.o.payload, reset_less=True)
        u1_tag = Signal(self.tag_width)
        gated_acc = Signal(gated.i.payload.acc.shape(), reset_less=True)
        u3_valid = Signal()
        u3_tag = Signal(self.tag_width)
        u3_free = ~u3_valid | gated.i.ready
        if self.pipeline:
            u2_valid = Signal()
            u2_values = Signal.like(requant.o.payload, reset_less=True)
            u2_act = Signal.like(act_read.data, reset_less=True)
            u2_tag = Signal(self.tag_width)
            u2_free = ~u2_valid | u3_free
            with m.If(u2_free):
                m.d.sync += [u2_valid.eq(u1_valid), u2_values.eq(u1_values), u2_act.eq(act_read.data),
                             u2_tag.eq(u1_tag)]
        else:
            u2_valid, u2_values, u2_act, u2_tag, u2_free = u1_valid, u1_values, act_read.data, u1_tag, u3_free
        m.d.comb += [
            gated_free.eq(~u1_valid | u2_free),
            act_read.addr.eq(out_side.token),
            act_read.en.eq(gated_free),
        ]
        with m.If(gated_free):
            m.d.sync += [u1_valid.eq(taken & (out_kind == Projection.UP)), u1_values.eq(requant.o.payload),
                         u1_tag.eq(out_side.tag)]
        with m.If(u3_free):
            m.d.sync += [u3_valid.eq(u2_valid), u3_tag.eq(u2_tag)]
            for lane in range(cols):
                m.d.sync += gated_acc[lane].eq(u2_act[lane] * u2_values[lane])
        # the gated factor is constant while a run's rows flow: no copy per beat
        for lane in range(cols):
            m.d.comb += [gated.i.payload.mult[lane].eq(gated_mult), gated.i.payload.shift[lane].eq(gated_shift)]
        m.d.comb += gated.i.payload.acc.eq(gated_acc)
        m.d.comb += [
            gated.i.valid.eq(u3_valid),
            self.h.valid.eq(gated.o.valid),
            self.h.payload.values.eq(gated.o.payload),
            self.h.payload.tag.eq(_alongside(m, gated, u3_tag, "gated_side")),
            gated.o.ready.eq(self.h.ready),
        ]
        return m

    def _token_factor(self, m, s1_free):
        """The factor of the token of the row in stage 1, read when the row entered it."""
        factor = _factor_shape()
        if self.max_tokens == 1:
            # one token: its factor stays put from before its first row until the run ends
            # (the next run's factor comes after it), so a register serves without a read copy
            held = Signal(factor)
            with m.If(self.factors.valid):
                m.d.sync += held.eq(self.factors.payload.factor)
            return held
        token_factors = Memory(shape=factor, depth=self.max_tokens, init=[])
        m.submodules.token_factors = token_factors
        factor_write = token_factors.write_port()
        token_read = token_factors.read_port()
        m.d.comb += [
            factor_write.addr.eq(self.factors.payload.token),
            factor_write.data.eq(self.factors.payload.factor),
            factor_write.en.eq(self.factors.valid),
            token_read.addr.eq(self.i.payload.token),
            token_read.en.eq(s1_free),
        ]
        return token_read.data

    def _load_params(self, m, channel_factors, table, gated_mult, gated_shift):
        """Sections of the params stream, in order: gate, up, down factors (one per channel,
        ``cols`` per memory entry, each section starting a new entry), gated mult, gated shift,
        activation table words."""
        cols, aw = self.cols, self.act_width
        sizes = [self.ffn, self.ffn, self.hidden, 1, 1, max(1, (1 << aw) // 4)]
        section = Signal(range(len(sizes) + 1))
        count = Signal(range(max(2, *sizes)))
        entry = Signal(range(2 * self.ffn_tiles + self.hidden_tiles + 1))
        lane = Signal(range(max(2, cols)))
        word = self.params.payload
        took = self.params.valid & self.params.ready
        m.d.comb += [self.params.ready.eq(~self.loaded), self.loaded.eq(section == len(sizes))]

        size = Signal.like(count)
        with m.Switch(section):
            for index, value in enumerate(sizes):
                with m.Case(index):
                    m.d.comb += size.eq(value - 1)
        section_end = count == size

        factor_write = channel_factors.write_port(granularity=1)  # one array element (channel factor) per enable bit
        m.d.comb += factor_write.addr.eq(entry)
        for target in range(cols):
            m.d.comb += [factor_write.data[target].mult.eq(word[:FACTOR_BITS]),
                         factor_write.data[target].shift.eq(word[16:16 + SHIFT_BITS])]
        with m.If(took & (section < 3)):
            m.d.comb += factor_write.en.eq(1 << lane)
            with m.If(section_end | (lane == cols - 1)):
                m.d.sync += [lane.eq(0), entry.eq(entry + 1)]
            with m.Else():
                m.d.sync += lane.eq(lane + 1)
        with m.If(took & (section == 3)):
            m.d.sync += gated_mult.eq(word[:31])
        with m.If(took & (section == 4)):
            m.d.sync += gated_shift.eq(word[:SHIFT_BITS])
        table_write = table.write_port()
        m.d.comb += [
            table_write.addr.eq(count),
            table_write.data.eq(Cat(*(word[8 * b:8 * b + aw] for b in range(4)))),
            table_write.en.eq(took & (section == 5)),
        ]
        with m.If(took):
            with m.If(section_end):
                m.d.sync += [count.eq(0), section.eq(section + 1)]
            with m.Else():
                m.d.sync += count.eq(count + 1)
        with m.If(self.start):
            m.d.sync += [section.eq(0), count.eq(0), entry.eq(0), lane.eq(0)]

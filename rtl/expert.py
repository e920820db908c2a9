"""ExpertEngine: a whole int8 SwiGLU expert on the sparse array, bit-exact with
:func:`moegen.golden.expert.expert_int`.

Interfaces (all streams; one run at a time):

* ``run``: one beat per expert run, the token count ``T`` (1..max_tokens).
* ``params``: 32-bit words, :func:`~moegen.golden.expert.param_words` of the expert, once per
  run (from the loader).
* ``weights``: step records in :func:`~moegen.golden.expert.weight_stream` order (from the
  loader): for each ffn tile the gate tile once per token tile, then the up tile once per
  token tile; then each down tile once per token tile.
* ``x``: the tokens as 32-bit words, as a host writes them into an activation buffer: per
  token one factor word ``tok_mult | tok_shift << 16``
  (:func:`~moegen.golden.expert.quantize_activations`), then ``ceil(hidden / 4)`` words of
  activations, value ``4w + b`` in byte ``b`` of word ``w`` (two's complement, the last word
  zero padded). :func:`activation_words` builds it.
* ``y``: the outputs, one beat per (hidden tile, token) in that order: ``cols`` int8 values
  of output channels ``channel .. channel + cols - 1`` of ``token``; lanes past ``hidden`` are
  0. ``last`` marks the run's final beat; a top writes ``values`` at
  ``token * hidden + channel`` of its output buffer.

Schedule: ``x`` is stored as it arrives (token tile ``t`` is used as soon as its tokens are
in); the gate and up passes of every ffn tile run over all token tiles, their rows become
``h`` in an on-chip buffer (``max_tokens x ffn``), then the down passes read ``h``. The
array never waits between tiles; it waits once per run for the last ``h`` rows before the
down passes, and for inputs and parameters as the counters show.
"""

import math

import numpy as np
from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out, connect
from amaranth.utils import bits_for

from ..golden.device import activation_bytes, x_words
from ..golden.expert import FACTOR_BITS
from .array import SparseSystolicArray, check_shape, required_acc_bits, step_bits
from .epilogue import Epilogue, Projection
from .memory import UNCHECKED, StreamSlice, registered_read_port
from .params import check_int, reject
from .requant import SHIFT_BITS

__all__ = ["COUNTERS", "ExpertEngine", "activation_words", "counter_layout", "expert_output_layout"]

#: Performance counters, each 32 bits, cleared when a run starts (see :class:`ExpertEngine`).
COUNTERS = ("busy", "steps", "stall_weights", "stall_activations", "stall_output")


def counter_layout():
    return data.StructLayout({name: unsigned(32) for name in COUNTERS})


def expert_output_layout(cols, act_width, max_tokens, hidden):
    """Payload of the engine's ``y`` stream."""
    return data.StructLayout({
        "values": data.ArrayLayout(signed(act_width), cols),
        "token": unsigned(bits_for(max_tokens - 1)),
        "channel": unsigned(bits_for(hidden - 1)),
        "last": 1,
    })


def activation_words(x_q, tok_mult, tok_shift):
    """The ``x`` stream of ``T`` tokens: ``x_q [T, hidden]`` ints with their token factors
    (the words of :func:`moegen.golden.device.activation_bytes`)."""
    return np.frombuffer(activation_bytes(x_q, tok_mult, tok_shift), "<u4").tolist()


def result_width(act_width, weight_width, products, acc_width):
    """Bits of the engine's array results and epilogue input: those any sum of ``products``
    int products takes, whatever the values (-2**(w-1) included); the array and the epilogue
    need no more, the config's ``acc_width`` rule allows more."""
    exact = ((1 << (act_width + weight_width - 2)) * products).bit_length() + 1
    return max(8, min(acc_width, exact))


class ExpertEngine(wiring.Component):
    """Runs an int8 SwiGLU expert for ``T`` tokens on a :class:`SparseSystolicArray` and an
    :class:`~moegen.rtl.epilogue.Epilogue`, bit-exact with
    :func:`moegen.golden.expert.expert_int`.

    A run starts with a beat on ``run`` and ends when the ``y`` beat marked ``last`` is
    accepted; ``params``, ``weights`` and ``x`` carry exactly one run's worth each (see the
    module docstring for their formats). Counters restart with each run and hold afterwards:

    * ``busy``: cycles from the ``run`` beat to the final ``y`` beat, both included;
    * ``steps``: array steps (one per cycle at full speed);
    * ``stall_weights``: cycles with array steps left and no weight record offered;
    * ``stall_activations``: a weight record offered, no activation beat ready (tokens not
      yet in, or ``h`` not yet complete before the down passes);
    * ``stall_output``: both offered, the array held by its results path (result FIFO full
      behind the epilogue, which waits for ``params`` and for ``y``).

    ``busy`` minus the other four is the run's fill and drain.

    Parameters
    ----------
    rows, cols, m, n, act_width, weight_width, acc_width : int
        The array (:class:`~moegen.rtl.array.SparseSystolicArray`); ``acc_width`` must hold
        the longest dot product.
    hidden, ffn : int
        Expert shapes, 1..65535.
    max_tokens : int
        Largest ``T``, 1..65535; sizes the activation and ``h`` buffers.
    pipeline : bool
        Register slices (:class:`~moegen.rtl.memory.StreamSlice`) on the array's results and on
        ``y``, and the epilogue's activation register: no combinational path from ``y.ready``
        through the epilogue's stall into the array; three cycles more per run.

    Members
    -------
    run : ``In(stream.Signature(range(max_tokens + 1)))``
        Token count of the next run; taken only while idle.
    params : ``In(stream.Signature(32))``
        The expert's parameter words.
    weights : ``In(stream.Signature(step_bits))``
        Step records (``step_bits = cols * m * (weight_width + index bits)``).
    x : ``In(stream.Signature(32))``
        Token words.
    y : ``Out(stream.Signature(expert_output_layout(cols, act_width, max_tokens, hidden)))``
        Output rows; lanes past ``hidden`` are 0.
    busy : ``Out(1)``
        A run is in progress.
    refused : ``Out(1)``
        The last ``run`` beat asked for 0 or more than ``max_tokens`` tokens and was dropped
        (no run started, nothing consumed); cleared when a run starts.
    counters : ``Out(counter_layout())``
        The counters above, 32 bits each.
    """

    def __init__(self, *, rows, cols, m, n, hidden, ffn, max_tokens, act_width=8, weight_width=8, acc_width=32,
                 pipeline=True):
        check_shape(self, rows=rows, cols=cols, m=m, n=n, act_width=act_width, weight_width=weight_width,
                    acc_width=acc_width)
        self.hidden = check_int(self, "hidden", hidden, 1, 65535)
        self.ffn = check_int(self, "ffn", ffn, 1, 65535)
        self.max_tokens = check_int(self, "max_tokens", max_tokens, 1, 65535)
        self.pipeline = bool(pipeline)
        self.hidden_groups = -(-hidden // n)
        self.ffn_groups = -(-ffn // n)
        products = max(self.hidden_groups, self.ffn_groups) * m
        need = required_acc_bits(act_width, weight_width, products)
        if acc_width < need:
            reject(self, f"acc_width must be in {need}..32 to hold {products} products of {act_width}x{weight_width} "
                         f"bits, not {acc_width}")
        self.result_width = result_width(act_width, weight_width, products, acc_width)
        self.ffn_tiles = -(-ffn // cols)
        self.hidden_tiles = -(-hidden // cols)
        self.step_bits = step_bits(cols, m, n, weight_width)
        super().__init__({
            "run": In(stream.Signature(range(max_tokens + 1))),
            "params": In(stream.Signature(32)),
            "weights": In(stream.Signature(self.step_bits)),
            "x": In(stream.Signature(32)),
            "y": Out(stream.Signature(expert_output_layout(cols, act_width, max_tokens, hidden))),
            "busy": Out(1),
            "refused": Out(1),
            "counters": Out(counter_layout()),
        })

    @classmethod
    def from_config(cls, config):
        """The engine of an :class:`~moegen.AccelConfig`."""
        a, model = config.array, config.model
        return cls(rows=a.rows, cols=a.cols, m=a.m, n=a.n, act_width=a.act_width, weight_width=a.weight_width,
                   acc_width=a.acc_width, hidden=model.hidden, ffn=model.ffn, max_tokens=model.max_tokens,
                   pipeline=config.device.pipeline)

    def elaborate(self, platform):
        m = Module()
        rows, cols, n, aw = self.rows, self.cols, self.n, self.act_width
        token_tiles = -(-self.max_tokens // rows)

        # Buffers: one entry holds `width` consecutive values of every token lane of a token
        # tile; entries align with both the writes (x words of 4, h tiles of cols) and the
        # array's groups of n, so every write and every read touches one entry. Each memory has
        # at least two entries: one entry would make a zero-width address.
        x_width = max(4, n)
        x_entries = -(-max(4 * -(-self.hidden // 4), self.hidden_groups * n) // x_width)
        h_width = math.lcm(cols, n)
        h_entries = -(-max(self.ffn_tiles * cols, self.ffn_groups * n) // h_width)
        # Both in block RAM even when small: as flip-flops their lane write enables and read
        # multiplexers cost more than a block (the icebreaker preset: 2 x 32 and 8 x 8 bits, about 230
        # cells). No read meets a write to its entry (no_rw_check): a token tile is read once
        # all its tokens are in, h only in the down passes, after its last write.
        buffer = {"ram_style": "block", **UNCHECKED}
        m.submodules.x_buffer = x_buffer = Memory(shape=rows * x_width * aw, depth=max(2, token_tiles * x_entries),
                                                  init=[], attrs=buffer)
        m.submodules.h_buffer = h_buffer = Memory(shape=rows * h_width * aw, depth=max(2, token_tiles * h_entries),
                                                  init=[], attrs=buffer)

        tag = data.StructLayout({
            "address": range(max(2, token_tiles * h_entries)), "lane": range(max(2, rows)),
            "offset": range(max(2, h_width)), "final": 1})
        m.submodules.array = array = SparseSystolicArray(
            rows=rows, cols=cols, m=self.m, n=n, act_width=aw, weight_width=self.weight_width,
            acc_width=self.result_width)
        m.submodules.epilogue = epilogue = Epilogue(
            cols=cols, hidden=self.hidden, ffn=self.ffn, max_tokens=self.max_tokens, acc_width=self.result_width,
            act_width=aw, tag_width=tag.size, pipeline=self.pipeline)
        connect(m, wiring.flipped(self.weights), array.w)

        tokens = Signal(range(self.max_tokens + 1))
        running = Signal()
        taken = self.run.valid & self.run.ready
        counted = self.run.payload != 0
        if (1 << len(self.run.payload)) - 1 > self.max_tokens:
            counted &= self.run.payload <= self.max_tokens
        start = taken & counted
        m.d.comb += [self.run.ready.eq(~running), self.busy.eq(running), epilogue.start.eq(start)]
        with m.If(start):
            m.d.sync += [running.eq(1), tokens.eq(self.run.payload), self.refused.eq(0)]
        with m.If(taken & ~counted):
            m.d.sync += self.refused.eq(1)
        m.d.comb += [
            epilogue.params.payload.eq(self.params.payload),
            epilogue.params.valid.eq(self.params.valid & running),
            self.params.ready.eq(epilogue.params.ready & running),
        ]

        loaded = self._load_tokens(m, start, running, tokens, x_buffer, x_width, x_entries, epilogue)
        inputs_done, h_ready = Signal(), Signal()
        self._sequence(m, start, running, tokens, loaded, h_ready, inputs_done, x_buffer, x_width, x_entries,
                       h_buffer, h_width, h_entries, array)
        # with pipeline the array's results and the outputs pass register slices: the epilogue's
        # stall (from y.ready through the requantizer's stages) stops at them on both sides
        results = array.o
        if self.pipeline:
            m.submodules.results = results_slice = StreamSlice(array.o.payload.shape())
            connect(m, array.o, results_slice.i)
            results = results_slice.o
        self._track_results(m, start, tokens, results, epilogue, tag, h_entries, h_width)

        # h rows into the buffer; the final one releases the down passes.
        h_tag = data.View(tag, epilogue.h.payload.tag)
        h_write = h_buffer.write_port(granularity=aw)
        lanes = Const((1 << cols) - 1, cols)
        m.d.comb += [
            epilogue.h.ready.eq(1),
            h_write.addr.eq(h_tag.address),
            h_write.data.eq(Cat(*([epilogue.h.payload.values.as_value()] * (rows * h_width // cols)))),
            h_write.en.eq(Mux(epilogue.h.valid, lanes << (h_tag.lane * h_width + h_tag.offset), 0)),
        ]
        with m.If(epilogue.h.valid & h_tag.final):
            m.d.sync += h_ready.eq(1)

        y = self.y
        if self.pipeline:
            m.submodules.outputs = outputs = StreamSlice(self.y.payload.shape())
            connect(m, outputs.o, wiring.flipped(self.y))
            y = outputs.i
        y_tag = data.View(tag, epilogue.y.payload.tag)
        m.d.comb += [
            y.valid.eq(epilogue.y.valid),
            epilogue.y.ready.eq(y.ready),
            y.payload.values.eq(epilogue.y.payload.values),
            y.payload.token.eq(epilogue.y.payload.token),
            y.payload.channel.eq(epilogue.y.payload.channel),
            y.payload.last.eq(y_tag.final),
        ]
        with m.If(self.y.valid & self.y.ready & self.y.payload.last):
            m.d.sync += running.eq(0)

        # Counters: every cycle of a run is counted once in busy and at most once in the rest.
        offered_w, offered_a = array.w.valid, array.a.valid
        counting = running | start
        stalls = {
            "steps": array.a.valid & array.a.ready,
            "stall_weights": running & ~inputs_done & ~offered_w,
            "stall_activations": running & ~inputs_done & offered_w & ~offered_a,
            "stall_output": running & offered_w & offered_a & ~array.a.ready,
            "busy": counting,
        }
        for name, event in stalls.items():
            counter = self.counters[name]
            with m.If(start):
                m.d.sync += counter.eq(1 if name == "busy" else 0)
            with m.Elif(event):
                m.d.sync += counter.eq(counter + 1)
        with m.If(start):
            m.d.sync += h_ready.eq(0)
        return m

    def _load_tokens(self, m, start, running, tokens, x_buffer, x_width, x_entries, epilogue):
        """Store the x stream: factor words to the epilogue, activations into the buffer.
        Returns the count of tokens stored."""
        rows, aw = self.rows, self.act_width
        words_per_token = x_words(self.hidden)
        loaded = Signal(range(self.max_tokens + 1))
        lane = Signal(range(max(2, rows)))
        tile_base = Signal(range(x_buffer.depth + 1))
        word = Signal(range(words_per_token))
        entry = Signal(range(max(2, x_entries)))
        offset = Signal(range(x_width))
        took = self.x.valid & self.x.ready
        m.d.comb += self.x.ready.eq(running & (loaded != tokens))

        m.d.comb += [
            epilogue.factors.valid.eq(took & (word == 0)),
            epilogue.factors.payload.token.eq(loaded),
            epilogue.factors.payload.factor.mult.eq(self.x.payload[:FACTOR_BITS]),
            epilogue.factors.payload.factor.shift.eq(self.x.payload[16:16 + SHIFT_BITS]),
        ]
        x_write = x_buffer.write_port(granularity=aw)
        values = Cat(*(self.x.payload[8 * b:8 * b + aw] for b in range(4)))
        m.d.comb += [
            x_write.addr.eq(tile_base + entry),
            x_write.data.eq(Cat(*([values] * (rows * x_width // 4)))),
            x_write.en.eq(Mux(took & (word != 0), Const(0xF, 4) << (lane * x_width + offset), 0)),
        ]
        with m.If(took):
            with m.If(word == words_per_token - 1):
                m.d.sync += [word.eq(0), entry.eq(0), offset.eq(0), loaded.eq(loaded + 1)]
                with m.If(lane == rows - 1):
                    m.d.sync += [lane.eq(0), tile_base.eq(tile_base + x_entries)]
                with m.Else():
                    m.d.sync += lane.eq(lane + 1)
            with m.Else():
                m.d.sync += word.eq(word + 1)
                with m.If(word != 0):
                    with m.If(offset == x_width - 4):
                        m.d.sync += [offset.eq(0), entry.eq(entry + 1)]
                    with m.Else():
                        m.d.sync += offset.eq(offset + 4)
        with m.If(start):
            m.d.sync += [loaded.eq(0), lane.eq(0), tile_base.eq(0), word.eq(0), entry.eq(0), offset.eq(0)]
        return loaded

    def _sequence(self, m, start, running, tokens, loaded, h_ready, inputs_done, x_buffer, x_width, x_entries,
                  h_buffer, h_width, h_entries, array):
        """Issue the array's activation beats in weight-stream order, reading x or h."""
        rows, n, aw = self.rows, self.n, self.act_width
        phase = Signal(Projection)
        tile = Signal(range(max(2, self.ffn_tiles, self.hidden_tiles)))
        base = Signal(range(self.max_tokens + rows))
        address = Signal(range(max(x_buffer.depth, h_buffer.depth) + 1))
        group = Signal(range(max(2, self.hidden_groups, self.ffn_groups)))
        entry = Signal(range(max(2, x_entries, h_entries)))
        part = Signal(range(max(2, max(x_width, h_width) // n)))
        finished = Signal()

        down = phase == Projection.DOWN
        groups = Mux(down, self.ffn_groups, self.hidden_groups)
        parts = Mux(down, h_width // n, x_width // n)
        stride = Mux(down, h_entries, x_entries)
        last_group = group == groups - 1
        last_token_tile = base + rows >= tokens
        ready = Mux(down, h_ready, (loaded == tokens) | (loaded >= base + rows))

        # A one-entry source: the read port holds its data while the beat waits.
        beat_valid = Signal()
        beat_last, beat_rows, beat_part, beat_down = Signal(), Signal(range(rows + 1)), Signal.like(part), Signal()
        advance = ~beat_valid | array.a.ready
        issue = running & ~finished & ready & advance
        x_read = registered_read_port(m, x_buffer, "x_read")
        h_read = registered_read_port(m, h_buffer, "h_read")
        m.d.comb += [x_read.addr.eq(address + entry), x_read.en.eq(advance),
                     h_read.addr.eq(address + entry), h_read.en.eq(advance)]
        with m.If(advance):
            m.d.sync += [
                beat_valid.eq(issue),
                beat_last.eq(last_group),
                beat_rows.eq(Mux(last_token_tile, tokens - base, rows)),
                beat_part.eq(part),
                beat_down.eq(down),
            ]
        payload = array.a.payload
        for r in range(rows):
            from_x = x_read.data.word_select(r, x_width * aw).word_select(beat_part, n * aw)
            from_h = h_read.data.word_select(r, h_width * aw).word_select(beat_part, n * aw)
            m.d.comb += payload.data[r].as_value().eq(Mux(beat_down, from_h, from_x))
        m.d.comb += [array.a.valid.eq(beat_valid), payload.last.eq(beat_last), payload.rows.eq(beat_rows)]

        with m.If(issue):
            with m.If(last_group):
                m.d.sync += [group.eq(0), entry.eq(0), part.eq(0)]
                with m.If(last_token_tile):
                    m.d.sync += [base.eq(0), address.eq(0)]
                    with m.Switch(phase):
                        with m.Case(Projection.GATE):
                            m.d.sync += phase.eq(Projection.UP)
                        with m.Case(Projection.UP):
                            with m.If(tile == self.ffn_tiles - 1):
                                m.d.sync += [phase.eq(Projection.DOWN), tile.eq(0)]
                            with m.Else():
                                m.d.sync += [phase.eq(Projection.GATE), tile.eq(tile + 1)]
                        with m.Case(Projection.DOWN):
                            with m.If(tile == self.hidden_tiles - 1):
                                m.d.sync += finished.eq(1)
                            with m.Else():
                                m.d.sync += tile.eq(tile + 1)
                with m.Else():
                    m.d.sync += [base.eq(base + rows), address.eq(address + stride)]
            with m.Else():
                m.d.sync += group.eq(group + 1)
                with m.If(part == parts - 1):
                    m.d.sync += [part.eq(0), entry.eq(entry + 1)]
                with m.Else():
                    m.d.sync += part.eq(part + 1)
        m.d.comb += inputs_done.eq(finished & ~beat_valid)
        with m.If(start):
            m.d.sync += [phase.eq(Projection.GATE), tile.eq(0), base.eq(0), address.eq(0), group.eq(0),
                         entry.eq(0), part.eq(0), finished.eq(0)]

    def _track_results(self, m, start, tokens, results, epilogue, tag, h_entries, h_width):
        """Label each result row (the array's ``results`` stream) with its projection, token
        and tile for the epilogue."""
        rows, cols = self.rows, self.cols
        kind = Signal(Projection)
        tile = Signal(range(max(2, self.ffn_tiles, self.hidden_tiles)))
        base = Signal(range(self.max_tokens + rows))
        h_base = Signal(range(-(-self.max_tokens // rows) * h_entries + 1))
        h_entry = Signal(range(h_entries + 1))
        h_offset = Signal(range(max(2, h_width)))
        beat = results.payload
        last_token_tile = base + rows >= tokens
        pass_end = beat.last & last_token_tile
        final = Mux(kind == Projection.UP, tile == self.ffn_tiles - 1,
                    (kind == Projection.DOWN) & (tile == self.hidden_tiles - 1)) & pass_end
        labels = data.View(tag, epilogue.i.payload.tag)
        m.d.comb += [
            epilogue.i.valid.eq(results.valid),
            results.ready.eq(epilogue.i.ready),
            epilogue.i.payload.acc.eq(beat.acc),
            epilogue.i.payload.kind.eq(kind),
            epilogue.i.payload.token.eq(base + beat.row),
            epilogue.i.payload.tile.eq(tile),
            labels.address.eq(h_base + h_entry),
            labels.lane.eq(beat.row),
            labels.offset.eq(h_offset),
            labels.final.eq(final),
        ]
        with m.If(results.valid & results.ready & beat.last):
            with m.If(last_token_tile):
                m.d.sync += [base.eq(0), h_base.eq(0)]
                with m.Switch(kind):
                    with m.Case(Projection.GATE):
                        m.d.sync += kind.eq(Projection.UP)
                    with m.Case(Projection.UP):
                        with m.If(tile == self.ffn_tiles - 1):
                            m.d.sync += [kind.eq(Projection.DOWN), tile.eq(0)]
                        with m.Else():
                            m.d.sync += [kind.eq(Projection.GATE), tile.eq(tile + 1)]
                            with m.If(h_offset == h_width - cols):
                                m.d.sync += [h_offset.eq(0), h_entry.eq(h_entry + 1)]
                            with m.Else():
                                m.d.sync += h_offset.eq(h_offset + cols)
                    with m.Case(Projection.DOWN):
                        m.d.sync += tile.eq(tile + 1)
            with m.Else():
                m.d.sync += [base.eq(base + rows), h_base.eq(h_base + h_entries)]
        with m.If(start):
            m.d.sync += [kind.eq(Projection.GATE), tile.eq(0), base.eq(0), h_base.eq(0), h_entry.eq(0),
                         h_offset.eq(0)]

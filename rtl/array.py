"""M:N structured-sparse systolic array: output-stationary, weights streamed down the columns.

Dataflow (decode-oriented: few tokens, weights read once per token tile)::

                 step record (cols x m (value, index) pairs)
                   |        |        |
                   v        v        v
    tokens  ---> PE(0,0)  PE(0,1)  PE(0,2) ...    a row of activations is broadcast along
    row 0        | w      | w      | w            its row; weights move one row down per
    (skew 0)     v        v        v              cycle (systolic), so row r works on step s
    row 1   ---> PE(1,0)  PE(1,1)  ...            at cycle t+r and its activations enter
    (skew 1)     ...                              through an r-cycle skew line

Each PE ``(r, c)`` owns the accumulator of token lane ``r`` and output channel ``c`` of the
tile in flight (output-stationary): per step it selects ``m`` of the row's ``n`` activations
by the stored indices, multiplies them with the ``m`` weights and adds the sum. A tile
(``cols`` output channels over the whole reduction) ends on the activation beat marked
``last``; row ``r`` finishes it one cycle after row ``r - 1``, so the rows drain one per cycle
through a row multiplexer into the result FIFO while the next tile is already accumulating
(the first step of a tile overwrites the accumulator instead of adding to it).
"""

from amaranth import Array, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from ..golden.formats import index_bits
from .memory import BlockFIFO
from .params import check_int, reject

__all__ = [
    "SUPPORTED_N",
    "SparseSystolicArray",
    "activation_layout",
    "check_shape",
    "required_acc_bits",
    "result_layout",
    "step_bits",
]

#: Group sizes the array supports (``n`` is a power of two; the config allows up to 16).
SUPPORTED_N = (1, 2, 4, 8, 16)


def activation_layout(rows, n, act_width):
    """Payload of the activation stream: one beat per array step.

    ``data[r]`` is the group of ``n`` activations of token lane ``r``; ``last`` marks the last
    step of a tile; ``rows`` (1..rows, read on the ``last`` beat) is how many token lanes
    hold tokens, so only those rows are drained.
    """
    return data.StructLayout({
        "data": data.ArrayLayout(data.ArrayLayout(signed(act_width), n), rows),
        "last": 1,
        "rows": unsigned(bits_for(rows)),
    })


def result_layout(rows, cols, acc_width):
    """Payload of the result stream: one beat per token lane of a finished tile.

    ``acc[c]`` is the dot product of output channel ``c`` of the tile, ``row`` the token lane
    and ``last`` marks the last drained row of the tile.
    """
    return data.StructLayout({
        "acc": data.ArrayLayout(signed(acc_width), cols),
        "row": unsigned(bits_for(rows - 1)),
        "last": 1,
    })


def required_acc_bits(act_width, weight_width, products):
    """Signed bits that hold any sum of ``products`` symmetric act x weight products (the
    config's rule for ``acc_width``)."""
    largest = ((1 << (act_width - 1)) - 1) * ((1 << (weight_width - 1)) - 1) * products
    return largest.bit_length() + 1


def _adder_tree(values):
    """Sum as a balanced tree (log depth for the timing of wide ``m``)."""
    while len(values) > 1:
        values = [values[i] + values[i + 1] if i + 1 < len(values) else values[i] for i in range(0, len(values), 2)]
    return values[0]


def step_bits(cols, m, n, weight_width):
    """Bits of one step record: ``cols * m`` (value, index) pairs."""
    return cols * m * (weight_width + index_bits(m, n))


def check_shape(owner, *, rows, cols, m, n, act_width, weight_width, acc_width):
    """Check an array's shape parameters and set them on ``owner`` (the array, or a block
    built around one); a bad value raises naming ``owner``'s class, the parameter and its
    range."""
    owner.rows = check_int(owner, "rows", rows, 1, 64)
    owner.cols = check_int(owner, "cols", cols, 1, 64)
    if type(n) is not int or n not in SUPPORTED_N:
        reject(owner, f"n must be one of {', '.join(map(str, SUPPORTED_N))}, not {n!r}")
    owner.n = n
    owner.m = check_int(owner, "m", m, 1, n)
    owner.act_width = check_int(owner, "act_width", act_width, 2, 8)
    owner.weight_width = check_int(owner, "weight_width", weight_width, 2, 8)
    owner.acc_width = check_int(owner, "acc_width", acc_width, 8, 32)


class SparseSystolicArray(wiring.Component):
    """An M:N structured-sparse output-stationary systolic array, bit-exact with
    :func:`moegen.golden.pack.sparse_matmul`.

    One *step* consumes one beat of each input stream together: a step record on ``w``
    (exactly :meth:`moegen.golden.pack.PackedMatrix.step_records`: ``cols*m`` weights, then
    ``cols*m`` indices) and a beat on ``a`` (one group of ``n`` activations per token lane).
    ``G`` consecutive steps, the last one marked on ``a``, form a tile: every PE ``(r, c)``
    computes ``sum over g, j of w[g, c, j] * a[g][r][index[g, c, j]]``. Indices must follow the
    packing contract (ascending, distinct): pair ``j`` may only select activation
    ``j .. n-m+j``, and the PE multiplexes only those.

    Throughput: one step per cycle whenever both inputs are valid. A tile's results leave as
    ``rows`` beats on ``o``, one per cycle, drained while the next tiles compute; a tile can
    end only when the result FIFO has room for its rows and at least ``rows`` cycles after the
    previous tile ended, so tiles shorter than their row count (``G < rows``) are limited by
    the drain, and a stalled ``o`` stalls the inputs only once the FIFO is full. With ``o``
    always ready and ``G >= rows`` the array never stalls.

    Latency: row ``r`` of a tile appears on ``o`` :attr:`latency` ``+ r`` cycles after the
    tile's last step was accepted (with ``o`` ready and nothing queued).

    Parameters
    ----------
    rows : int
        Token lanes R, 1..64.
    cols : int
        Output-channel lanes C, 1..64.
    m, n : int
        Sparsity: ``m`` weights kept in every group of ``n`` inputs; ``n`` in 1, 2, 4, 8, 16,
        ``m`` in 1..n (``m == n`` is dense: no indices, PE ``j`` uses activation ``j``).
    act_width, weight_width : int
        Bits of a signed activation and weight, 2..8.
    acc_width : int
        Bits of a signed accumulator, 8..32; sums wrap (the config checks the reduction fits).

    Members
    -------
    a : ``In(stream.Signature(activation_layout(rows, n, act_width)))``
        Activations, one beat per step; ``last`` ends a tile, ``rows`` (on that beat, 1..rows;
        other values are held to that range) counts the token lanes to drain.
    w : ``In(stream.Signature(cols * m * (weight_width + index_bits)))``
        Step records, one per step.
    o : ``Out(stream.Signature(result_layout(rows, cols, acc_width)))``
        Results, row by row.
    """

    def __init__(self, *, rows, cols, m, n, act_width=8, weight_width=8, acc_width=32):
        check_shape(self, rows=rows, cols=cols, m=m, n=n, act_width=act_width, weight_width=weight_width,
                    acc_width=acc_width)
        self.index_bits = index_bits(m, n)
        self.step_bits = step_bits(cols, m, n, weight_width)
        #: cycles from the P (multiply) stage to the A (accumulate) stage
        self._acc_stage = 1 if m == 1 else 2
        #: results FIFO depth: one tile's rows plus the rows still in flight to the consumer
        self.fifo_depth = rows + self._acc_stage + 6
        #: cycles from accepting a tile's last step to its row 0 on ``o``
        self.latency = self._acc_stage + 4
        super().__init__({
            "a": In(stream.Signature(activation_layout(rows, n, act_width))),
            "w": In(stream.Signature(self.step_bits)),
            "o": Out(stream.Signature(result_layout(rows, cols, acc_width))),
        })

    @classmethod
    def from_config(cls, config):
        """The array of an :class:`~moegen.AccelConfig`'s ``array`` section."""
        a = config.array
        return cls(rows=a.rows, cols=a.cols, m=a.m, n=a.n, act_width=a.act_width, weight_width=a.weight_width,
                   acc_width=a.acc_width)

    def elaborate(self, platform):
        m = Module()
        rows, cols, mm, n = self.rows, self.cols, self.m, self.n
        aw, ww, ib = self.act_width, self.weight_width, self.index_bits
        a = self.a.payload

        m.submodules.results = results = BlockFIFO(width=len(self.o.payload.as_value()), depth=self.fifo_depth)

        # Edge: a step is accepted when both streams offer one; a tile's last step also needs
        # FIFO room for its rows and a free drain (rows of two tiles never drain at once).
        tile_first = Signal(init=1)
        drain_spacing = Signal(range(max(2, rows)))
        credits = Signal(range(self.fifo_depth + 1), init=self.fifo_depth)
        tile_rows = Signal(bits_for(rows))  # a.rows, held to 1..rows so a bad beat cannot wedge the drain
        at_most = Mux(a.rows > rows, rows, a.rows) if (1 << len(a.rows)) - 1 > rows else a.rows
        m.d.comb += tile_rows.eq(Mux(a.rows == 0, 1, at_most))
        can_end = (drain_spacing == 0) & (credits >= tile_rows)
        fire = Signal()
        m.d.comb += [
            fire.eq(self.a.valid & self.w.valid & (~a.last | can_end)),
            self.a.ready.eq(fire),
            self.w.ready.eq(fire),
        ]
        ends = fire & a.last
        with m.If(fire):
            m.d.sync += tile_first.eq(a.last)
        with m.If(ends):
            m.d.sync += drain_spacing.eq(tile_rows - 1)
        with m.Elif(drain_spacing != 0):
            m.d.sync += drain_spacing.eq(drain_spacing - 1)
        popped = self.o.valid & self.o.ready
        m.d.sync += credits.eq(credits - Mux(ends, tile_rows, 0) + popped)

        # Step control, one stage per cycle: stage k is row k's multiply stage, so row r
        # accumulates with stage r + acc_stage.
        stages = rows + self._acc_stage
        valid = [Signal(name=f"step_valid_{k}") for k in range(stages)]
        first = [Signal(name=f"step_first_{k}") for k in range(stages)]
        m.d.sync += [valid[0].eq(fire), first[0].eq(tile_first)]
        for k in range(1, stages):
            m.d.sync += [valid[k].eq(valid[k - 1]), first[k].eq(first[k - 1])]
        ending = [Signal(name=f"tile_end_{k}") for k in range(self._acc_stage + 1)]
        end_rows = [Signal(bits_for(rows), name=f"tile_rows_{k}") for k in range(self._acc_stage + 1)]
        m.d.sync += [ending[0].eq(ends), end_rows[0].eq(tile_rows)]
        for k in range(1, self._acc_stage + 1):
            m.d.sync += [ending[k].eq(ending[k - 1]), end_rows[k].eq(end_rows[k - 1])]

        # Weights: decoded at the top, then one row down per cycle.
        weights = [[[Signal(signed(ww), name=f"w_{r}_{c}_{j}") for j in range(mm)] for c in range(cols)]
                   for r in range(rows)]
        indices = [[[Signal(ib, name=f"idx_{r}_{c}_{j}") for j in range(mm)] for c in range(cols)]
                   for r in range(rows)] if ib else None
        record = self.w.payload
        for c in range(cols):
            for j in range(mm):
                pair = c * mm + j
                m.d.sync += weights[0][c][j].eq(record[pair * ww:(pair + 1) * ww])
                if ib:
                    base = cols * mm * ww
                    m.d.sync += indices[0][c][j].eq(record[base + pair * ib:base + (pair + 1) * ib])
                for r in range(1, rows):
                    m.d.sync += weights[r][c][j].eq(weights[r - 1][c][j])
                    if ib:
                        m.d.sync += indices[r][c][j].eq(indices[r - 1][c][j])

        # Activations: row r meets its weights r cycles after row 0. Row 0 is registered; the
        # others go through a circular buffer (distributed RAM, not r registers) written at
        # the edge and read r entries behind the write pointer one cycle ahead, into a register
        # (a synchronous read port): the entry r + 1 behind it now, and no RAM read in front of
        # the multipliers (the ECP5 critical path when the read was combinational).
        depth = 1 << ceil_log2(rows + 1)
        write_at = Signal(range(depth))
        m.d.sync += write_at.eq(write_at + 1)
        acts = []
        for r in range(rows):
            if r == 0:
                row = Signal(n * aw, name="act_0")
                m.d.sync += row.eq(a.data[0].as_value())
            else:
                m.submodules[f"skew_{r}"] = skew = Memory(shape=n * aw, depth=depth, init=[])
                write, read = skew.write_port(), skew.read_port()
                m.d.comb += [write.addr.eq(write_at), write.data.eq(a.data[r].as_value()), write.en.eq(1),
                             read.addr.eq(write_at - r)]
                row = read.data
            acts.append([row[k * aw:(k + 1) * aw].as_signed() for k in range(n)])

        # PEs: select, multiply (P stage), sum the m products (S stage, m > 1), accumulate.
        product_width = aw + ww
        accs = [[Signal(signed(self.acc_width), name=f"acc_{r}_{c}") for c in range(cols)] for r in range(rows)]
        for r in range(rows):
            for c in range(cols):
                products = []
                for j in range(mm):
                    if ib:
                        # pair j of an ascending index list lies in j..n-m+j: clamp the rest
                        choices = [acts[r][min(max(k, j), n - mm + j)] for k in range(n)]
                        operand = Array(choices)[indices[r][c][j]]
                    else:
                        operand = acts[r][j]
                    product = Signal(signed(product_width), name=f"prod_{r}_{c}_{j}")
                    m.d.sync += product.eq(operand * weights[r][c][j])
                    products.append(product)
                if mm > 1:
                    total = Signal(signed(product_width + ceil_log2(mm)), name=f"sum_{r}_{c}")
                    m.d.sync += total.eq(_adder_tree(products))
                else:
                    total = products[0]
                stage = r + self._acc_stage
                with m.If(valid[stage]):
                    m.d.sync += accs[r][c].eq(Mux(first[stage], 0, accs[r][c]) + total)

        # Drain: row r of a tile is final one cycle after its accumulate stage saw the last step.
        draining = Signal()
        drain_row = Signal(range(max(2, rows)))
        drain_rows = Signal(bits_for(rows))
        drain_last = drain_row == drain_rows - 1
        trigger = ending[self._acc_stage]
        with m.If(trigger):
            m.d.sync += [draining.eq(1), drain_row.eq(0), drain_rows.eq(end_rows[self._acc_stage])]
        with m.Elif(draining):
            m.d.sync += drain_row.eq(drain_row + 1)
            with m.If(drain_last):
                m.d.sync += draining.eq(0)
        written = data.View(self.o.payload.shape(), results.w_data)
        row_values = Array(Cat(*accs[r]) for r in range(rows))
        m.d.comb += [
            results.w_en.eq(draining),
            written.acc.as_value().eq(row_values[drain_row]),
            written.row.eq(drain_row),
            written.last.eq(drain_last),
            self.o.payload.eq(results.r_data),
            self.o.valid.eq(results.r_rdy),
            results.r_en.eq(self.o.ready),
        ]
        return m

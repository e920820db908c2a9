"""Requantizer: integer accumulators to narrow integers by multiplier, shift, rounding, saturation."""

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..golden.quant import MAX_SHIFT, MULT_BITS
from .params import check_int

__all__ = ["Requantizer"]

SHIFT_BITS = MAX_SHIFT.bit_length()
#: Operand width of the iCE40's SB_MAC16 (16x16 bits; yosys splits wider products into tiles).
DSP_WIDTH = 16
#: At most this many accumulator bits above DSP_WIDTH are multiplied in logic (one AND row
#: each), not in two more multiplier tiles of a few rows.
LOGIC_ROWS = 4


def requant_input_layout(acc_width, lanes, mult_bits=MULT_BITS):
    """Payload of the requantizer's input stream: per lane an accumulator, multiplier, shift."""
    return data.StructLayout({
        "acc": data.ArrayLayout(signed(acc_width), lanes),
        "mult": data.ArrayLayout(unsigned(mult_bits), lanes),
        "shift": data.ArrayLayout(unsigned(SHIFT_BITS), lanes),
    })


class Requantizer(wiring.Component):
    """Requantize ``lanes`` accumulators per beat, bit-exact with
    :func:`moegen.golden.quant.requantize`:
    ``clamp((acc * mult + 2**(shift-1)) >> shift, -qmax, qmax)`` (round half up, symmetric
    saturation, no rounding term when ``shift == 0``).

    Fully pipelined: one beat per cycle; a beat accepted on ``i`` appears on ``o``
    :attr:`LATENCY` cycles later when ``o`` is ready. When ``o`` is stalled the whole pipeline
    holds (``i.ready`` follows ``o.ready``); ``o.valid`` never depends on ``o.ready``.

    Parameters
    ----------
    acc_width : int
        Bits of a signed accumulator, 2..32.
    out_width : int
        Bits of a signed result, 2..16; results saturate to ``±(2**(out_width-1) - 1)``.
    lanes : int
        Accumulators per beat, 1..64.
    mult_bits : int
        Bits of a multiplier, 1..31 (``MULT_BITS``, the golden model's range, unless the caller
        knows its multipliers are narrower).

    An accumulator of ``DSP_WIDTH + 1 .. DSP_WIDTH + LOGIC_ROWS`` bits is multiplied as its low
    ``DSP_WIDTH`` bits in multiplier tiles and its few high bits as shifted AND rows in logic:
    two SB_MAC16 fewer on an iCE40 for about 55 LUTs a row (the icebreaker preset: 3 rows).

    Members
    -------
    i : ``In(stream.Signature(requant_input_layout(acc_width, lanes, mult_bits)))``
        Accumulators with their multipliers (``< 2**mult_bits``) and shifts (``0..63``), per lane.
    o : ``Out(stream.Signature(data.ArrayLayout(signed(out_width), lanes)))``
        Requantized lanes.
    """

    LATENCY = 3

    def __init__(self, *, acc_width=32, out_width=8, lanes=1, mult_bits=MULT_BITS):
        self.acc_width = check_int(self, "acc_width", acc_width, 2, 32)
        self.out_width = check_int(self, "out_width", out_width, 2, 16)
        self.lanes = check_int(self, "lanes", lanes, 1, 64)
        self.mult_bits = check_int(self, "mult_bits", mult_bits, 1, MULT_BITS)
        super().__init__({
            "i": In(stream.Signature(requant_input_layout(acc_width, lanes, mult_bits))),
            "o": Out(stream.Signature(data.ArrayLayout(signed(out_width), lanes))),
        })

    def elaborate(self, platform):
        m = Module()
        qmax = (1 << (self.out_width - 1)) - 1
        advance = ~self.o.valid | self.o.ready
        m.d.comb += self.i.ready.eq(advance)

        product_width = self.acc_width + self.mult_bits
        # (p + 2**(s-1)) >> s == ((2p >> s) + 1) >> 1 for every shift s, 0 included (no bias
        # then): q = 2p >> s is rounded and saturated in out_width + 1 bits, which hold every q
        # that does not saturate (-2**out_width < q < 2**out_width - 1), so no wide add or
        # comparison is needed; the bits of q above those only tell whether it saturates
        window = self.out_width + 1
        valid = [Signal(name=f"valid_{stage}") for stage in (1, 2)]
        with m.If(advance):
            m.d.sync += [valid[0].eq(self.i.valid), valid[1].eq(valid[0]), self.o.valid.eq(valid[1])]

        for lane in range(self.lanes):
            product = Signal(signed(product_width), name=f"product_{lane}")
            shift_1 = Signal(SHIFT_BITS, name=f"shift1_{lane}")
            low = Signal(signed(window), name=f"low_{lane}")  # q's low bits
            beyond = Signal(name=f"beyond_{lane}")  # q does not fit the window: it saturates
            negative = Signal(name=f"negative_{lane}")
            # q fits the window when its bits from window - 1 up all copy the sign: the
            # shifter keeps the bits below that and reports whether any above differs
            shifted, lost = self._shift_window(m, Cat(C(0, 1), product), product[-1], shift_1, window - 1, lane)
            rounded = Signal(signed(window), name=f"rounded_{lane}")
            m.d.comb += rounded.eq((low + 1) >> 1)
            with m.If(advance):
                m.d.sync += [
                    product.eq(self._multiply(self.i.payload.acc[lane], self.i.payload.mult[lane])),
                    shift_1.eq(self.i.payload.shift[lane]),
                    low.eq(Cat(shifted, product[-1])),
                    beyond.eq(lost),
                    negative.eq(product[-1]),
                    self.o.payload[lane].eq(Mux(beyond, Mux(negative, -qmax, qmax),
                                                Mux(rounded > qmax, qmax, Mux(rounded < -qmax, -qmax, rounded)))),
                ]
        return m

    def _multiply(self, acc, mult):
        """``acc * mult``; a few accumulator bits above ``DSP_WIDTH`` as AND rows in logic
        (written as adds, so yosys keeps them out of the multiplier tiles)."""
        high = self.acc_width - DSP_WIDTH
        if not 0 < high <= LOGIC_ROWS:
            return acc * mult
        rows = [Mux(acc[DSP_WIDTH + row], mult, 0) << row for row in range(high)]
        upper = sum(rows[:-1], -rows[-1])  # the top bit weighs -2**(acc_width-1)
        return acc[:DSP_WIDTH] * mult + (upper << DSP_WIDTH)

    def _shift_window(self, m, doubled, sign, shift, window, lane):
        """``(doubled >> shift)`` (arithmetic) cut to its low ``window`` bits, and whether any bit
        above those differs from ``sign``. A barrel shifter from the largest step down, each
        step keeping only the bits the later steps can still bring into the window: a bit
        dropped by a step that does not shift lands above the window, so it only takes part
        in the saturation check."""
        value, lost = doubled, []
        for step in reversed(range(SHIFT_BITS)):
            distance = 1 << step
            keep = window + distance - 1
            if len(value) < keep + distance:
                value = Cat(value, sign.replicate(keep + distance - len(value)))
            dropped = value[keep:]  # unless this step shifts, then only value[keep + distance:]
            lost.append(Mux(shift[step], (value[keep + distance:] ^ sign.replicate(len(value) - keep - distance)).any(),
                            (dropped ^ sign.replicate(len(dropped))).any()))
            stage = Signal(keep, name=f"shift{distance}_{lane}")
            m.d.comb += stage.eq(Mux(shift[step], value[distance:distance + keep], value[:keep]))
            value = stage
        return value, Cat(*lost).any()

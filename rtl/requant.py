"""Requantizer: integer accumulators to narrow integers by multiplier, shift, rounding, saturation."""

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..golden.quant import MAX_SHIFT, MULT_BITS
from .params import check_int

__all__ = ["Requantizer"]

SHIFT_BITS = MAX_SHIFT.bit_length()


def requant_input_layout(acc_width, lanes):
    """Payload of the requantizer's input stream: per lane an accumulator, multiplier, shift."""
    return data.StructLayout({
        "acc": data.ArrayLayout(signed(acc_width), lanes),
        "mult": data.ArrayLayout(unsigned(MULT_BITS), lanes),
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

    Members
    -------
    i : ``In(stream.Signature(requant_input_layout(acc_width, lanes)))``
        Accumulators with their multipliers (``< 2**31``) and shifts (``0..63``), per lane.
    o : ``Out(stream.Signature(data.ArrayLayout(signed(out_width), lanes)))``
        Requantized lanes.
    """

    LATENCY = 3

    def __init__(self, *, acc_width=32, out_width=8, lanes=1):
        self.acc_width = check_int(self, "acc_width", acc_width, 2, 32)
        self.out_width = check_int(self, "out_width", out_width, 2, 16)
        self.lanes = check_int(self, "lanes", lanes, 1, 64)
        super().__init__({
            "i": In(stream.Signature(requant_input_layout(acc_width, lanes))),
            "o": Out(stream.Signature(data.ArrayLayout(signed(out_width), lanes))),
        })

    def elaborate(self, platform):
        m = Module()
        qmax = (1 << (self.out_width - 1)) - 1
        advance = ~self.o.valid | self.o.ready
        m.d.comb += self.i.ready.eq(advance)

        product_width = self.acc_width + MULT_BITS + 1
        # (p + 2**(s-1)) >> s == ((2p >> s) + 1) >> 1 for every shift s, 0 included (no bias
        # then): q = 2p >> s is rounded and saturated in out_width + 1 bits, which hold every q
        # that does not saturate (-2**out_width < q < 2**out_width - 1), so no wide add or
        # comparison is needed; the bits of q above those only tell whether it saturates
        window = self.out_width + 1
        doubled_width = product_width + 1
        valid = [Signal(name=f"valid_{stage}") for stage in (1, 2)]
        with m.If(advance):
            m.d.sync += [valid[0].eq(self.i.valid), valid[1].eq(valid[0]), self.o.valid.eq(valid[1])]

        for lane in range(self.lanes):
            product = Signal(signed(product_width), name=f"product_{lane}")
            shift_1 = Signal(SHIFT_BITS, name=f"shift1_{lane}")
            low = Signal(signed(window), name=f"low_{lane}")  # q's low bits
            beyond = Signal(name=f"beyond_{lane}")  # q does not fit the window: it saturates
            negative = Signal(name=f"negative_{lane}")
            doubled = Cat(C(0, 1), product).as_signed()
            # the bits of 2p that become q's bits from window - 1 up: all copies of the sign
            # unless q is beyond the window
            above = Signal(doubled_width, name=f"above_{lane}")
            m.d.comb += above.eq(C((1 << doubled_width) - (1 << (window - 1)), doubled_width) << shift_1)
            sign = product[-1].replicate(doubled_width)
            rounded = Signal(signed(window), name=f"rounded_{lane}")
            m.d.comb += rounded.eq((low + 1) >> 1)
            with m.If(advance):
                m.d.sync += [
                    product.eq(self.i.payload.acc[lane] * self.i.payload.mult[lane]),
                    shift_1.eq(self.i.payload.shift[lane]),
                    low.eq(doubled >> shift_1),
                    beyond.eq(((doubled.as_unsigned() ^ sign) & above).any()),
                    negative.eq(product[-1]),
                    self.o.payload[lane].eq(Mux(beyond, Mux(negative, -qmax, qmax),
                                                Mux(rounded > qmax, qmax, Mux(rounded < -qmax, -qmax, rounded)))),
                ]
        return m

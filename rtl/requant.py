"""Requantizer: integer accumulators to narrow integers by multiplier, shift, rounding, saturation."""

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..golden.quant import MAX_SHIFT, MULT_BITS
from .params import check_int

__all__ = ["Requantizer"]

SHIFT_BITS = MAX_SHIFT.bit_length()
#: shift bits applied in the second stage, the rest in the third
_FINE_BITS = 3


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
        sum_width = max(product_width, MAX_SHIFT) + 1  # product + round_bias, before any shift
        valid = [Signal(name=f"valid_{stage}") for stage in (1, 2)]
        with m.If(advance):
            m.d.sync += [valid[0].eq(self.i.valid), valid[1].eq(valid[0]), self.o.valid.eq(valid[1])]

        for lane in range(self.lanes):
            product = Signal(signed(product_width), name=f"product_{lane}")
            shift_1 = Signal(SHIFT_BITS, name=f"shift1_{lane}")
            # 2**(shift-1) for shift > 0: half of one output step, so ties round up
            round_bias = Signal(MAX_SHIFT, name=f"round_bias_{lane}")
            # the shift in two parts, (x >> lo) >> 8 * hi == x >> shift: the add and the low three
            # bits in stage 2, the high bits with the saturation in stage 3 (one long path was
            # the add and all six levels, the ECP5 critical path)
            partial = Signal(signed(sum_width), name=f"partial_{lane}")
            coarse = Signal(SHIFT_BITS - _FINE_BITS, name=f"coarse_{lane}")
            shifted = Signal(signed(sum_width), name=f"shifted_{lane}")
            shift_in = self.i.payload.shift[lane]
            m.d.comb += shifted.eq(partial >> Cat(C(0, _FINE_BITS), coarse))
            with m.If(advance):
                m.d.sync += [
                    product.eq(self.i.payload.acc[lane] * self.i.payload.mult[lane]),
                    shift_1.eq(shift_in),
                    round_bias.eq((1 << shift_in) >> 1),
                    partial.eq((product + round_bias) >> shift_1[:_FINE_BITS]),
                    coarse.eq(shift_1[_FINE_BITS:]),
                    self.o.payload[lane].eq(Mux(shifted > qmax, qmax, Mux(shifted < -qmax, -qmax, shifted))),
                ]
        return m

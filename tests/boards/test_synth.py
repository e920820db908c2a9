import pytest
from amaranth import Module, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from moegen.boards.synth import synthesize
from moegen.errors import UserError


class Multiplier(wiring.Component):
    """A registered 16x16 signed multiplier and a 24-bit counter: known resource needs."""

    a: In(signed(16))
    b: In(signed(16))
    p: Out(signed(32))
    count: Out(24)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += [self.p.eq(self.a * self.b), self.count.eq(self.count + 1)]
        return m


@pytest.mark.synth
@pytest.mark.parametrize("family", ["ecp5", "ice40"])
def test_counts_multipliers_and_flops(family):
    design = Multiplier()
    use = synthesize(design, name="mul16", family=family)
    assert use.dsps == 1  # one 16x16 product fits one MULT18X18D / SB_MAC16
    assert use.ffs >= 24  # the counter (the product register may be packed into the DSP)
    assert use.luts > 0 and use.brams == 0


def test_unknown_family_is_named():
    with pytest.raises(UserError, match="unknown FPGA family 'xc7'; known: ecp5, ice40"):
        synthesize(None, name="mul16", family="xc7")

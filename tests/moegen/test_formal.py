import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.hdl import Assert

from moegen.formal import assume_stream_input, free, reset_at_start, run_bmc


class Counter(Elaboratable):
    """A counter of accepted beats; ``bad`` asserts a value it reaches after five beats."""

    def __init__(self, bad):
        self.bad = bad

    def elaborate(self, platform):
        from amaranth.lib import stream

        m = Module()
        reset_at_start(m)
        port = stream.Signature(4).create()
        assume_stream_input(m, port)
        m.d.comb += port.ready.eq(free(1))
        count = Signal(4)
        with m.If(port.valid & port.ready):
            m.d.sync += count.eq(count + 1)
        m.d.comb += Assert(count != 5) if self.bad else Assert(count <= 10)
        return m


@pytest.mark.formal
def test_a_reachable_violation_fails_with_a_trace():
    result = run_bmc(Counter(bad=True), name="selftest-bad", depth=8)
    assert result.status == "FAIL" and result.failed and result.trace.exists()


@pytest.mark.formal
def test_a_property_that_holds_within_the_depth_passes():
    result = run_bmc(Counter(bad=False), name="selftest-good", depth=8)
    assert result.ok, result.log.read_text()[-2000:]

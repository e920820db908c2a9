"""The board top: clock, reset, the board's USB UART and the accelerator.

::

    oscillator ── PLL ──> sync clock         FTDI UART pins ── UARTBridge ── rx/tx ── Accelerator
    PLL not locked | reset button ──> ResetSynchronizer ──> sync reset (held at power-on)
    LED 0: the accelerator is busy (not ``idle``); LED 1: a framing error or an overrun was seen

The UART divisor is computed from the clock the PLL really makes, so the link runs at
``config.link.baud`` within :data:`moegen.rtl.uart.MAX_BAUD_ERROR`.
"""

import importlib

from amaranth import ClockDomain, ClockSignal, Elaboratable, Instance, Module, Signal
from amaranth.build import Attrs, Pins, Resource
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer
from amaranth.lib.wiring import connect

from ..rtl.uart import UARTBridge
from .clocks import plan_clock

__all__ = ["BoardTop", "board_platform"]

#: I/O standard of the extra pins of each family (``BoardSpec.tie_high``).
_IO_ATTRS = {"ecp5": {"IO_TYPE": "LVCMOS33"}, "ice40": {"IO_STANDARD": "SB_LVCMOS"}, "xc7": {"IOSTANDARD": "LVCMOS33"}}


def board_platform(spec):
    """A fresh amaranth-boards platform of ``spec`` (a :class:`~moegen.boards.BoardSpec`)."""
    module, name = spec.platform.split(":")
    platform = getattr(importlib.import_module(module), name)()
    platform.add_resources([Resource("tie_high", index, Pins(site, dir="o"), Attrs(**_IO_ATTRS[spec.family]))
                            for index, site in enumerate(spec.tie_high)])
    return platform


def _buffer(m, platform, direction, name, number):
    """An I/O buffer on the board's resource ``name`` ``number``, added to ``m``."""
    buffer = io.Buffer(direction, platform.request(name, number, dir="-"))
    m.submodules[f"{name}_{number}"] = buffer
    return buffer


class BoardTop(Elaboratable):
    """``design`` (an accelerator top: ``rx``, ``tx``, ``idle``) on the board ``spec``.

    Parameters
    ----------
    config : AccelConfig
        Gives the target clock and the UART's baud rate.
    spec : BoardSpec
    design : wiring.Component
        ``rx: In(stream.Signature(8))``, ``tx: Out(stream.Signature(8))``, ``idle: Out(1)``.

    Members
    -------
    clock : ClockPlan
        How the sync clock is made (:func:`~moegen.boards.clocks.plan_clock`).
    bridge : UARTBridge
    """

    def __init__(self, config, spec, design):
        self.config = config
        self.spec = spec
        self.design = design
        self.clock = plan_clock(spec.family, spec.osc_mhz, config.target.clock_mhz)
        self.bridge = UARTBridge.from_config(config, clock_hz=self.clock.mhz * 1e6)

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = sync = ClockDomain("sync")
        locked = self._clock(m, platform)
        if self.clock.primitive is not None and self.spec.family != "xc7":
            # nextpnr times the PLL output at this frequency (Vivado derives it from the MMCM)
            platform.add_clock_constraint(sync.clk, self.clock.mhz * 1e6)

        button = _buffer(m, platform, "i", *self.spec.reset)
        m.submodules.reset = ResetSynchronizer(~locked | button.i, domain="sync")

        m.submodules.bridge = bridge = self.bridge
        m.submodules.design = design = self.design
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = uart_rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = uart_tx = io.Buffer("o", uart.tx)
        m.d.comb += [bridge.pins.rx.eq(uart_rx.i), uart_tx.o.eq(bridge.pins.tx)]
        connect(m, bridge.rx, design.rx)
        connect(m, design.tx, bridge.tx)

        seen_error = Signal()
        with m.If(bridge.framing_error | bridge.overrun):
            m.d.sync += seen_error.eq(1)
        m.d.comb += [_buffer(m, platform, "o", "led", 0).o.eq(~design.idle),
                     _buffer(m, platform, "o", "led", 1).o.eq(seen_error)]
        for index in range(len(self.spec.tie_high)):
            m.d.comb += _buffer(m, platform, "o", "tie_high", index).o.eq(1)
        return m

    def _clock(self, m, platform):
        """Drives the sync clock; returns the signal that is high once it is stable."""
        plan, family = self.clock, self.spec.family
        params = {f"p_{name}": value for name, value in plan.params.items()}
        locked = Signal()
        if plan.primitive is None:
            m.d.comb += [ClockSignal("sync").eq(_buffer(m, platform, "i", platform.default_clk, 0).i), locked.eq(1)]
        elif family == "ecp5":
            clk = _buffer(m, platform, "i", platform.default_clk, 0).i
            m.submodules.pll = Instance(
                "EHXPLLL", **params,
                a_FREQUENCY_PIN_CLKI=f"{plan.input_mhz:g}", a_FREQUENCY_PIN_CLKOP=f"{plan.mhz:g}",
                a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
                i_CLKI=clk, i_CLKFB=ClockSignal("sync"), i_RST=0, i_STDBY=0, i_PHASESEL0=0, i_PHASESEL1=0,
                i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
                o_CLKOP=ClockSignal("sync"), o_LOCK=locked)
        elif family == "ice40":
            # the PLL takes the oscillator's pin itself (no I/O buffer in between)
            pin = platform.request(platform.default_clk, 0, dir="-")
            m.submodules.pll = Instance(
                "SB_PLL40_PAD", **params, i_PACKAGEPIN=pin.io, i_RESETB=1, i_BYPASS=0,
                o_PLLOUTGLOBAL=ClockSignal("sync"), o_LOCK=locked)
        else:
            clk = _buffer(m, platform, "i", platform.default_clk, 0).i
            feedback, out = Signal(), Signal()
            m.submodules.mmcm = Instance(
                "MMCME2_BASE", **params, i_CLKIN1=clk, i_CLKFBIN=feedback, i_RST=0, i_PWRDWN=0,
                o_CLKFBOUT=feedback, o_CLKOUT0=out, o_LOCKED=locked)
            m.submodules.bufg = Instance("BUFG", i_I=out, o_O=ClockSignal("sync"))
        return locked

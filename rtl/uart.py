"""UART (8N1) receiver, transmitter and the bridge between a board's UART pins and the byte
streams of the accelerator top (``docs/device.md``).

A bit lasts ``divisor`` clock cycles (:func:`uart_divisor` derives it from the clock and the
config's ``link.baud``). The line idles high; a frame is a low start bit, eight data bits
least significant first and a high stop bit.

The receiver passes the pin through a two-flip-flop synchronizer, waits half a bit after the
falling edge of the start bit, checks the start bit is still low (a shorter pulse is a glitch
and ignored) and then samples every bit in its middle, one bit time apart. It looks for the
next start bit right after sampling the stop bit, so a sender whose bits are up to about
``0.5 / 9.5`` (5%) shorter or longer than ``divisor`` cycles is received correctly, less the
synchronizer's and the divisor's rounding (the tests check ±2% at ``divisor`` 16). A low stop
bit is a framing error: the byte is discarded and the receiver waits for the line to return
high before it looks for a start bit again (a break holds it there).
"""

from amaranth import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out, connect, flipped

from .memory import BlockFIFO, stream_through
from .params import check_int

__all__ = ["MAX_BAUD_ERROR", "MIN_DIVISOR", "UARTBridge", "UARTReceiver", "UARTTransmitter", "pins_signature",
           "uart_divisor"]

#: Fewest clock cycles per bit: mid-bit sampling needs a middle.
MIN_DIVISOR = 4
#: Largest relative difference between the bit rate a divisor gives and the one asked for;
#: the far end's receiver tolerates the rest of the usual ±5% budget.
MAX_BAUD_ERROR = 0.02


def uart_divisor(clock_hz, baud):
    """Clock cycles per bit for ``baud`` at ``clock_hz``; a rate that cannot be met within
    :data:`MAX_BAUD_ERROR` (or needs fewer than :data:`MIN_DIVISOR` cycles) is an error."""
    divisor = round(clock_hz / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(f"{baud} baud needs at least {MIN_DIVISOR} cycles per bit; a {clock_hz / 1e6:g} MHz clock "
                         f"gives {clock_hz / baud:.2f}: lower link.baud or raise the clock")
    error = abs(clock_hz / divisor - baud) / baud
    if error > MAX_BAUD_ERROR:
        raise ValueError(f"{baud} baud at {clock_hz / 1e6:g} MHz: divisor {divisor} is {error:.1%} off, more than "
                         f"{MAX_BAUD_ERROR:.0%}; choose a baud near {clock_hz / divisor:.0f}")
    return divisor


def pins_signature():
    """A UART's two pins from the device's side: ``rx`` in, ``tx`` out, both idle high."""
    return wiring.Signature({"rx": In(1, init=1), "tx": Out(1, init=1)})


def _check_divisor(component, divisor):
    return check_int(component, "divisor", divisor, MIN_DIVISOR, 1 << 24)


class UARTReceiver(wiring.Component):
    """Receives 8N1 frames on ``rx`` (see the module docstring for the sampling).

    Parameters
    ----------
    divisor : int
        Clock cycles per bit, :data:`MIN_DIVISOR`..2**24.

    Members
    -------
    rx : ``In(1, init=1)``
        The pin (asynchronous; synchronized inside).
    o : ``Out(stream.Signature(8))``
        Received bytes. A byte is offered from the middle of its stop bit until accepted.
    framing_error : ``Out(1)``
        High for one cycle when a stop bit is low (the byte is discarded).
    overrun : ``Out(1)``
        High for one cycle when a byte arrives while the previous one still waits on ``o``
        (the new byte is discarded).
    """

    def __init__(self, *, divisor):
        self.divisor = _check_divisor(self, divisor)
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8)),
            "framing_error": Out(1),
            "overrun": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        line = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, line, init=1)

        timer = Signal(range(self.divisor))
        bits = Signal(range(8))
        shift = Signal(8)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"), m.If(~line):
                m.d.sync += timer.eq(self.divisor // 2 - 1)
                m.next = "START"
            with m.State("START"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(self.divisor - 1), bits.eq(0)]
                    with m.If(line):
                        m.next = "IDLE"  # a glitch, not a start bit
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(self.divisor - 1), shift.eq(Cat(shift[1:], line)), bits.eq(bits + 1)]
                    with m.If(bits == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(~line):
                        m.d.comb += self.framing_error.eq(1)
                        m.next = "BREAK"
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.comb += self.overrun.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(shift), self.o.valid.eq(1)]
                        m.next = "IDLE"
            with m.State("BREAK"), m.If(line):
                m.next = "IDLE"
        return m


class UARTTransmitter(wiring.Component):
    """Sends the bytes of ``i`` as 8N1 frames on ``tx``, back to back while bytes wait.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit, :data:`MIN_DIVISOR`..2**24.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Bytes to send. ``ready`` is high while the line is idle and in the last cycle of a
        stop bit, so consecutive frames have no gap.
    tx : ``Out(1, init=1)``
        The pin.
    """

    def __init__(self, *, divisor):
        self.divisor = _check_divisor(self, divisor)
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        busy = Signal()
        timer = Signal(range(self.divisor))
        left = Signal(range(10))  # bits still to send after the one on the line
        shift = Signal(9)  # data bits then the stop bit
        last = Signal()
        m.d.comb += [last.eq(busy & (timer == 0) & (left == 0)), self.i.ready.eq(~busy | last)]
        with m.If(busy):
            m.d.sync += timer.eq(timer - 1)
            with m.If(timer == 0):
                with m.If(left == 0):
                    m.d.sync += busy.eq(0)
                with m.Else():
                    m.d.sync += [self.tx.eq(shift[0]), shift.eq(shift >> 1), left.eq(left - 1),
                                 timer.eq(self.divisor - 1)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [busy.eq(1), self.tx.eq(0), shift.eq(Cat(self.i.payload, 1)), left.eq(9),
                         timer.eq(self.divisor - 1)]
        return m


class UARTBridge(wiring.Component):
    """A UART pair as the byte streams of an accelerator top: ``rx`` carries what the host
    sends, ``tx`` what goes back. Received bytes wait in a FIFO of ``fifo_depth`` bytes, so a
    top that stops taking bytes for a while (the link endpoint while it answers) loses none
    of the next request.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit, :data:`MIN_DIVISOR`..2**24 (see :func:`uart_divisor`).
    fifo_depth : int
        Received bytes buffered, 1..4096.

    Members
    -------
    pins : ``Out(pins_signature())``
        The board's UART pins.
    rx : ``Out(stream.Signature(8))``
        Bytes from the host.
    tx : ``In(stream.Signature(8))``
        Bytes to the host.
    framing_error, overrun : ``Out(1)``
        The receiver's one-cycle error pulses (an overrun here means the FIFO was full).
    """

    def __init__(self, *, divisor, fifo_depth=64):
        self.divisor = _check_divisor(self, divisor)
        self.fifo_depth = check_int(self, "fifo_depth", fifo_depth, 1, 4096)
        super().__init__({
            "pins": Out(pins_signature()),
            "rx": Out(stream.Signature(8)),
            "tx": In(stream.Signature(8)),
            "framing_error": Out(1),
            "overrun": Out(1),
        })

    @classmethod
    def from_config(cls, config, *, clock_hz=None, fifo_depth=64):
        """The bridge for ``config.link.baud`` at ``clock_hz`` (default: the config's target clock)."""
        hz = config.target.clock_mhz * 1e6 if clock_hz is None else clock_hz
        try:
            divisor = uart_divisor(hz, config.link.baud)
        except ValueError as error:
            raise ValueError(f"link.baud: {error}") from None
        return cls(divisor=divisor, fifo_depth=fifo_depth)

    def elaborate(self, platform):
        m = Module()
        m.submodules.receiver = receiver = UARTReceiver(divisor=self.divisor)
        m.submodules.transmitter = transmitter = UARTTransmitter(divisor=self.divisor)
        m.submodules.fifo = fifo = BlockFIFO(width=8, depth=self.fifo_depth)
        stream_through(m, fifo, receiver.o, self.rx)
        m.d.comb += [
            receiver.rx.eq(self.pins.rx),
            self.pins.tx.eq(transmitter.tx),
            self.framing_error.eq(receiver.framing_error),
            self.overrun.eq(receiver.overrun),
        ]
        connect(m, flipped(self.tx), transmitter.i)
        return m


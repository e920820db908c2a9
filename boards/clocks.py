"""The board clock: PLL settings that turn a board's oscillator into the config's target clock.

One function per family searches the PLL's divider space the way the vendor tools and the
open ones (ecppll, icepll) do and returns the setting closest to the target, preferring a
VCO in the middle of its range. Ranges, from the data sheets:

* ECP5 ``EHXPLLL`` (feedback from CLKOP): PFD 3.125..400 MHz, VCO 400..800 MHz, output
  3.125..400 MHz; ``CLKI_DIV`` 1..128, ``CLKFB_DIV`` 1..80, ``CLKOP_DIV`` 1..128.
* iCE40 ``SB_PLL40_PAD`` (SIMPLE feedback): PFD 10..133 MHz, VCO 533..1066 MHz, output
  16..275 MHz; ``DIVR`` 0..15, ``DIVF`` 0..127, ``DIVQ`` 1..6.
* 7-series ``MMCME2_BASE`` (speed grade -1): PFD 10..450 MHz, VCO 600..1200 MHz;
  ``DIVCLK_DIVIDE`` 1..56, ``CLKFBOUT_MULT_F`` 2..64, ``CLKOUT0_DIVIDE_F`` 1..128 (integers here).

A target the PLL cannot reach within :data:`MAX_CLOCK_ERROR` is an error naming the nearest
clock it can make.
"""

from dataclasses import dataclass, field

from ..errors import UserError

__all__ = ["MAX_CLOCK_ERROR", "ClockPlan", "plan_clock"]

#: Largest relative difference between the clock a PLL makes and the target clock.
MAX_CLOCK_ERROR = 0.01


@dataclass(frozen=True)
class ClockPlan:
    """How the sync clock is made.

    Members
    -------
    primitive : str or None
        The PLL cell, or None when the oscillator is the clock.
    params : dict
        The cell's parameters (Instance ``p_`` names without the prefix).
    input_mhz, mhz, vco_mhz : float
        Oscillator, resulting clock and VCO frequencies.
    """

    primitive: str | None
    input_mhz: float
    mhz: float
    vco_mhz: float = 0.0
    params: dict = field(default_factory=dict)


def _best(candidates, target, vco_mid):
    """The candidate ``(fout, vco, dividers)`` closest to ``target``, then with the smallest
    input divider (``dividers[0]``: a higher PFD has less jitter), then the VCO nearest ``vco_mid``."""
    return min(candidates, key=lambda c: (round(abs(c[0] - target), 9), c[2][0], abs(c[1] - vco_mid)), default=None)


def _ecp5(fin, target):
    candidates = []
    for clki in range(1, 129):
        pfd = fin / clki
        if not 3.125 <= pfd <= 400:
            continue
        for fb in range(1, 81):
            fout = pfd * fb
            if not 3.125 <= fout <= 400:
                continue
            # the output divider sets only the VCO: take the one nearest the middle of its range
            ops = [op for op in range(max(1, int(400 // fout)), min(128, int(800 // fout)) + 1)
                   if 400 <= fout * op <= 800]
            if ops:
                op = min(ops, key=lambda op: abs(fout * op - 600))
                candidates.append((fout, fout * op, (clki, fb, op)))
    best = _best(candidates, target, 600)
    if best is None:
        return None
    fout, vco, (clki, fb, op) = best
    params = {"CLKI_DIV": clki, "CLKFB_DIV": fb, "CLKOP_DIV": op, "CLKOP_CPHASE": op - 1, "CLKOP_FPHASE": 0,
              "CLKOP_ENABLE": "ENABLED", "FEEDBK_PATH": "CLKOP", "PLLRST_ENA": "DISABLED",
              "INTFB_WAKE": "DISABLED", "STDBY_ENABLE": "DISABLED", "DPHASE_SOURCE": "DISABLED",
              "OUTDIVIDER_MUXA": "DIVA", "OUTDIVIDER_MUXB": "DIVB", "OUTDIVIDER_MUXC": "DIVC",
              "OUTDIVIDER_MUXD": "DIVD"}
    return ClockPlan("EHXPLLL", fin, fout, vco, params)


def _ice40_filter_range(pfd):
    """``FILTER_RANGE`` for a PFD frequency in MHz (as icepll chooses it)."""
    for bound, value in ((17, 1), (26, 2), (44, 3), (66, 4), (101, 5)):
        if pfd < bound:
            return value
    return 6


def _ice40(fin, target):
    candidates = []
    for divr in range(16):
        pfd = fin / (divr + 1)
        if not 10 <= pfd <= 133:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533 <= vco <= 1066:
                continue
            for divq in range(1, 7):
                fout = vco / (1 << divq)
                if 16 <= fout <= 275:
                    candidates.append((fout, vco, (divr, divf, divq)))
    best = _best(candidates, target, 800)
    if best is None:
        return None
    fout, vco, (divr, divf, divq) = best
    params = {"FEEDBACK_PATH": "SIMPLE", "DIVR": divr, "DIVF": divf, "DIVQ": divq,
              "FILTER_RANGE": _ice40_filter_range(fin / (divr + 1))}
    return ClockPlan("SB_PLL40_PAD", fin, fout, vco, params)


def _xc7(fin, target):
    candidates = []
    for divclk in range(1, 57):
        pfd = fin / divclk
        if not 10 <= pfd <= 450:
            continue
        for mult in range(2, 65):
            vco = pfd * mult
            if not 600 <= vco <= 1200:
                continue
            div = min(128, max(1, round(vco / target)))
            candidates.append((vco / div, vco, (divclk, mult, div)))
    best = _best(candidates, target, 900)
    if best is None:
        return None
    fout, vco, (divclk, mult, div) = best
    params = {"CLKIN1_PERIOD": round(1000 / fin, 3), "DIVCLK_DIVIDE": divclk, "CLKFBOUT_MULT_F": float(mult),
              "CLKOUT0_DIVIDE_F": float(div), "BANDWIDTH": "OPTIMIZED"}
    return ClockPlan("MMCME2_BASE", fin, fout, vco, params)


_SEARCH = {"ecp5": _ecp5, "ice40": _ice40, "xc7": _xc7}


def plan_clock(family, input_mhz, target_mhz):
    """The :class:`ClockPlan` that makes ``target_mhz`` from a ``input_mhz`` oscillator on a
    ``family`` FPGA: the oscillator itself when it is the target, else a PLL."""
    if abs(input_mhz - target_mhz) <= 1e-9 * target_mhz:
        return ClockPlan(None, input_mhz, input_mhz)
    plan = _SEARCH[family](input_mhz, target_mhz)
    if plan is None or abs(plan.mhz - target_mhz) > MAX_CLOCK_ERROR * target_mhz:
        nearest = f"; the nearest it makes is {plan.mhz:.4g} MHz" if plan else ""
        raise UserError(f"target.clock_mhz {target_mhz:g}: the {family} PLL cannot make it from the "
                        f"{input_mhz:g} MHz oscillator within {MAX_CLOCK_ERROR:.0%}{nearest}")
    return plan

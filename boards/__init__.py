"""Board targets by name: the FPGA on each board, its resource budget and how a bitstream is
made for it.

The registry is data: the config validates ``target.board`` against it, the co-design flow
sizes hardware under its budget, and the bitstream builds (:mod:`moegen.boards.build`) look
up the amaranth-boards platform, the reset button and the toolchain here.
"""

from dataclasses import dataclass

from ..errors import UserError

__all__ = ["BOARDS", "BRAM_BLOCK_BITS", "MAX_SEED", "MAX_SEEDS", "SEEDS", "SPRAM_BITS", "BoardSpec",
           "add_seed_arguments", "get_board"]


@dataclass(frozen=True)
class BoardSpec:
    """An FPGA board.

    Members
    -------
    name : str
        Registry name (``target.board`` in a config).
    family, device, package : str
        FPGA family (``ecp5``, ``ice40``, ``xc7``), part and package.
    luts, ffs, dsps : int
        Logic cells (LUT4 or LUT6), flip-flops and hard multipliers.
    bram_bits : int
        Block RAM in bits.
    spram_bits : int
        Single-port large RAM in bits (iCE40 UltraPlus), 0 elsewhere.
    osc_mhz : float
        On-board oscillator frequency.
    toolchain : str
        ``yowasp`` (open flow from PyPI, builds bitstreams) or ``vendor`` (generate only).
    platform : str
        The amaranth-boards platform class, ``module:Class``.
    reset : tuple of (str, int)
        The resource (name, number) of the button that resets the accelerator.
    tie_high : tuple of str
        Pins driven high so other chips on the board leave the FPGA alone.
    """

    name: str
    family: str
    device: str
    package: str
    luts: int
    ffs: int
    dsps: int
    bram_bits: int
    spram_bits: int
    osc_mhz: float
    toolchain: str
    platform: str
    reset: tuple
    tie_high: tuple = ()

    @property
    def brams(self):
        """Block RAMs of the family's size (:data:`BRAM_BLOCK_BITS`)."""
        return self.bram_bits // BRAM_BLOCK_BITS[self.family]

    @property
    def sprams(self):
        """iCE40 UltraPlus single-port RAMs (:data:`SPRAM_BITS` each)."""
        return self.spram_bits // SPRAM_BITS


#: Placement seeds a build tries by default (``build_bitstream``'s ``seeds``, ``moegen
#: bitstream --seeds``), and the most it may be asked to: placement moves the iCE40 preset's
#: Fmax by about 2 MHz from one seed to the next (docs/boards.md)
SEEDS = 3
MAX_SEEDS = 16
#: The largest first seed (nextpnr's ``--seed`` is a C ``int``; the seeds tried follow it).
MAX_SEED = (1 << 31) - 1 - MAX_SEEDS


def add_seed_arguments(parser):
    """``--seed`` and ``--seeds`` of the commands that build bitstreams (``moegen bitstream``,
    ``moegen bench boards``), for ``build_bitstream``."""
    parser.add_argument("--seed", type=int, default=1, help="first nextpnr placement seed (default: 1)")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help=f"placement seeds tried until one meets timing (default: {SEEDS})")

#: Bits of one block RAM as yosys and nextpnr count them: ECP5 DP16KD (18 Kbit), iCE40 EBR
#: (4 Kbit), 7-series RAMB36.
BRAM_BLOCK_BITS = {"ecp5": 18_432, "ice40": 4_096, "xc7": 36_864}
#: Bits of one iCE40 UltraPlus SPRAM.
SPRAM_BITS = 262_144


BOARDS = {
    spec.name: spec
    for spec in (
        # Lattice LFE5U-85F: 83,640 LUT4, 156 18x18 multipliers, 208 EBR of 18 Kbit. FIRE1 resets;
        # the ESP32's GPIO0 (L2) is held high, or the ESP32 may reconfigure the FPGA.
        BoardSpec("ulx3s-85f", "ecp5", "LFE5U-85F", "CABGA381", 83_640, 83_640, 156, 208 * BRAM_BLOCK_BITS["ecp5"], 0,
                  25.0, "yowasp", "amaranth_boards.ulx3s:ULX3S_85F_Platform", ("button_fire", 0), ("L2",)),
        # Lattice iCE40UP5K: 5,280 LUT4, 8 SB_MAC16, 30 EBR of 4 Kbit, 4 SPRAM of 256 Kbit; the user button resets
        BoardSpec("icebreaker", "ice40", "iCE40UP5K", "SG48", 5_280, 5_280, 8, 30 * BRAM_BLOCK_BITS["ice40"],
                  4 * SPRAM_BITS, 12.0, "yowasp", "amaranth_boards.icebreaker:ICEBreakerPlatform", ("button", 0)),
        # Xilinx XC7A35T: 20,800 LUT6, 41,600 FF, 90 DSP48E1, 50 BRAM36; the RESET button resets
        BoardSpec("arty-a7-35", "xc7", "XC7A35T", "CSG324", 20_800, 41_600, 90, 50 * BRAM_BLOCK_BITS["xc7"], 0,
                  100.0, "vendor", "amaranth_boards.arty_a7:ArtyA7_35Platform", ("rst", 0)),
    )
}


def get_board(name):
    """The :class:`BoardSpec` called ``name``; an unknown name is an error listing the known ones."""
    try:
        return BOARDS[name]
    except KeyError:
        raise UserError(f"unknown board {name!r}; known boards: {', '.join(BOARDS)}") from None

"""Synthesize an Amaranth component with YoWASP yosys and count the FPGA resources it uses.

Used by benchmarks (area of a block) and by the co-design flow's resource model checks;
full bitstream builds live with the board targets. Results are cached in
``build/synth/<family>-<name>-<hash>/`` keyed by the RTLIL and the script.

Counting, per family (cells after technology mapping, before place and route):

* ``ecp5``: ``luts`` = LUT4 + 2 per CCU2C (a carry cell is two LUT4 slices) + 4 per
  TRELLIS_DPR16X4 (distributed RAM); ``ffs`` = TRELLIS_FF; ``dsps`` = MULT18X18D;
  ``brams`` = DP16KD + PDPW16KD.
* ``ice40``: ``luts`` = SB_LUT4; ``ffs`` = SB_DFF*; ``dsps`` = SB_MAC16;
  ``brams`` = SB_RAM40_4K; SB_SPRAM256KA are reported as ``sprams``.

YoWASP notes, measured here: absolute ``/tmp`` paths are remapped inside the WASM sandbox,
so yosys runs with relative paths from the work folder; its stdout stops after ABC runs, so
results are read from files (``-l`` log, ``tee -o`` statistics).
"""

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field

from amaranth.back import rtlil

from ..errors import UserError
from ..simulation import build_root
from ..toolchain import yosys_command

__all__ = ["FAMILIES", "ResourceUse", "synthesize"]

FAMILIES = {
    "ecp5": {
        "script": "synth_ecp5 -top {top}",
        "count": {
            "luts": {"LUT4": 1, "CCU2C": 2, "TRELLIS_DPR16X4": 4},
            "ffs": {"TRELLIS_FF": 1},
            "dsps": {"MULT18X18D": 1},
            "brams": {"DP16KD": 1, "PDPW16KD": 1},
        },
    },
    "ice40": {
        # -dff: ABC9 maps the flip-flops with the logic (it merges equivalent ones and drops
        # constant ones): the accelerator of configs/icebreaker.yaml packs 5,101 logic cells
        # of the UP5K's 5,280 with it, 5,313 without (docs/boards.md)
        "script": "synth_ice40 -dsp -dff -top {top}",
        "count": {
            "luts": {"SB_LUT4": 1},
            "ffs": {"SB_DFF": 1, "SB_DFFE": 1, "SB_DFFSR": 1, "SB_DFFSS": 1, "SB_DFFESR": 1, "SB_DFFESS": 1,
                    "SB_DFFR": 1, "SB_DFFS": 1, "SB_DFFER": 1, "SB_DFFES": 1},
            "dsps": {"SB_MAC16": 1},
            "brams": {"SB_RAM40_4K": 1},
            "sprams": {"SB_SPRAM256KA": 1},
        },
    },
}


@dataclass(frozen=True)
class ResourceUse:
    """Resources of one synthesized design.

    Members
    -------
    family : str
    luts, ffs, dsps, brams, sprams : int
        Counted as in the module docstring.
    cells : dict
        Every cell type and its count.
    seconds : float
        Synthesis time (0 when the cached result was used).
    """

    family: str
    luts: int
    ffs: int
    dsps: int
    brams: int
    sprams: int = 0
    cells: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self):
        return {"luts": self.luts, "ffs": self.ffs, "dsps": self.dsps, "brams": self.brams, "sprams": self.sprams}


def synthesize(component, *, name, family="ecp5", timeout_s=1800):
    """Synthesize ``component`` as module ``name`` for ``family``; returns :class:`ResourceUse`."""
    if family not in FAMILIES:
        raise UserError(f"unknown FPGA family {family!r}; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    text = rtlil.convert(component, name=name, emit_src=False)
    script = f"read_rtlil design.il; {spec['script'].format(top=name)}; tee -q -o stat.json stat -json"
    key = hashlib.sha256((text + script).encode()).hexdigest()[:16]
    work = build_root() / "synth" / f"{family}-{name}-{key}"
    stat = work / "stat.json"
    seconds = 0.0
    if not stat.exists():
        work.mkdir(parents=True, exist_ok=True)
        (work / "design.il").write_text(text)
        start = time.monotonic()
        proc = subprocess.run([*yosys_command(), "-q", "-l", "synth.log", "-p", script], cwd=work,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        seconds = time.monotonic() - start
        if proc.returncode != 0 or not stat.exists():
            tail = (work / "synth.log").read_text()[-600:] if (work / "synth.log").exists() else proc.stderr
            raise RuntimeError(f"yosys synthesis of {name} for {family} failed; see {work / 'synth.log'}:\n{tail}")
    cells = json.loads(stat.read_text())["design"]["num_cells_by_type"]
    counts = {
        kind: sum(cells.get(cell, 0) * weight for cell, weight in weights.items())
        for kind, weights in spec["count"].items()
    }
    return ResourceUse(family, cells=dict(cells), seconds=seconds, **counts)

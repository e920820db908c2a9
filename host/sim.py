"""The simulated device: the accelerator top built into the C++ Verilator harness, and a
launcher for it (see docs/device.md, "Harness").

:func:`build` generates the stamped Verilog of the top and compiles it with the harness
(``harness/main.cpp``, and ``harness/harness.v`` around the top) into
``build/sim/<config name>-<key>/moegen-harness``. The key hashes the config hash, the
Verilog, the harness sources, the Verilator flags and the Verilator version; a build whose
key exists is reused. A build runs in ``<dir>.partial/`` (left there with its log when it
fails) and is renamed into place only when complete, under a file lock.

:func:`launch` starts a harness and returns a :class:`Harness` once it listens on its Unix
socket; drive it with :class:`moegen.host.link.LinkClient` over a ``socket`` transport.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from amaranth.back import verilog

from .. import __version__
from ..generate import stamp
from ..simulation import _locked, build_root
from ..toolchain import VERILATOR_LINT_FLAGS, find_verilator

__all__ = ["BINARY", "TOP_PORTS", "Harness", "HarnessError", "HarnessSummary", "accelerator", "build", "launch",
           "ram_verilog"]

#: Name of the harness executable in its build folder.
BINARY = "moegen-harness"
#: Verilog ports the harness drives (Amaranth's names for ``rx``, ``tx`` and ``idle``).
TOP_PORTS = ("clk", "rst", "rx__valid", "rx__payload", "rx__ready", "tx__valid", "tx__payload", "tx__ready", "idle")
_MODULE = "accelerator"
_HARNESS_FILES = ("main.cpp", "harness.v", "ram.v")
_VERILATOR_FLAGS = ("-O3", *VERILATOR_LINT_FLAGS)
_LISTENING = "moegen-harness listening on "
_SUMMARY = re.compile(r"moegen-harness: cycles=(\d+) wall_s=([\d.]+) idle_s=([\d.]+) cycles_per_s=(\d+)")


class HarnessError(RuntimeError):
    """The harness failed to build, start or run."""


def accelerator(config):
    """The top the harness is built around: :class:`moegen.rtl.top.Accelerator` with its
    device memory in the harness's Verilog RAM model (``ram.v``)."""
    from ..rtl.top import Accelerator

    return Accelerator(config, memory="harness")


def ram_verilog():
    """``{"ram.v": text}``: the Verilog RAM model of the harness's device memory, for other
    builds of ``Accelerator(config, memory="harness")`` (``run_cocotb(extra_sources=...)``)."""
    return {"ram.v": _harness_sources()["ram.v"]}


def _harness_sources():
    """``main.cpp``, ``harness.v`` (the model's top around :data:`_MODULE`) and ``ram.v``
    (device memory) by name."""
    folder = resources.files(__package__).joinpath("harness")
    return {name: folder.joinpath(name).read_text() for name in _HARNESS_FILES}


def _top_verilog(config, top):
    source = verilog.convert(top, name=_MODULE, emit_src=False)
    header = re.search(rf"^module {_MODULE}\((.*?)\);", source, re.MULTILINE | re.DOTALL)
    ports = {port.strip() for port in header[1].split(",")} if header else set()
    missing = [port for port in TOP_PORTS if port not in ports]
    if missing:
        raise ValueError(f"the harness top lacks the ports {', '.join(missing)}; it needs {', '.join(TOP_PORTS)} "
                         "(a component with rx: In(stream.Signature(8)), tx: Out(stream.Signature(8)), "
                         "idle: Out(1) and sync logic)")
    return stamp(config, f"harness top {_MODULE}") + source


def _defines(config):
    values = {"MOEGEN_CONFIG_NAME": config.name, "MOEGEN_CONFIG_SHA256": config.hash, "MOEGEN_VERSION": __version__}
    # Verilator writes -CFLAGS into a makefile whose recipe runs in a shell: quotes are escaped once.
    return " ".join(f'-D{key}=\\"{value}\\"' for key, value in values.items())


def _elapsed(start):
    return f"{time.monotonic() - start:.1f} s"


def build(config, *, top=None, progress=None):
    """The harness binary for ``config``, built if not already; returns its path.

    Parameters
    ----------
    config : AccelConfig
        Stamped into the Verilog and the binary (``--version``).
    top : wiring.Component or None
        The component to serve; ``None`` is :func:`accelerator` ``(config)``. It must have the
        ports in :data:`TOP_PORTS`.
    progress : callable or None
        Called with one line per stage (elapsed seconds included).
    """
    say = progress or (lambda line: None)
    tool = find_verilator()
    start = time.monotonic()
    source = _top_verilog(config, accelerator(config) if top is None else top)
    harness = _harness_sources()
    say(f"sim: Verilog of {_MODULE} for config {config.name} ({source.count(chr(10))} lines): {_elapsed(start)}")
    key_text = json.dumps([config.hash, source, harness, _VERILATOR_FLAGS, tool.origin, tool.version])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    root = build_root() / "sim"
    final = root / f"{config.name}-{key}"
    binary = final / BINARY
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{final.name}.lock"):
        if binary.exists():
            say(f"sim: {binary} is up to date (no rebuild)")
            return binary
        partial = final.with_name(f"{final.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        (partial / f"{_MODULE}.v").write_text(source)
        for name, text in harness.items():
            (partial / name).write_text(text)
        command = [str(tool.executable), "--cc", "--exe", "--build", *_VERILATOR_FLAGS,
                   "--build-jobs", str(os.cpu_count() or 1), "--prefix", "Vtop", "--top-module", "moegen_harness",
                   "--Mdir", "obj", "-o", BINARY, "-CFLAGS", _defines(config), "harness.v", "ram.v", f"{_MODULE}.v",
                   "main.cpp"]
        say(f"sim: verilating and compiling with Verilator {'.'.join(map(str, tool.version))} ({tool.origin}, "
            f"C++ -O3) in {partial}")
        stage = time.monotonic()
        log = partial / "build.log"
        with open(log, "w") as out:
            done = subprocess.run(command, cwd=partial, env=tool.env(opt="-O3"), stdout=out,
                                  stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise HarnessError(f"Verilator build failed (exit {done.returncode}); see {log}")
        os.replace(partial / "obj" / BINARY, partial / BINARY)
        shutil.rmtree(partial / "obj")
        shutil.rmtree(final, ignore_errors=True)  # only a folder whose binary was deleted
        os.rename(partial, final)
        say(f"sim: built {binary}: {_elapsed(stage)}")
    return binary


@dataclass(frozen=True)
class HarnessSummary:
    """What a harness reports when it stops.

    Members
    -------
    cycles : int
        Clock cycles run since reset.
    wall_s, idle_s : float
        Seconds since start, and seconds asleep while the top was idle.
    cycles_per_s : int
        Cycles per second while clocking (``wall_s - idle_s``).
    """

    cycles: int
    wall_s: float
    idle_s: float
    cycles_per_s: int

    @classmethod
    def parse(cls, text):
        """The summary in a harness's stderr, or ``None``."""
        match = _SUMMARY.search(text)
        if match is None:
            return None
        return cls(int(match[1]), float(match[2]), float(match[3]), int(match[4]))


def _exit_status(code):
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Harness:
    """A running harness process (see :func:`launch`); a context manager that stops it.

    Members
    -------
    socket : str
        The path of the Unix socket it listens on.
    process : subprocess.Popen
        The process; its stdout and stderr go to files in a private folder.
    """

    def __init__(self, process, socket, workdir):
        self.process = process
        self.socket = socket
        self._workdir = workdir
        self._summary = None
        self._stderr = None  # read once the process has exited

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _stderr_tail(self, lines=20):
        if self._stderr is None:
            self._stderr = (self._workdir / "stderr.log").read_text(errors="replace").strip()
        return " | ".join(self._stderr.splitlines()[-lines:]) if self._stderr else "(nothing on stderr)"

    def _died(self, when):
        return HarnessError(f"the harness (pid {self.process.pid}) {_exit_status(self.process.returncode)} {when}; "
                            f"stderr: {self._stderr_tail()}")

    def check(self):
        """Raise :class:`HarnessError` if the process has exited."""
        if self.process.poll() is not None:
            raise self._died("while running")

    def _await_listening(self, timeout):
        deadline = time.monotonic() + timeout
        stdout = self._workdir / "stdout.log"
        while _LISTENING not in stdout.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise self._died("before listening")
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise HarnessError(f"the harness did not listen on {self.socket} within {timeout:g} s; "
                                   f"stderr: {self._stderr_tail()}")
            time.sleep(0.01)

    def stop(self, timeout=10.0):
        """Stop the harness (SIGTERM) and return its :class:`HarnessSummary`.

        Raises :class:`HarnessError` if it had died, or does not stop within ``timeout``
        seconds (it is then killed). Stopping again returns the same summary.
        """
        if self._summary is not None:
            return self._summary
        stuck = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                stuck = True
                self.process.kill()
                self.process.wait()
        try:
            self._stderr_tail()
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)
        if stuck:
            raise HarnessError(f"the harness did not stop within {timeout:g} s of SIGTERM and was killed; "
                               f"stderr: {self._stderr_tail()}")
        if self.process.returncode != 0:
            raise self._died("before it was stopped")
        self._summary = HarnessSummary.parse(self._stderr)
        if self._summary is None:
            raise HarnessError(f"the harness stopped without a summary; stderr: {self._stderr_tail()}")
        return self._summary


def launch(target, *, socket=None, timeout=30.0, max_cycles=None, progress=None):
    """Start a harness and wait until it listens; returns a :class:`Harness`.

    Parameters
    ----------
    target : AccelConfig or path
        A config (its harness is built first, if needed) or a harness binary.
    socket : path or None
        Unix socket to listen on; ``None`` is a fresh one in a private temporary folder.
    timeout : float
        Seconds to wait for the harness to listen.
    max_cycles : int or None
        Stop after this many cycles.
    progress : callable or None
        Passed to :func:`build`.
    """
    binary = Path(target) if isinstance(target, str | os.PathLike) else build(target, progress=progress)
    workdir = Path(tempfile.mkdtemp(prefix="moegen-sim-"))
    socket = str(socket) if socket is not None else str(workdir / "harness.sock")
    command = [str(binary), "--socket", socket]
    if max_cycles is not None:
        command += ["--max-cycles", str(max_cycles)]
    try:
        with open(workdir / "stdout.log", "w") as out, open(workdir / "stderr.log", "w") as err:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    except OSError as error:
        shutil.rmtree(workdir, ignore_errors=True)
        raise HarnessError(f"cannot start the harness {binary}: {error.strerror}") from None
    harness = Harness(process, socket, workdir)
    try:
        harness._await_listening(timeout)
    except HarnessError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return harness

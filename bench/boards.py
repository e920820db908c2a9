"""Board builds: each open-toolchain board's preset built to a bitstream (``moegen bitstream``),
Fmax against the target clock, resources and build time. A build whose inputs did not change
is reused (its ``build_s`` is that of the build that ran)."""

import sys

from moegen.boards import add_seed_arguments

DESCRIPTION = "board bitstreams (YoWASP yosys + nextpnr): Fmax vs target, LUT/FF/DSP/BRAM, build seconds"


def add_arguments(parser):
    parser.add_argument("--board", action="append", help="only this board (repeatable; default: every yowasp board)")
    add_seed_arguments(parser)


def _row(report):
    used = {kind: value["used"] for kind, value in report.resources.items()}
    sync = min(report.clocks, key=lambda c: c["fmax_mhz"] / c["target_mhz"], default=None)
    return {
        "board": report.board, "config": report.config, "status": report.status,
        "fmax_mhz": sync["fmax_mhz"] if sync else None, "target_mhz": report.target_mhz,
        "luts": used.get("luts"), "ffs": used.get("ffs"), "dsps": used.get("dsps"), "brams": used.get("brams"),
        "build_s": report.build_s, "seed": report.seed,
    }


def _progress(line):
    print(line, file=sys.stderr, flush=True)  # stdout carries the figures (--json)


def run(args):
    from moegen.boards import BOARDS, get_board
    from moegen.boards.build import BuildFailed, build_bitstream
    from moegen.config import load_config

    names = args.board or [name for name, spec in BOARDS.items() if spec.toolchain == "yowasp"]
    rows = []
    for name in names:
        get_board(name)
        try:
            report = build_bitstream(load_config(name), name, seed=args.seed, seeds=args.seeds, progress=_progress)
        except BuildFailed as error:
            report = error.report
        rows.append(_row(report))
    return {"boards": rows}

"""The ``moegen`` command line.

Bad input (a config, a file, an argument) prints one ``moegen: error: ...`` line and exits
2; a verification mismatch exits 1.
"""

import argparse
import json
import sys

from . import __version__
from .boards import add_seed_arguments
from .errors import UserError

__all__ = ["main"]


def _config_check(args):
    from .config import load_config

    config = load_config(args.file)
    print(f"{args.file}: ok (config {config.name}, sha256 {config.hash[:16]}..., "
          f"device hash 0x{config.device_hash:08x})")
    return 0


def _config_show(args):
    from .config import load_config

    config = load_config(args.file)
    print(f"# sha256 {config.hash}\n# device hash 0x{config.device_hash:08x}")
    print(config.to_yaml(), end="")
    return 0


def _generate(args):
    from .config import load_config
    from .generate import generate

    config = load_config(args.config)
    for path in generate(config, args.out, args.block):
        print(path)
    return 0


def _verify(args):
    from .verify import run_block

    try:
        result, _, lines = run_block(args.block, args)
    except ValueError as error:
        raise UserError(str(error)) from None
    print("\n".join(lines))
    status = "PASS" if result.ok else "FAIL"
    print(f"{status}: {result.tests - result.failed}/{result.tests} cocotb tests passed "
          f"(build {result.build_s:.1f} s, simulation {result.run_s:.1f} s; log {result.log})")
    return 0 if result.ok else 1


def _bench(args):
    from .benchmarks import available, format_table, load

    if args.name is None:
        for name in available():
            print(f"{name:<12} {load(name).DESCRIPTION}")
        return 0
    figures = load(args.name).run(args)
    print(json.dumps(figures) if args.json else "\n".join(format_table(figures)))
    return 0


def _sim_binary(args):
    from .config import load_config
    from .host.sim import HarnessError, build

    config = load_config(args.config)
    try:
        return config, build(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except HarnessError as error:
        raise UserError(str(error)) from None


def _sim_build(args):
    print(_sim_binary(args)[1])
    return 0


def _sim_run(args):
    import os
    import tempfile

    config, binary = _sim_binary(args)
    socket = args.socket or os.path.join(tempfile.gettempdir(), f"moegen-{config.name}-{config.device_hash:08x}.sock")
    sys.stdout.flush()
    # the harness replaces this process: Ctrl-C and SIGTERM reach it directly, and it prints its summary
    os.execv(binary, [str(binary), "--socket", socket])


def _bitstream(args):
    from .boards.build import BuildFailed, build_bitstream
    from .config import PRESETS, load_config

    source = args.config or (args.board if args.board in PRESETS else None)
    if source is None:
        if args.board is None:
            raise UserError("give --board, --config or both")
        from .boards import get_board

        get_board(args.board)  # an unknown board lists the known ones
        raise UserError(f"board {args.board} has no preset config; give --config")
    config = load_config(source)
    try:
        report = build_bitstream(config, args.board, out=args.out, seed=args.seed, seeds=args.seeds,
                                 stop_after=args.stop_after and args.stop_after.replace("-", " "),
                                 progress=lambda line: print(line, flush=True))
    except BuildFailed as error:
        print("\n".join(error.report.table()))
        print(f"moegen: error: {error}", file=sys.stderr)
        return 1
    print("\n".join(report.table()))
    print(f"{report.status}: {report.directory} ({', '.join(report.files)})")
    return 0


def _compile(args):
    from pathlib import Path

    from .hls.flow import FlowOptions, compile_model

    options = FlowOptions(Path(args.model_dir), args.board, Path(args.out), args.calibration_bytes, args.heldout_bytes,
                          args.ppl_budget, args.host_experts, prune_method=args.prune_method,
                          recover_steps=args.recover_steps)
    compile_model(options, start=args.start, stop=args.stop,
                  progress=lambda line: print(f"moegen compile: {line}", file=sys.stderr, flush=True))
    print(Path(args.out) / "emit" if args.stop == "emit" else Path(args.out) / args.stop)
    return 0


def _parser():
    from .benchmarks import available, load
    from .verify import TARGETS

    parser = argparse.ArgumentParser(prog="moegen", description="MoE accelerator generator and co-design flow")
    parser.add_argument("--version", action="version", version=f"moegen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="check or show a config").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    check = config.add_parser("check", help="validate a config file or preset")
    check.add_argument("file", metavar="FILE", help="YAML file or preset name")
    check.set_defaults(func=_config_check)
    show = config.add_parser("show", help="print the resolved config and its hash")
    show.add_argument("file", metavar="FILE", help="YAML file or preset name")
    show.set_defaults(func=_config_show)

    gen = commands.add_parser("generate", help="write stamped Verilog for a config")
    gen.add_argument("--config", required=True, help="YAML file or preset name")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--block", action="append", help="generate only this block (repeatable)")
    gen.set_defaults(func=_generate)

    verify = commands.add_parser("verify", help="run a block on Verilator against golden").add_subparsers(
        dest="block", required=True, metavar="BLOCK")
    for target in TARGETS.values():
        sub = verify.add_parser(target.name, help=f"verify the {target.name} block")
        sub.add_argument("--config", default="default", help="YAML file or preset (default: default)")
        sub.add_argument("--seed", type=int, default=1, help="random seed")
        target.add_arguments(sub)
        sub.set_defaults(func=_verify)

    sim = commands.add_parser("sim", help="the accelerator on the Verilator harness").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sim_build = sim.add_parser("build", help="build the harness of a config (cached by content)")
    sim_build.add_argument("--config", required=True, help="YAML file or preset name")
    sim_build.set_defaults(func=_sim_build)
    sim_run = sim.add_parser("run", help="build if needed, then serve the device on a Unix socket until Ctrl-C")
    sim_run.add_argument("--config", required=True, help="YAML file or preset name")
    sim_run.add_argument("--socket", help="Unix socket path (default: moegen-NAME-HASH.sock in the temp folder)")
    sim_run.set_defaults(func=_sim_run)
    demo = sim.add_parser("demo", help="the main job (make sim): the demo model with cold experts on the simulated "
                                       "device, with a report")
    from .host import mainjob

    mainjob.add_arguments(demo)
    demo.set_defaults(func=mainjob.run)

    bitstream = commands.add_parser("bitstream", help="build a config for a board: bitstream, resource and timing "
                                    "report (vendor boards: project files)")
    bitstream.add_argument("--board", help="board name (default: the config's target.board)")
    bitstream.add_argument("--config", help="YAML file or preset (default: the board's preset)")
    bitstream.add_argument("--out", help="output folder (default: build/boards/BOARD/NAME-HASH16)")
    add_seed_arguments(bitstream)
    bitstream.add_argument("--stop-after", choices=("elaborate", "synthesize", "place-and-route"),
                           help="stop after this stage (no bitstream)")
    bitstream.set_defaults(func=_bitstream)

    flow = commands.add_parser("compile", help="co-design flow: a Hugging Face MoE model to a config and expert "
                               "images for a board")
    flow.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint folder")
    flow.add_argument("--board", required=True, help="board name")
    flow.add_argument("--out", required=True, help="output folder (one subfolder per step)")
    flow.add_argument("--from", dest="start", default="profile", metavar="STEP",
                      help="first step; earlier steps' results are read from --out")
    flow.add_argument("--until", dest="stop", default="emit", metavar="STEP", help="last step")
    flow.add_argument("--calibration-bytes", type=int, default=4096, help="corpus bytes of the profiling pass")
    flow.add_argument("--heldout-bytes", type=int, default=4096, help="held-out corpus bytes for choose-k")
    flow.add_argument("--ppl-budget", type=float, default=0.01, help="perplexity increase choose-k accepts (0.01: 1%%)")
    flow.add_argument("--host-experts", type=int, help="experts per layer on the host (default: a quarter)")
    flow.add_argument("--prune-method", default="sparsegpt", help="M:N pruning: magnitude, wanda or sparsegpt "
                      "(default: sparsegpt)")
    flow.add_argument("--recover-steps", type=int, default=0,
                      help="recovery fine-tune steps after pruning (default: 0, none)")
    flow.set_defaults(func=_compile)

    bench = commands.add_parser("bench", help="run a benchmark (no NAME: list them)")
    bench.set_defaults(func=_bench, name=None)
    benches = bench.add_subparsers(dest="name", metavar="NAME")
    for name in available():
        module = load(name)
        sub = benches.add_parser(name, help=module.DESCRIPTION)
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        module.add_arguments(sub)
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"moegen: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

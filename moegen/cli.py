"""The ``moegen`` command line.

Bad input (a config, a file, an argument) prints one ``moegen: error: ...`` line and exits
2; a verification mismatch exits 1.
"""

import argparse
import json
import sys

from . import __version__
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

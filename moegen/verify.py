"""``moegen verify BLOCK``: run a block's Verilog on Verilator against golden.

Each block registers a :class:`VerifyTarget`: how to add its CLI options, how to build the
component and testbench parameters from them (or from a config), and how to summarize the
testbench reports. Tests call :func:`run_block` with the same parameters.
"""

from dataclasses import dataclass

from .config import load_config
from .simulation import run_cocotb

__all__ = ["DEFAULT_PATTERNS", "TARGETS", "VerifyTarget", "run_block"]

#: (idle, stall) probabilities swept by default: happy path, idle source, backpressure, both.
DEFAULT_PATTERNS = ((0.0, 0.0), (0.4, 0.0), (0.0, 0.5), (0.5, 0.5))


@dataclass(frozen=True)
class VerifyTarget:
    """A block ``moegen verify`` knows.

    Members
    -------
    name : str
        CLI name.
    add_arguments : callable(parser)
        Adds the block's options (all optional; unset ones come from the config).
    elaborate : callable(args, config) -> (component, module name, testbench module, params)
    summarize : callable(params, reports) -> list of str
        Human-readable lines from the testbench reports.
    """

    name: str
    add_arguments: object
    elaborate: object
    summarize: object


def _requant_arguments(parser):
    parser.add_argument("--acc-width", type=int, help="accumulator bits (default: the config's array.acc_width)")
    parser.add_argument("--out-width", type=int, help="result bits (default: array.act_width)")
    parser.add_argument("--lanes", type=int, help="lanes per beat (default: array.cols)")
    parser.add_argument("--vectors", type=int, default=512, help="random beats on top of the adversarial set")


def _given(value, default):
    return default if value is None else value


def _requant_elaborate(args, config):
    from .rtl.requant import Requantizer

    params = {
        "acc_width": _given(args.acc_width, config.array.acc_width),
        "out_width": _given(args.out_width, config.array.act_width),
        "lanes": _given(args.lanes, config.array.cols),
        "vectors": args.vectors,
        "seed": args.seed,
        "patterns": [list(p) for p in DEFAULT_PATTERNS],
    }
    component = Requantizer(acc_width=params["acc_width"], out_width=params["out_width"], lanes=params["lanes"])
    return component, "requantizer", "moegen.rtl.testbench.requant", params


def _requant_summary(params, reports):
    head = (f"requantizer acc_width={params['acc_width']} out_width={params['out_width']} "
            f"lanes={params['lanes']}")
    lines = [head]
    for r in reports:
        if "idle" in r:
            lines.append(f"  idle {r['idle']:.1f} stall {r['stall']:.1f}: {r['received']}/{r['beats']} beats, "
                         f"{r['mismatches']} mismatches, {r['cycles']} cycles")
            lines += [f"    mismatch: {m}" for m in r["first_mismatches"]]
            lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
        else:
            lines.append(f"  latency {r['latency_cycles']} cycles, {r['beats']} beats in {r['span_cycles']} cycles")
    return lines


TARGETS = {
    target.name: target
    for target in (VerifyTarget("requant", _requant_arguments, _requant_elaborate, _requant_summary),)
}


def run_block(name, args):
    """Elaborate and simulate block ``name``; returns ``(SimResult, params, summary lines)``.

    ``args`` carries the block's options plus ``config`` (file or preset) and ``seed``;
    invalid parameters raise ``ValueError`` naming the parameter.
    """
    target = TARGETS[name]
    config = load_config(args.config)
    component, module, testbench, params = target.elaborate(args, config)
    result = run_cocotb(component, name=module, test_module=testbench, params=params, seed=args.seed)
    return result, params, target.summarize(params, result.reports)

"""Sparse against dense arrays with the same multipliers per PE, on one pruned expert GEMM.

The GEMM is the gate projection of the config's expert (``ffn x hidden``, int8, Gaussian
weights magnitude-pruned to 2:4 or 1:4 and quantized per channel) for ``rows`` tokens. Each
pair runs it on a dense array and on a sparse array with as many multipliers per PE: 2:2
against 2:4 and 1:1 against 1:4; the dense arrays multiply the pruned zeros too. Cycles come
from Verilator simulation (inputs always valid, results always taken): ``cycles`` from the
first step accepted to the last result, ``step_cycles`` from the first to the last step.

* speedup: dense cycles / sparse cycles (the limit is n/m);
* utilization: useful MACs (tokens x nonzero weights) / (cycles x rows x cols x m), on the
  steady-state tiles (``step_cycles``) and end to end; ``utilization`` is the 2:4 array's
  steady-state figure;
* area: yosys ``synth_ecp5`` LUT, FF and DSP counts of each array; ``area_overhead_*`` is the
  sparse array's LUT+FF over the dense one's, minus 1. Multipliers map to DSPs in both, so the
  overhead is the index multiplexers and the wider activation path alone.
"""

DESCRIPTION = "M:N sparse vs dense arrays with equal multipliers: cycles, speedup, utilization, ECP5 area"

PAIRS = {"2_4": ((2, 2), (2, 4)), "1_4": ((1, 1), (1, 4))}


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="array size, widths and model shapes (default: default)")
    parser.add_argument("--tokens", type=int, help="tokens in the GEMM (default: the array's rows)")
    parser.add_argument("--seed", type=int, default=0)


def _simulate(config, m, n, shape, prune, seed):
    from moegen.rtl.array import SparseSystolicArray
    from moegen.simulation import run_cocotb

    a = config.array
    widths = {"act_width": a.act_width, "weight_width": a.weight_width, "acc_width": a.acc_width}
    array = SparseSystolicArray(rows=a.rows, cols=a.cols, m=m, n=n, **widths)
    params = {"rows": a.rows, "cols": a.cols, "m": m, "n": n, **widths, "cases": [],
              "timing": {**shape, "seed": seed, "weights": "expert", "prune": list(prune)}}
    result = run_cocotb(array, name="sparse_systolic_array", test_module="moegen.rtl.testbench.array",
                        params=params, seed=seed, testcase="array_throughput")
    (report,) = [r for r in result.reports if "timing" in r]
    if not (result.ok and report["correct"]):
        raise RuntimeError(f"{m}:{n} array run failed; see {result.log}")
    return report


def _synthesize(config, m, n):
    from moegen.boards.synth import synthesize
    from moegen.rtl.array import SparseSystolicArray

    a = config.array
    array = SparseSystolicArray(rows=a.rows, cols=a.cols, m=m, n=n, act_width=a.act_width,
                                weight_width=a.weight_width, acc_width=a.acc_width)
    return synthesize(array, name=f"array_{a.rows}x{a.cols}_{m}_{n}", family="ecp5")


def run(args):
    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.rtl.testbench.array import make_case

    config = load_config(args.config)
    a = config.array
    tokens = a.rows if args.tokens is None else args.tokens
    if not 1 <= tokens <= 65535:
        raise UserError(f"--tokens must be in 1..65535, not {tokens}")
    shape = {"k_dim": config.model.hidden, "out_dim": config.model.ffn, "tokens": tokens}
    out = {"array": f"{a.rows}x{a.cols}", "gemm": f"{shape['out_dim']}x{shape['k_dim']} weights, {tokens} tokens"}
    figures = {}
    for label, (dense, sparse) in PAIRS.items():
        _, packed = make_case(m=sparse[0], n=sparse[1], cols=a.cols, seed=args.seed, weights="expert",
                              act_width=a.act_width, weight_width=a.weight_width, **shape)
        useful = tokens * int((packed.values != 0).sum())
        for m, n in (dense, sparse):
            report = _simulate(config, m, n, shape, sparse, args.seed)
            area = _synthesize(config, m, n)
            lanes = a.rows * a.cols * m
            figures[f"{m}_{n}"] = {
                "cycles": report["cycles"],
                "step_cycles": report["fire_span"],
                "steps": report["steps"],
                "useful_macs": useful,
                "utilization": useful / (report["fire_span"] * lanes),
                "utilization_end_to_end": useful / (report["cycles"] * lanes),
                "luts": area.luts,
                "ffs": area.ffs,
                "dsps": area.dsps,
            }
        d, s = figures[f"{dense[0]}_{dense[1]}"], figures[f"{sparse[0]}_{sparse[1]}"]
        out[f"speedup_{label}"] = d["cycles"] / s["cycles"]
        out[f"area_overhead_{label}"] = (s["luts"] + s["ffs"]) / (d["luts"] + d["ffs"]) - 1
    out["utilization"] = figures["2_4"]["utilization"]
    out["utilization_1_4"] = figures["1_4"]["utilization"]
    out["arrays"] = figures
    return out

"""The expert loader against its roofline, on the simulated device memory of a config.

A sequence of expert runs (one per image the memory holds) is run twice: the first round
finds no image verified and runs a verify pass per image, the second reruns verified images
(the decode loop). The consumer model takes one params word per cycle and one step record per
``slowdown`` cycles. Two settings:

* load-bound: one token tile per run, the consumer at full speed;
* compute-bound: ``--compute-tokens`` tokens per run and ``--slowdown``.

Roofline of a round: ``max(bytes / port bytes per cycle, compute cycles)`` with ``bytes`` what
one pass over each image must read (header, params and table words, tile records; the
loader's ``run_bytes``) and ``compute`` the consumer's own cycles (params words plus records
times the slowdown). Measured cycles run from the round's first command to its last
completion. ``port_utilization`` is the bytes received per cycle over the port's bytes per
cycle in the load-bound steady state.
"""

DESCRIPTION = "expert loader: cycles against the roofline, load- and compute-bound, port utilization"


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--compute-tokens", type=int, help="tokens per run when compute-bound (default: "
                        "model.max_tokens)")
    parser.add_argument("--slowdown", type=int, default=1, help="cycles per step record when compute-bound, 1..255")
    parser.add_argument("--seed", type=int, default=1)


def _round(report, loader, port_bytes):
    compute = report["params_words"] + report["records"] * report["slowdown"]
    needed = report["experts"] * loader.run_bytes
    roofline = max(needed / port_bytes, compute)
    return {
        "cycles": report["cycles"],
        "roofline_cycles": roofline,
        "roofline_ratio": report["cycles"] / roofline,
        "bytes_loaded": report["bytes_loaded"],
        "bytes_per_cycle": report["bytes_loaded"] / report["cycles"],
        "verify_passes": report["verify_passes"],
        "consumer_stall_cycles": report["stall_cycles"],
    }


def run(args):
    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.golden.formats import HEADER_SIZE
    from moegen.rtl.testbench.loader import Scenario, build_harness, geometry, harness_params
    from moegen.simulation import run_cocotb

    config = load_config(args.config)
    tokens = config.model.max_tokens if args.compute_tokens is None else args.compute_tokens
    if not 1 <= args.slowdown <= 255:
        raise UserError(f"--slowdown must be in 1..255, not {args.slowdown}")
    if not 1 <= tokens <= 65535:
        raise UserError(f"--compute-tokens must be in 1..65535, not {tokens}")
    params = harness_params(config, seed=args.seed)
    loader = geometry(params)
    slots = min(Scenario.slots_for(params), loader.verified_images)
    sequence = list(range(slots))
    params["settings"] = [
        {"name": "load_bound", "tokens": 1, "slowdown": 1, "rounds": [sequence, sequence]},
        {"name": "compute_bound", "tokens": tokens, "slowdown": args.slowdown, "rounds": [sequence, sequence]},
    ]
    result = run_cocotb(build_harness(params, consumer=True), name="loader_bench",
                        test_module="moegen.rtl.testbench.loader", params=params, testcase="loader_bench")
    if not result.ok or len(result.reports) != 4:
        raise RuntimeError(f"loader bench failed; see {result.log}")
    gate, down = loader.tile_counts
    records_per_tile_pass = 2 * gate * loader.groups[0] + down * loader.groups[1]
    for r, setting in zip(result.reports, [s for s in params["settings"] for _ in s["rounds"]], strict=True):
        passes = -(-setting["tokens"] // loader.rows)
        warm = r["round"] == 1
        expected = {
            "errors": 0,
            "params_words": slots * sum(loader.param_counts),
            "records": slots * records_per_tile_pass * passes,
            "bytes_loaded": slots * (HEADER_SIZE + loader.stream_bytes(setting["tokens"])
                                     + (0 if warm else loader.verify_bytes)),
            "verify_passes": 0 if warm else slots,
        }
        wrong = {k: (r[k], v) for k, v in expected.items() if r[k] != v}
        if wrong:
            raise RuntimeError(f"loader bench {r['setting']} round {r['round']}: (measured, expected) {wrong}")
    port_bytes = loader.port_bytes
    rounds = {f"{r['setting']}_{('cold', 'warm')[r['round']]}": _round(r, loader, port_bytes) for r in result.reports}
    load, compute = rounds["load_bound_warm"], rounds["compute_bound_warm"]
    return {
        "config": config.name,
        "experts_per_round": slots,
        "image_bytes": loader.layout.nbytes,
        "run_bytes": loader.run_bytes,
        "port_bytes_per_cycle": port_bytes,
        "compute_tokens": tokens,
        "slowdown": args.slowdown,
        "roofline_ratio_load_bound": load["roofline_ratio"],
        "roofline_ratio_compute_bound": compute["roofline_ratio"],
        "port_utilization": load["bytes_per_cycle"] / port_bytes,
        "roofline_ratio_load_bound_cold": rounds["load_bound_cold"]["roofline_ratio"],
        "roofline_ratio_compute_bound_cold": rounds["compute_bound_cold"]["roofline_ratio"],
        "rounds": rounds,
    }

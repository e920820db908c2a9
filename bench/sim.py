"""Simulation speed: the C++ Verilator harness against a cocotb testbench, same top, same work.

Both run the accelerator of a config (Verilator -O3) on the same
:class:`~moegen.rtl.testbench.device.Workload` (expert images, expert runs, routing, stored
accumulators), sent as link frames, and both check every output buffer against golden:

* harness: the host driver over the harness's Unix socket; cycles per second while the
  harness clocks (its own summary, idle sleep excluded);
* cocotb: :mod:`moegen.rtl.testbench.top`, a Python coroutine driving the link bytes each
  cycle.

Builds are cached (first run: minutes for the default config) and not timed.
"""

DESCRIPTION = "simulation speed: C++ Verilator harness vs cocotb on the same top and workload"


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--seed", type=int, default=1)


def run(args):
    from moegen.config import load_config
    from moegen.host.device import open_device
    from moegen.host.sim import build, launch, ram_verilog
    from moegen.rtl.testbench.device import Workload
    from moegen.rtl.top import Accelerator
    from moegen.simulation import run_cocotb

    config = load_config(args.config)
    work = Workload(config, seed=args.seed)
    with launch(build(config)) as harness:
        with open_device(config, "sim", address=harness.socket) as device:
            wrong = work.run_on(device)
            cycles = device.counters()["CYCLES"]
        summary = harness.stop()
    if wrong:
        raise RuntimeError(f"harness: output buffers at {wrong} differ from golden")
    text = config.to_yaml() if args.config not in ("default", "tiny") else args.config
    result = run_cocotb(Accelerator(config, memory="harness"), name="moegen_top",
                        test_module="moegen.rtl.testbench.top", extra_sources=ram_verilog(),
                        params={"config": text, "seed": args.seed, "errors": False, "idle": 0.0, "stall": 0.0})
    if not result.ok:
        raise RuntimeError(f"cocotb run failed; see {result.log}")
    (report,) = result.reports
    return {
        "config": config.name,
        "harness_cycles": cycles,
        "harness_cycles_per_s": summary.cycles_per_s,
        "cocotb_cycles": report["cycles"],
        "cocotb_cycles_per_s": report["cycles_per_s"],
        "ratio": summary.cycles_per_s / report["cycles_per_s"],
    }

"""Simulation speed: the C++ Verilator harness against a cocotb testbench, same top, same work.

Both run the accelerator of a config (Verilator -O3) on the same
:class:`~moegen.rtl.testbench.device.Workload` (expert images, expert runs, routing, stored
accumulators), sent as link frames, and both check every output buffer against golden:

* harness: the host driver over the harness's Unix socket runs the workload, then a
  compute-bound batch (8 runs of one expert on ``max_tokens`` tokens in one submission);
  cycles per second is the device's ``CYCLES`` over the wall time of that batch;
* cocotb: :mod:`moegen.rtl.testbench.top`, a Python coroutine driving the link bytes each
  cycle.

Builds are cached (first run: minutes for the default config) and not timed.
"""

DESCRIPTION = "simulation speed: C++ Verilator harness vs cocotb on the same top and workload"


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--seed", type=int, default=1)


def run(args):
    import time

    from moegen.config import load_config
    from moegen.golden.device import WEIGHT_ONE
    from moegen.golden.image import write_image
    from moegen.host.device import open_device, require_counters
    from moegen.host.sim import build, launch, ram_verilog
    from moegen.rtl.testbench.device import Workload, random_tokens
    from moegen.rtl.testbench.loader import make_expert
    from moegen.rtl.top import Accelerator
    from moegen.simulation import run_cocotb

    config = load_config(args.config)
    require_counters(config, "moegen bench sim")
    work = Workload(config, seed=args.seed)
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        wrong = work.run_on(device)
        device.reset()
        qe = make_expert(config.image_layout, args.seed)
        handle = device.upload_expert(write_image(qe, config_hash=config.device_hash, expert_id=0), expert=0)
        tokens = config.model.max_tokens
        x_q, mult, shift = random_tokens(config, tokens, args.seed)
        call = (handle, x_q, mult, shift, range(tokens), [WEIGHT_ONE] * tokens)
        before, start = device.counters()["CYCLES"], time.monotonic()
        device.run_experts([call] * 8, tokens)
        seconds, cycles = time.monotonic() - start, device.counters()["CYCLES"] - before
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
        "harness_cycles_per_s": cycles / seconds,
        "cocotb_cycles": report["cycles"],
        "cocotb_cycles_per_s": report["cycles_per_s"],
        "ratio": cycles / seconds / report["cycles_per_s"],
    }

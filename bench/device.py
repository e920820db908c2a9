"""Expert calls on the simulated device: cycles, link bytes, and modeled time per call.

One expert is uploaded to the Verilator harness of a config and run on 1, rows, and
max_tokens tokens (each call bit-exact against golden). Per call the device reports the
cycles its commands ran (``BUSY_CYCLES``) and the link client counts the bytes on the line.
Modeled time per call = cycles / target clock + link time, for two links:

* UART at ``config.link.baud`` (8N1: 10 bits per byte), one request after another;
* PCIe gen2 x1: 500 MB/s per direction after 8b/10b, taken at 80% for TLP overhead
  (400 MB/s), plus 1 us per request round trip.

The first call of an image includes its verify pass (the loader reads it twice); the table
shows the cold call and the warm calls that follow.
"""

DESCRIPTION = "device: cycles and link bytes per expert call, modeled time over UART and PCIe gen2 x1"

PCIE_BYTES_PER_S = 400e6
PCIE_ROUND_TRIP_S = 1e-6


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--seed", type=int, default=1)


def run(args):
    import torch

    from moegen.config import load_config
    from moegen.golden.expert import expert_int
    from moegen.golden.image import write_image
    from moegen.host.device import open_device, require_counters
    from moegen.host.sim import build, launch
    from moegen.rtl.testbench.device import random_tokens
    from moegen.rtl.testbench.loader import make_expert

    config = load_config(args.config)
    require_counters(config, "moegen bench device")
    clock_hz = config.target.clock_mhz * 1e6
    qe = make_expert(config.image_layout, args.seed)
    rows, most = config.array.rows, config.model.max_tokens
    sizes = sorted({1, min(rows, most), most})
    calls = []
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        stats = device.link.stats
        image = write_image(qe, config_hash=config.device_hash, expert_id=0)
        before = stats["bytes_out"] + stats["bytes_in"]
        handle = device.upload_expert(image, expert=0)
        upload_bytes = stats["bytes_out"] + stats["bytes_in"] - before
        for warm, tokens in [(False, sizes[0])] + [(True, t) for t in sizes]:
            x_q, mult, shift = random_tokens(config, tokens, args.seed + tokens)
            start = device.counters()
            requests, line = stats["requests"], stats["bytes_out"] + stats["bytes_in"]
            y = device.run_expert(handle, x_q, mult, shift)
            end = device.counters()
            requests = stats["requests"] - requests - 1  # the counters read is not part of the call
            line = stats["bytes_out"] + stats["bytes_in"] - line
            if not torch.equal(y, expert_int(x_q, mult, shift, qe)):
                raise RuntimeError(f"expert call on {tokens} tokens differs from golden")
            cycles = end["BUSY_CYCLES"] - start["BUSY_CYCLES"]
            compute_s = cycles / clock_hz
            calls.append({
                "call": "warm" if warm else "cold",
                "tokens": tokens,
                "device_cycles": cycles,
                "engine_busy": end["ENGINE_BUSY"] - start["ENGINE_BUSY"],
                "load_bytes": end["LOAD_BYTES"] - start["LOAD_BYTES"],
                "link_requests": requests,
                "link_bytes": line,
                "ms_uart": 1e3 * (compute_s + line * 10 / config.link.baud),
                "ms_pcie_gen2_x1": 1e3 * (compute_s + line / PCIE_BYTES_PER_S + requests * PCIE_ROUND_TRIP_S),
                "us_per_token_uart": 1e6 * (compute_s + line * 10 / config.link.baud) / tokens,
            })
    return {
        "config": config.name,
        "clock_mhz": config.target.clock_mhz,
        "uart_baud": config.link.baud,
        "image_bytes": len(image),
        "upload_link_bytes": upload_bytes,
        "upload_ms_uart": 1e3 * upload_bytes * 10 / config.link.baud,
        "calls": calls,
    }

"""Placement policies side by side on the demo model: decode time per token and bytes moved.

The demo model decodes ``--tokens`` bytes greedily after a prompt with each policy, the host
holding ``--hot`` of the 8 experts per layer (too few for all of them), cold experts on the
simulated device (Verilator harness, real cycle counts). Per policy and modeled link
(PCIe gen3 x4, UART 3 Mbaud): modeled decode time per token = the host's measured expert
compute + on-demand weight moves over the link + device cycles at the board clock +
activation bytes over the link (serialized: no overlap is assumed, which favours nothing).
``lru`` is the mixtral-offloading baseline (weights move into a host cache; no device).

JSON: ``speedup_vs_lru`` (lru's time over the best other policy's, PCIe), ``prefetch_recall``,
``hit_rate_lru``, ``hit_rate_best``, and per policy the figures.
"""

DESCRIPTION = "offload policies on the demo model: decode time per token, bytes moved, hit rates, recall"


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--hot", type=int, default=2, help="experts per layer on the host (default: 2)")
    parser.add_argument("--tokens", type=int, default=32, help="bytes to decode per policy (default: 32)")
    parser.add_argument("--prompt", default="import os\n\ndef main(", help="decode prompt")


def run(args):

    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.host.demo.model import calibration_ids, generate, load_demo
    from moegen.host.device import open_device
    from moegen.host.offload import offload
    from moegen.host.policies import LINKS, POLICIES
    from moegen.host.sim import build, launch

    if not 1 <= args.tokens <= 512:
        raise UserError(f"--tokens must be in 1..512, not {args.tokens}")
    config = load_config(args.config)
    model = load_demo()
    calibration = calibration_ids()
    rows = {}
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        for name in POLICIES:
            device.reset()
            handle = offload(model, device, policy=name, hot=args.hot, calibration=calibration)
            handle.telemetry.reset()  # count the decode, not the profiling pass
            generate(model, args.prompt, args.tokens)
            row = {"policy": name, "hit_rate": handle.telemetry.hit_rate()}
            for link_name, link in LINKS.items():
                s = handle.telemetry.summary(link, clock_mhz=config.target.clock_mhz, tokens=args.tokens)
                row[f"ms_per_token_{link_name}"] = 1e3 * s["modeled_s_per_token"]
                row["weight_MB_moved"] = s["weight_bytes_moved"] / 1e6
                row["device_link_kB"] = s["link_bytes_device"] / 1e3
                row["device_calls"] = s["device_calls"]
            if name == "prefetch":
                row["recall"] = handle.policy.recall_rate
            handle.remove()
            rows[name] = row
    pcie = "ms_per_token_pcie-gen3-x4"
    best = min((r for n, r in rows.items() if n != "lru"), key=lambda r: r[pcie])
    return {
        "config": config.name,
        "hot_per_layer": args.hot,
        "tokens": args.tokens,
        "speedup_vs_lru": rows["lru"][pcie] / best[pcie],
        "best_policy": best["policy"],
        "prefetch_recall": rows["prefetch"]["recall"],
        "hit_rate_lru": rows["lru"]["hit_rate"],
        "hit_rate_best": best["hit_rate"],
        "policies": list(rows.values()),
    }

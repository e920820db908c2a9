"""Placement policies side by side on the demo model: decode time per token and bytes moved.

The demo model decodes ``--tokens`` bytes of held-out text after its first ``--prompt``
bytes, one byte a step with the KV cache, each step fed the true byte (teacher forcing, so
that every policy sees the same inputs and the int8 experts' mistakes do not steer the text
into a loop; ``top1`` is how often the greedy choice was right), with each policy, the host
holding ``--hot`` of the 8 experts per layer (too few for all of them), cold experts on the
simulated device (Verilator harness, real cycle counts). Per policy and modeled link
(PCIe gen3 x4, UART 3 Mbaud): modeled decode time per token = the host's expert compute
(``HostCost``: one float expert timed on 1 and ``max_tokens`` tokens before the runs, the
fastest of 20 each, times the calls and tokens the host ran) + on-demand weight moves over
the link (an expert's int8 image, smaller than the float weights the baseline really moves:
this favours ``lru``) + device cycles (counted by the harness) at the board clock +
activation bytes over the link (serialized: no overlap is assumed, which favours nothing).
``lru`` is the mixtral-offloading baseline (weights move into a host cache; no device);
``cost`` and ``prefetch`` send misses where the PCIe costs say, ``cost-uart`` and
``prefetch-uart`` where the UART's do; ``block`` runs the whole MoE block, router included,
on the device (every expert there).

JSON: ``speedup_vs_lru`` (lru's time over the best other policy's, PCIe) and
``speedup_vs_lru_uart``, ``prefetch_recall``, ``hit_rate_lru``, ``hit_rate_best`` (the best
policy on PCIe), ``host_cost``, and per policy the figures.
"""

import sys

DESCRIPTION = "offload policies on the demo model: decode time per token, bytes moved, hit rates, recall"


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--hot", type=int, default=2, help="experts per layer on the host (default: 2)")
    parser.add_argument("--tokens", type=int, default=64, help="bytes to decode per policy (default: 64)")
    parser.add_argument("--prompt", type=int, default=64, help="held-out bytes before the decode (default: 64)")


def _progress(line):
    print(line, file=sys.stderr, flush=True)  # stdout carries the figures (--json)


def run(args):
    import torch

    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.host.demo import corpus
    from moegen.host.demo.model import calibration_ids, load_demo, teacher_forced
    from moegen.host.device import open_device
    from moegen.host.offload import offload
    from moegen.host.policies import LINKS, POLICIES
    from moegen.host.sim import build, launch

    if not 1 <= args.tokens <= 512:
        raise UserError(f"--tokens must be in 1..512, not {args.tokens}")
    if not 1 <= args.prompt <= 1024:
        raise UserError(f"--prompt must be in 1..1024 bytes, not {args.prompt}")
    torch.set_num_threads(1)  # as make sim: the harness clocks on the other core
    text = corpus.heldout(args.prompt + args.tokens + 1)
    config = load_config(args.config)
    model = load_demo()
    calibration = calibration_ids()
    rows, quantized, host_cost = {}, None, None
    runs = [(name, {"policy": name, "hot": args.hot}) for name in POLICIES]
    # cost and prefetch decide misses by one link's costs: PCIe by default, and once more the UART's
    runs += [(f"{name}-uart", {"policy": name, "hot": args.hot, "link": "uart-3m"}) for name in ("prefetch", "cost")]
    runs += [("block", {"block": True})]
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        for name, how in runs:
            _progress(f"{name}: offloading, then decoding {args.tokens} bytes")
            device.reset()
            # converted once and the host timed once, for every run
            handle = offload(model, device, calibration=calibration, quantized=quantized, host_cost=host_cost, **how)
            quantized, host_cost = [layer.quantized for layer in handle.layers], handle.host_cost
            # count the decode steps, not the profiling pass or the prompt
            correct = teacher_forced(model, text, args.tokens, prompt=args.prompt, after_prompt=handle.telemetry.reset)
            row = {"policy": name, "hit_rate": handle.telemetry.hit_rate(), "top1": correct / args.tokens}
            for link_name, link in LINKS.items():
                s = handle.telemetry.summary(link, clock_mhz=config.target.clock_mhz, tokens=args.tokens,
                                             host_cost=host_cost)
                row[f"ms_per_token_{link_name}"] = 1e3 * s["modeled_s_per_token"]
                row["weight_MB_moved"] = s["weight_bytes_moved"] / 1e6
                row["device_link_kB"] = s["link_bytes_device"] / 1e3
                row["device_calls"] = s["device_calls"]
            if name.startswith("prefetch"):
                row["recall"] = handle.policy.recall_rate
            if name == "block":
                row["routing_agreement"] = handle.telemetry.routing_agreement()
            handle.remove()
            rows[name] = row
    pcie, uart = "ms_per_token_pcie-gen3-x4", "ms_per_token_uart-3m"
    others = [r for n, r in rows.items() if n != "lru"]
    best = min(others, key=lambda r: r[pcie])
    return {
        "config": config.name,
        "hot_per_layer": args.hot,
        "tokens": args.tokens,
        "host_cost": host_cost._asdict(),
        "speedup_vs_lru": rows["lru"][pcie] / best[pcie],
        "speedup_vs_lru_uart": rows["lru"][uart] / min(r[uart] for r in others),
        "best_policy": best["policy"],
        "prefetch_recall": rows["prefetch"]["recall"],
        "hit_rate_lru": rows["lru"]["hit_rate"],
        "hit_rate_best": best["hit_rate"],
        "policies": list(rows.values()),
    }

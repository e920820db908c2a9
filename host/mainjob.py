"""``make sim``: the demo MoE model with its cold experts on the simulated accelerator.

Steps, each shown as it runs:

1. build (or reuse) the Verilator harness of the config and start it;
2. load the shipped demo model (:mod:`moegen.host.demo`) and measure its float perplexity
   on held-out text;
3. offload with a policy: profile on training text, prune and quantize every expert,
   upload the cold ones to the simulated device;
4. the same split computed on the host with golden's integer experts (the int8 reference)
   and with every expert int8 on the host;
5. perplexity and greedy generation, offloaded and reference;
6. block mode (when every expert fits in device memory, unless ``--no-block``; ``--block``
   insists): the whole routed MoE block on the device, router included; perplexity against
   golden's block on the host, and how often the device's routing differed from the model's;
7. the report: placement, hit rate, device cycles, link bytes, modeled time per token at
   the board clock over UART and PCIe, perplexities, and whether the offloaded text is
   identical to the reference's.

Everything is computed, nothing is assumed: the report's figures come from this run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--policy", default="static", help="placement policy (default: static)")
    parser.add_argument("--hot", type=int, default=2, help="experts per layer the host keeps (default: 2)")
    parser.add_argument("--heldout", type=int, default=1024, help="held-out bytes for perplexity (default: 1024)")
    parser.add_argument("--prompt", default="class Config:\n    def ", help="generation prompt")
    parser.add_argument("--generate", type=int, default=48, help="bytes to generate (default: 48)")
    parser.add_argument("--checkpoint", help="a MixtralForCausalLM checkpoint folder of the demo's shapes "
                        "(default: the shipped demo model)")
    parser.add_argument("--block", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the whole MoE block, router included, on the device (default: when every "
                        "expert fits in device memory)")
    parser.add_argument("--plot", help="write the placement and hit-rate plot to this PNG file")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


class _Progress:
    def __init__(self):
        self.start = time.monotonic()

    def __call__(self, message):  # sys.stderr as it is now (a test may have replaced it)
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def run(args):
    import torch

    from ..config import load_config
    from ..errors import UserError
    from .demo import corpus
    from .demo.model import CONTEXT, calibration_ids, generate, load_demo, perplexity
    from .device import open_device, require_counters
    from .offload import block_rows, offload
    from .policies import LINKS
    from .sim import build, launch

    if not 256 <= args.heldout <= 1 << 20:
        raise UserError(f"--heldout must be in 256..1048576 bytes, not {args.heldout}")
    if not 1 <= args.generate <= 1024:
        raise UserError(f"--generate must be in 1..1024, not {args.generate}")
    config = load_config(args.config)
    require_counters(config, "make sim's report")
    step = _Progress()
    step(f"config {config.name} (device hash 0x{config.device_hash:08x}): building the simulated device")
    binary = build(config, progress=step)
    # one torch thread: the harness clocks on the other core, and two threads waiting on each
    # other under load ran the host side several times slower (host/demo/train.py measured it)
    torch.set_num_threads(1)
    model = load_demo(None if args.checkpoint is None else Path(args.checkpoint))
    heldout = corpus.heldout(args.heldout)
    calibration = calibration_ids()
    context = min(CONTEXT, args.heldout)
    measure = {"context": context, "stride": context // 2}

    experts, k = model.config.num_local_experts, model.config.num_experts_per_tok
    try:
        block_rows(config, model.config.num_hidden_layers, experts, k)
        run_block = args.block is not False
    except UserError as error:
        if args.block:
            raise
        step(f"block mode skipped: {error}")
        run_block = False

    step(f"float perplexity on {len(heldout)} held-out bytes")
    ppl_float = perplexity(model, heldout, **measure)

    step("int8: every expert pruned and quantized, computed on the host")
    all_int8 = offload(model, None, policy="static", hot=0, calibration=calibration, config=config)
    host_cost = all_int8.host_cost  # one host timing for every run below: cost-driven placements agree
    ppl_int8 = perplexity(model, heldout, **measure)
    all_int8.remove()

    step(f"int8 reference: policy {args.policy}, hot {args.hot}, cold experts with golden on the host")
    # the experts converted once, for every split below
    quantized = [layer.quantized for layer in all_int8.layers]
    reference = offload(model, None, policy=args.policy, hot=args.hot, calibration=calibration, config=config,
                        quantized=quantized, host_cost=host_cost)
    ppl_reference = perplexity(model, heldout, **measure)
    text_reference = generate(model, args.prompt, args.generate)
    reference.remove()

    step("starting the simulated device")
    with launch(binary) as harness, open_device(config, "sim", address=harness.socket, timeout=5.0) as device:
        step(f"offloading: policy {args.policy}, hot {args.hot}; converting and uploading cold experts")
        handle = offload(model, device, policy=args.policy, hot=args.hot, calibration=calibration,
                         quantized=quantized, host_cost=host_cost)
        uploaded = len(device.experts)
        step(f"perplexity with cold experts on the simulated device ({uploaded} experts resident there)")
        ppl_offloaded = perplexity(model, heldout, **measure)
        tokens_ppl = len(heldout) - 1
        step(f"generating {args.generate} bytes")
        text_offloaded = generate(model, args.prompt, args.generate)
        counters = device.counters()
        handle.remove()
        block = _block(model, device, step, quantized, calibration, heldout, measure) if run_block else None
        summary = harness.stop()
    telemetry = handle.telemetry
    tokens = tokens_ppl + args.generate
    report = {
        "config": config.name,
        "policy": args.policy,
        "hot_per_layer": args.hot,
        "experts_on_device": uploaded,
        "tokens": tokens,
        "perplexity": {"float": ppl_float, "int8": ppl_int8, "int8_reference": ppl_reference,
                       "offloaded": ppl_offloaded},
        "offloaded_equals_reference": text_offloaded == text_reference and ppl_offloaded == ppl_reference,
        "text_offloaded": text_offloaded,
        "text_reference": text_reference,
        "block": block,
        "hit_rate": telemetry.hit_rate(),
        "device_cycles": counters["BUSY_CYCLES"],
        "engine_busy_cycles": counters["ENGINE_BUSY"],
        "link_frames": counters["LINK_FRAMES"],
        "harness_cycles_per_s": summary.cycles_per_s if summary else None,
        "modeled": {name: telemetry.summary(link, clock_mhz=config.target.clock_mhz, tokens=tokens,
                                                    host_cost=handle.host_cost)
                    for name, link in LINKS.items()},
    }
    if args.plot:
        handle.plot(args.plot)
        report["plot"] = args.plot
    step("done")
    if args.json:
        print(json.dumps(report))
    else:
        print(_format(report, handle.report()))
    same = report["offloaded_equals_reference"] and (block is None or block["equals_reference"])
    return 0 if same else 1


def _block(model, device, step, quantized, calibration, heldout, measure):
    """Block mode on the same device: every expert and the router there; perplexity against
    golden's block on the host."""
    from .demo.model import perplexity
    from .offload import offload

    step("block mode reference: the whole MoE block with golden on the host")
    reference = offload(model, None, block=True, calibration=calibration, config=device.config, quantized=quantized)
    ppl_reference = perplexity(model, heldout, **measure)
    reference.remove()
    device.reset()
    step("block mode: uploading every expert; router and experts on the simulated device")
    handle = offload(model, device, block=True, calibration=calibration, quantized=quantized)
    ppl = perplexity(model, heldout, **measure)
    handle.remove()
    t = handle.telemetry
    return {"perplexity": ppl, "perplexity_reference": ppl_reference, "equals_reference": ppl == ppl_reference,
            "experts_on_device": len(device.experts), "routed_tokens": sum(t.routed_tokens),
            "routing_agreement": t.routing_agreement(),
            "device_cycles": t.totals().device_cycles + t.route_totals().device_cycles,
            "rows_per_batch": handle.block_rows}


def _format(report, table):
    p = report["perplexity"]
    lines = [
        f"moegen make sim: demo model on config {report['config']}, policy {report['policy']}, "
        f"{report['hot_per_layer']} hot experts per layer, {report['experts_on_device']} experts on the device",
        "",
        "placement per layer (tokens on host and device, hit rate, bytes, device cycles):",
        table,
        "",
        f"perplexity on held-out text: float {p['float']:.3f}  int8 {p['int8']:.3f}  "
        f"int8 reference {p['int8_reference']:.3f}  offloaded {p['offloaded']:.3f}",
        f"offloaded output identical to the host int8 reference: {report['offloaded_equals_reference']}",
        f"device: {report['device_cycles']} busy cycles, {report['engine_busy_cycles']} engine cycles, "
        f"{report['link_frames']} link frames; harness {report['harness_cycles_per_s']} cycles/s",
    ]
    for name, m in report["modeled"].items():
        lines.append(f"modeled at the board clock over {name}: {1e3 * m['modeled_s_per_token']:.3f} ms per token "
                     f"({m['link_bytes_device']} link bytes, {m['weight_bytes_moved']} weight bytes moved)")
    b = report["block"]
    if b is not None:
        lines.append(f"block mode (router and all {b['experts_on_device']} experts on the device): perplexity "
                     f"{b['perplexity']:.3f}, identical to golden's block: {b['equals_reference']}; device routing "
                     f"= model routing on {b['routing_agreement']:.4f} of {b['routed_tokens']} token-layers; "
                     f"{b['device_cycles']} device cycles")
    lines += ["", f"generated (offloaded): {report['text_offloaded']!r}"]
    return "\n".join(lines)

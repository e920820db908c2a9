"""Link fault injection on the simulated device: detected, silent corruptions, hangs.

Requests go to the Verilator harness of a config through a transport that corrupts bytes
in both directions (a flipped bit, a dropped, duplicated or truncated byte run; each chunk
with probability ``--rate``). The host writes random data to device memory and reads it
back, writes and reads the per-layer ``K`` registers, and submits fences, until
``--frames`` request frames (retries included) have crossed the link. A corrupted frame
must be detected (CRC, length, timeout) and retried; a response that differs from what
was written is a silent corruption; a request that never completes is a hang.
"""

DESCRIPTION = "link faults on the harness: injected, detected, silent corruptions, hangs"


def add_arguments(parser):
    parser.add_argument("--config", default="tiny", help="YAML file or preset (default: tiny)")
    parser.add_argument("--frames", type=int, default=10_000, help="request frames to send (default: 10000)")
    parser.add_argument("--rate", type=float, default=0.2, help="fault probability per chunk (default: 0.2)")
    parser.add_argument("--seed", type=int, default=1)


def run(args):
    import random
    import time

    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.golden.device import Command, encode_command
    from moegen.host.device import open_device
    from moegen.host.link import ByteFaults, FaultyTransport, LinkTimeout
    from moegen.host.sim import build, launch

    if not 1 <= args.frames <= 10_000_000:
        raise UserError(f"--frames must be in 1..10000000, not {args.frames}")
    config = load_config(args.config)
    rng = random.Random(args.seed)
    faults = ByteFaults(args.rate, seed=args.seed)
    port = config.memory.port_width // 8
    span = min(config.link.max_payload, 256)
    silent = hangs = operations = 0
    with launch(build(config)) as harness, \
            open_device(config, "sim", address=harness.socket, timeout=0.05, retries=64) as device:
        device.link.transport = FaultyTransport(device.link.transport, faults)
        stats = device.link.stats
        start = time.monotonic()
        fence = 0
        while stats["requests"] + stats["retries"] < args.frames:
            operations += 1
            try:
                kind = rng.randrange(3)
                if kind == 0:
                    addr = rng.randrange(0, (config.memory.size_bytes - span) // port) * port
                    data = rng.randbytes(rng.randrange(1, span // port + 1) * port)
                    device.write_mem(addr, data)
                    silent += device.read_mem(addr, len(data)) != data
                elif kind == 1:
                    layer, k = rng.randrange(config.model.layers), rng.randrange(1, config.router.k_max + 1)
                    device.write_reg("K", k, layer)
                    silent += device.read_reg("K", layer) != k
                else:
                    fence += 1
                    device.link.submit(encode_command(Command.FENCE, fence))
                    silent += device.read_reg("FENCE") != fence
            except LinkTimeout:
                hangs += 1
        seconds = time.monotonic() - start
        detected = stats["retries"] + stats["dropped"]
    return {
        "config": config.name,
        "frames": stats["requests"] + stats["retries"],
        "operations": operations,
        "faults_injected": faults.total,
        "faults_by_kind": dict(faults.injected),
        "detected": detected,
        "retries": stats["retries"],
        "dropped_responses": stats["dropped"],
        "silent_corruptions": silent,
        "hangs": hangs,
        "seconds": seconds,
    }

"""Offload with the model on CUDA: hot experts on the GPU, cold ones on the device.

Decode tokens per second of the demo model, greedy, three ways side by side: every expert on
the GPU (transformers' own experts), the ``static`` policy with ``--hot`` experts per layer
on the GPU and the rest on the in-process golden device (``model`` transport: the device's
exact integer results, computed on the host CPU, no cycles), and the same with every expert
on that device. It needs a CUDA GPU; the figures say how much the host side of the plugin
costs next to all-on-GPU, not how fast an FPGA is (``moegen bench device`` models that).
"""

DESCRIPTION = "offload with the model on CUDA: decode tokens/s, hot experts on the GPU vs all-on-GPU"


def add_arguments(parser):
    parser.add_argument("--config", default="default", help="YAML file or preset (default: default)")
    parser.add_argument("--hot", type=int, default=2, help="experts per layer on the GPU (default: 2)")
    parser.add_argument("--tokens", type=int, default=64, help="bytes to decode (default: 64)")


def run(args):
    import time

    import torch

    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.host.demo.model import calibration_ids, encode, load_demo
    from moegen.host.device import open_device
    from moegen.host.offload import offload

    if not torch.cuda.is_available():
        raise UserError("bench offload_gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    config = load_config(args.config)
    model = load_demo().to("cuda")
    calibration = calibration_ids()
    prompt = torch.tensor([encode("def main(argv):\n    ")], device="cuda")

    def decode():
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False)
        torch.cuda.synchronize()
        return args.tokens / (time.perf_counter() - start), out[0].tolist()

    decode()  # warm-up: kernels, caches
    gpu_rate, _ = decode()
    rows = {"all_on_gpu": gpu_rate}
    for name, hot in (("static_hot_on_gpu", args.hot), ("all_experts_on_device", 0)):
        with open_device(config, "model") as device:
            handle = offload(model, device, policy="static", hot=hot, calibration=calibration)
            rate, _ = decode()
            rows[name] = rate
            handle.remove()
    return {
        "gpu": torch.cuda.get_device_name(),
        "tokens": args.tokens,
        "hot_per_layer": args.hot,
        "tokens_per_s": rows,
        "ratio_static_vs_all_on_gpu": rows["static_hot_on_gpu"] / rows["all_on_gpu"],
    }

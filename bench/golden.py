"""Accuracy of the integer golden model against float: the error bounds the docs state."""

DESCRIPTION = "integer golden vs float: router weights, requant multipliers, int8 expert error"


def add_arguments(parser):
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per router mode")
    parser.add_argument("--seed", type=int, default=0)


def _router_errors(tokens, generator):
    import torch

    from moegen.golden.router import MODES, SIGMOID_BOUND_MIN_SUM, quantize_logits, route, route_float

    out = {}
    for experts, k in ((16, 2), (64, 8)):
        logits = quantize_logits(torch.randn(tokens, experts, generator=generator) * 3)
        bias = quantize_logits(torch.randn(experts, generator=generator) * 0.05, frac=16)
        for mode in MODES:
            b = bias if mode == "sigmoid_bias_renorm" else None
            got = route(logits, k=k, mode=mode, bias=b)
            ref = route_float(logits.double() / 256, k=k, mode=mode, bias=None if b is None else b.double() / 65536)
            same = (got.indices == ref.indices).all(-1)
            in_bound = same
            if b is not None:  # the bound's condition: selected scores sum to >= SIGMOID_BOUND_MIN_SUM
                scores = torch.gather(torch.sigmoid(logits.double() / 256), 1, ref.indices).sum(-1)
                in_bound = same & (scores >= SIGMOID_BOUND_MIN_SUM)
            error = (got.weights.double() / 2**15 - ref.weights).abs().amax(-1)
            out[f"E{experts}_k{k}_{mode}"] = {
                "max_weight_error": float(error[in_bound].max()),
                "selection_agreement": float(same.double().mean()),
            }
    return out


def _expert_errors(generator):
    import torch

    from moegen.golden.expert import ExpertWeights, expert_float, prune_expert, quantize_expert, run_expert

    hidden, ffn = 256, 512
    dense = ExpertWeights(torch.randn(ffn, hidden, generator=generator) * hidden**-0.5,
                          torch.randn(ffn, hidden, generator=generator) * hidden**-0.5,
                          torch.randn(hidden, ffn, generator=generator) * ffn**-0.5)
    calibration = torch.randn(512, hidden, generator=generator)
    x = torch.randn(256, hidden, generator=generator)
    out = {}
    for label, (m, n) in (("dense", (4, 4)), ("2_4", (2, 4)), ("1_4", (1, 4))):
        weights = prune_expert(dense, m, n)
        qe = quantize_expert(weights, calibration, m=m, n=n, cols=8)
        ref = expert_float(x, weights)
        out[f"expert_rel_error_{label}"] = float((run_expert(x, qe) - ref).norm() / ref.norm())
    return out


def run(args):
    import math
    import random

    import torch

    from moegen.golden.formats import ImageLayout
    from moegen.golden.quant import quantize_multiplier

    generator = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    worst = 0.0
    for _ in range(20000):
        scale = math.ldexp(rng.random() + 0.5, rng.randrange(-32, 20))
        mult, shift = quantize_multiplier(scale)
        worst = max(worst, abs(mult / 2**shift - scale) / scale)
    dense, sparse = ImageLayout(256, 512, 8, 4, 4), ImageLayout(256, 512, 8, 2, 4)
    return {
        "router": _router_errors(args.tokens, generator),
        "requant_mult_max_rel_error": worst,
        "requant_mult_bound": 2.0**-31,
        **_expert_errors(generator),
        "image_bytes_ratio_2_4_vs_dense": sparse.nbytes / dense.nbytes,
    }

"""TopKRouter: cycles per token and latency measured on Verilator, ECP5 resources from yosys."""

DESCRIPTION = "top-k router: cycles/token and latency (Verilator), ECP5 LUT/FF/DSP (yosys), vs Edge-MoE"

#: (experts, k, lanes, mode): Mixtral/Edge-MoE-sized routing; DeepSeek-V3's 256 experts, k = 8 (sigmoid
#: scores ride along the sort); the same size with softmax renormalization (keys only).
CONFIGS = ((16, 2, 16, "softmax_topk_renorm"), (256, 8, 16, "sigmoid_bias_renorm"),
           (256, 8, 16, "softmax_topk_renorm"))
#: Edge-MoE (Sarkar et al., 2023) sorts 16 experts by insertion for k = 2: 16 cycles per token.
EDGE_MOE_CYCLES_PER_TOKEN = 16


def add_arguments(parser):
    parser.add_argument("--seed", type=int, default=1)


def _measure(router, seed):
    from moegen.rtl.testbench.router import router_params
    from moegen.simulation import run_cocotb

    params = router_params(router, tokens=0, seed=seed, patterns=())
    result = run_cocotb(router, name="topk_router", test_module="moegen.rtl.testbench.router", params=params,
                        seed=seed, testcase="router_latency_and_throughput")
    (timing,) = [r for r in result.reports if "latency_cycles" in r]
    if not result.ok:
        raise RuntimeError(f"router simulation failed: {timing}; see {result.log}")
    return timing


def run(args):
    from moegen.boards.synth import synthesize
    from moegen.rtl.router import TopKRouter

    configs = []
    for experts, k, lanes, mode in CONFIGS:
        router = TopKRouter(experts=experts, k_max=k, lanes=lanes, mode=mode)
        timing = _measure(router, args.seed)
        resources = synthesize(router, name=f"topk_router_e{experts}_k{k}_p{lanes}", family="ecp5")
        entry = {
            "experts": experts, "k": k, "lanes": lanes, "mode": mode,
            "cycles_per_token": timing["cycles_per_token"], "latency_cycles": timing["latency_cycles"],
            "luts": resources.luts, "ffs": resources.ffs, "dsps": resources.dsps, "brams": resources.brams,
        }
        if (experts, k) == (16, 2):
            entry["edge_moe_cycles_per_token"] = EDGE_MOE_CYCLES_PER_TOKEN
            entry["speedup_vs_edge_moe"] = EDGE_MOE_CYCLES_PER_TOKEN / timing["cycles_per_token"]
        configs.append(entry)
    return {"configs": configs}

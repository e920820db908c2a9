"""Co-design quality on the demo model: held-out perplexity of each compression and the expert
MACs per-layer k saves; the error of the analytic models.

The demo model (host/demo) is measured on ``--heldout`` bytes of held-out text (windows of 256,
stride 128) in float (``ppl_float``), with every expert int8 and dense (``ppl_int8``), int8 and
2:4 by magnitude (``ppl_int8_2_4``) and int8 and 2:4 activation-aware (``ppl_best``: Wanda-style
scores from a profiling pass over 1 KiB of training text; no recovery fine-tune). int8 experts
are golden's integer experts on the host (``offload`` with no device, every expert cold), each
quantized on its own calibration inputs. Per-layer k (``macs_saved_per_layer_k``,
``ppl_per_layer_k``) is the flow's greedy search on the activation-aware int8 model within
``--ppl-budget`` (default 1%) of ``ppl_best``.

``cycle_model_max_error`` is the documented fit of :mod:`moegen.hls.model` against the Verilator
harness (3.4%, ``tests/hls/test_model.py``; re-simulating takes minutes per config, so it is not
re-run here). ``resource_model_max_error`` is the largest relative error of
:func:`moegen.hls.model.resources` over its yosys synthesis points (``ECP5_POINTS``), the points
the model is fitted to (in-sample), over LUTs, FFs, DSPs and block RAMs.
"""

DESCRIPTION = "co-design on the demo model: perplexity of int8, 2:4, activation-aware, per-layer k; model errors"

#: The cycle model's largest error against the harness (hls/model.py, tests/hls/test_model.py).
CYCLE_MODEL_MAX_ERROR = 0.034


def add_arguments(parser):
    parser.add_argument("--heldout", type=int, default=4096, help="held-out bytes (default: 4096)")
    parser.add_argument("--ppl-budget", type=float, default=0.01, help="per-layer k perplexity budget (default: 0.01)")


def _variant(config, **array):
    from moegen.config import AccelConfig

    data = config.to_dict()
    data["array"].update(array)
    return AccelConfig.from_dict(data)


def _resource_model_error():
    from moegen.config import AccelConfig, load_config
    from moegen.hls.model import ECP5_POINTS, resources

    worst = 0.0
    for overrides, measured in ECP5_POINTS:
        data = load_config("default").to_dict()
        for section, values in overrides.items():
            data[section].update(values)
        modeled = resources(AccelConfig.from_dict(data))
        worst = max(worst, *(abs(modeled[key] - value) / value for key, value in measured.items()))
    return worst


def run(args):
    import copy

    import torch

    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.hls.flow import activation_aware_prune, choose_k, profile, routed_k
    from moegen.host.demo import corpus
    from moegen.host.demo.model import CONTEXT, calibration_ids, load_demo, perplexity
    from moegen.host.offload import expert_weights, experts_modules, offload

    if not 512 <= args.heldout <= 1 << 20:
        raise UserError(f"--heldout must be in 512..1048576 bytes, not {args.heldout}")
    torch.set_num_threads(1)  # the machine is shared; two threads waiting on each other run slower
    model = load_demo()
    heldout = corpus.heldout(args.heldout)
    calibration = calibration_ids()
    config = load_config("default")

    def measure(target=model):
        return perplexity(target, heldout, context=CONTEXT, stride=CONTEXT // 2)

    def int8(target, variant):
        handle = offload(target, None, policy="static", hot=0, calibration=calibration, config=variant)
        try:
            return measure(target)
        finally:
            handle.remove()

    ppl_float = measure()
    ppl_int8 = int8(model, _variant(config, m=4, n=4))
    ppl_2_4 = int8(model, config)

    _, inputs = profile(model, calibration)
    aware = copy.deepcopy(model)
    with torch.no_grad():
        for layer, module in enumerate(experts_modules(aware)):
            for e in range(module.gate_up_proj.shape[0]):
                pruned = activation_aware_prune(expert_weights(module, e), inputs[layer][e], 2, 4)
                module.gate_up_proj[e] = torch.cat([pruned.gate, pruned.up])
                module.down_proj[e] = pruned.down
    handle = offload(aware, None, policy="static", hot=0, calibration=calibration, config=config)
    try:
        k_model = aware.config.num_experts_per_tok

        def limited(ks):
            with routed_k(handle.routers, ks, k_model):
                return measure(aware)

        ks, ppl_best, ppl_k, _ = choose_k(limited, k_model, len(handle.layers), args.ppl_budget)
    finally:
        handle.remove()
    return {
        "heldout_bytes": len(heldout),
        "ppl_float": ppl_float,
        "ppl_int8": ppl_int8,
        "ppl_int8_2_4": ppl_2_4,
        "ppl_best": ppl_best,
        "ppl_best_vs_float": ppl_best / ppl_float - 1,
        "per_layer_k": ks,
        "ppl_per_layer_k": ppl_k,
        "macs_saved_per_layer_k": 1 - sum(ks) / (k_model * len(ks)),
        "cycle_model_max_error": CYCLE_MODEL_MAX_ERROR,
        "resource_model_max_error": _resource_model_error(),
    }

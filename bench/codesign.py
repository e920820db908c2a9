"""Co-design quality on the demo model: held-out perplexity of each compression and the expert
MACs per-layer gating saves; the error of the analytic models.

The demo model (host/demo) is measured on ``--heldout`` bytes of held-out text (windows of 256,
stride 128) in float (``ppl_float``), with every expert int8 and dense (``ppl_int8``), and int8
and 2:4 pruned (:mod:`moegen.hls.prune`) by magnitude (``ppl_int8_2_4``), Wanda (``ppl_wanda``),
SparseGPT (``ppl_sparsegpt``) and SparseGPT followed by ``--recover-steps`` of the recovery
fine-tune (``ppl_recovered``, distillation from the float model on the training text; 0 skips
it). Wanda and SparseGPT use a profiling pass over 4 KiB of training text (up to 1024 inputs per
expert); ``ppl_best`` is the best of Wanda, SparseGPT and the recovered model (of the first two
with ``--recover-steps 0``) and ``best_method`` names it. int8 experts are
golden's integer experts on the host (``offload`` with no device, every expert cold), each
quantized on its own inputs over 1 KiB of training text. Per-layer gating
(``macs_saved_per_layer_k``, ``per_layer_k``, ``per_layer_top_p``, ``ppl_per_layer_k``) is the
flow's :func:`~moegen.hls.flow.choose_k` on the best int8 model within ``--ppl-budget`` (default
1%) of ``ppl_best``, on the same held-out text; the MACs saved count the expert calls the tokens
made.

``cycle_model_max_error`` is the largest relative error of :mod:`moegen.hls.model` against the
Verilator harness over ``--cycle-configs`` (default: the ``tiny`` and ``default`` presets; each
a cold call and warm calls from 1 to ``max_tokens`` tokens, busy cycles of the call and of the
engine; :func:`~moegen.hls.model.cycle_errors`; a harness not built yet takes a few minutes).
``resource_model_max_error`` is the largest relative error of
:func:`moegen.hls.model.resources` over its yosys synthesis points (``ECP5_POINTS``), the points
the model is fitted to (in-sample), over LUTs, FFs, DSPs and block RAMs.
"""

import sys

DESCRIPTION = ("co-design on the demo model: perplexity of int8, 2:4 by magnitude, Wanda, SparseGPT, recovery; "
               "per-layer k and top-p; model errors")

#: Windows of 256 training bytes the pruning methods profile.
PRUNE_WINDOWS = 16
MAX_RECOVER_STEPS = 10_000


def add_arguments(parser):
    parser.add_argument("--heldout", type=int, default=4096, help="held-out bytes (default: 4096)")
    parser.add_argument("--ppl-budget", type=float, default=0.01, help="per-layer k perplexity budget (default: 0.01)")
    parser.add_argument("--recover-steps", type=int, default=200,
                        help="recovery fine-tune steps after SparseGPT, 0: none (default: 200)")
    parser.add_argument("--cycle-configs", nargs="+", default=["tiny", "default"], metavar="CONFIG",
                        help="configs (files or presets) whose harness checks the cycle model (default: tiny default)")


def _variant(config, **array):
    from moegen.config import AccelConfig

    data = config.to_dict()
    data["array"].update(array)
    return AccelConfig.from_dict(data)


def _resource_model_error():
    from moegen.hls.model import ECP5_POINTS, point_config, resources

    worst = 0.0
    for overrides, measured in ECP5_POINTS:
        modeled = resources(point_config(overrides))
        worst = max(worst, *(abs(modeled[key] - value) / value for key, value in measured.items()))
    return worst


def _progress(line):
    print(line, file=sys.stderr, flush=True)  # stdout carries the figures (--json)


def _cycle_model_error(configs):
    from moegen.config import load_config
    from moegen.hls.model import cycle_errors

    worst = 0.0
    for name in configs:
        _progress(f"cycle model against the {name} harness")
        for *_, call, engine in cycle_errors(load_config(name)):
            worst = max(worst, abs(call), abs(engine))
    return worst


def run(args):
    import copy
    import time

    import torch

    from moegen.config import load_config
    from moegen.errors import UserError
    from moegen.hls.flow import PROFILE_ROWS, choose_k, experts_per_token, gated, int8_experts, profile, shares_of
    from moegen.hls.prune import prune, pruned_copy, recover
    from moegen.host.demo import corpus
    from moegen.host.demo.model import CONTEXT, calibration_ids, encode, load_demo, perplexity
    from moegen.host.offload import expert_weights, experts_modules

    if not 512 <= args.heldout <= 1 << 20:
        raise UserError(f"--heldout must be in 512..1048576 bytes, not {args.heldout}")
    if not 0 <= args.ppl_budget <= 1:
        raise UserError(f"--ppl-budget must be in 0..1 (a fraction), not {args.ppl_budget}")
    if not 0 <= args.recover_steps <= MAX_RECOVER_STEPS:
        raise UserError(f"--recover-steps must be in 0..{MAX_RECOVER_STEPS} (0: no fine-tune), "
                        f"not {args.recover_steps}")
    torch.set_num_threads(1)  # the machine is shared; two threads waiting on each other run slower
    model = load_demo()
    heldout = corpus.heldout(args.heldout)
    calibration = calibration_ids()
    config = load_config("default")

    def measure(target=model):
        return perplexity(target, heldout, context=CONTEXT, stride=CONTEXT // 2)

    def int8(target, variant=config):
        with int8_experts(target, calibration, variant):
            return measure(target)

    _progress(f"float, int8 and int8 2:4 by magnitude: perplexity on {len(heldout)} held-out bytes")
    ppl_float = measure()
    ppl_int8 = int8(model, _variant(config, m=4, n=4))
    ppl_2_4 = int8(model)
    _progress("Wanda and SparseGPT: profiling and pruning")

    _, inputs = profile(model, calibration_ids(PRUNE_WINDOWS), rows=PROFILE_ROWS)
    modules = experts_modules(model)
    models = {method: pruned_copy(model, [[prune(method, expert_weights(module, e), x, 2, 4)
                                           for e, x in enumerate(layer_inputs)]
                                          for module, layer_inputs in zip(modules, inputs, strict=True)])
              for method in ("wanda", "sparsegpt")}
    recover_seconds = None
    if args.recover_steps:
        _progress(f"recovery fine-tune: {args.recover_steps} steps")
        start = time.monotonic()
        models["recovered"] = copy.deepcopy(models["sparsegpt"])
        recover(models["recovered"], model, torch.tensor(encode(corpus.training_text())), steps=args.recover_steps,
                context=CONTEXT)
        recover_seconds = time.monotonic() - start
    _progress(f"int8 perplexity of {', '.join(models)}")
    ppl = {method: int8(target) for method, target in models.items()}
    best_method = min(ppl, key=ppl.get)
    best = models[best_method]
    with int8_experts(best, calibration, config) as handle:
        k_model = best.config.num_experts_per_tok

        def limited(gating):
            with gated(handle.routers, gating, k_model) as tallies:
                return measure(best), shares_of(tallies)

        _progress(f"choose-k on {best_method}")
        gating, ppl_best, ppl_k, shares, _ = choose_k(limited, k_model, len(handle.layers), args.ppl_budget)
    return {
        "heldout_bytes": len(heldout),
        "ppl_float": ppl_float,
        "ppl_int8": ppl_int8,
        "ppl_int8_2_4": ppl_2_4,
        "ppl_wanda": ppl["wanda"],
        "ppl_sparsegpt": ppl["sparsegpt"],
        "ppl_recovered": ppl.get("recovered"),
        "recover_steps": args.recover_steps,
        "recover_seconds": recover_seconds,
        "best_method": best_method,
        "ppl_best": ppl_best,
        "ppl_best_vs_float": ppl_best / ppl_float - 1,
        "per_layer_k": [k for k, _ in gating],
        "per_layer_top_p": [p for _, p in gating],
        "ppl_per_layer_k": ppl_k,
        "ppl_per_layer_k_vs_best": ppl_k / ppl_best - 1,
        "macs_saved_per_layer_k": 1 - sum(map(experts_per_token, shares)) / (k_model * len(shares)),
        "cycle_model_max_error": _cycle_model_error(args.cycle_configs),
        "resource_model_max_error": _resource_model_error(),
    }

"""The co-design flow: from a Hugging Face MoE checkpoint to expert images and a hardware config.

``moegen compile MODEL_DIR --board BOARD --out DIR`` runs the named steps of :data:`STEPS` in
order. Each step writes its result into ``DIR/<step>/`` through a temporary folder renamed at
its end, so a folder that exists is complete; ``--from STEP`` reads the earlier steps' results
from ``DIR`` and ``--until STEP`` stops after ``STEP``:

* ``profile``: a profiling pass over calibration text records each expert's inputs and how often
  the router chose it (``profile.pt``, ``result.json``);
* ``prune``: every expert to the target's ``m:n`` (the board's preset config, else the default)
  by ``prune_method`` (:mod:`moegen.hls.prune`: ``magnitude``, ``wanda`` or, the default,
  ``sparsegpt``, the last two activation-aware on the profiled inputs), then, with
  ``recover_steps``, a short recovery fine-tune of the surviving expert weights toward the
  unpruned model on the training text (masks fixed); the relative output error of magnitude and
  of the chosen method on the calibration inputs is reported;
* ``quantize``: golden's ``quantize_expert`` on the pruned experts, calibrated on each expert's
  inputs, written as expert images of the provisional layout;
* ``choose-k``: per layer, a k (the router's top-k cut, weights rescaled to the same total) and
  maybe a top-p threshold (the router's dynamic gating: a token keeps its first choices up to a
  cumulative weight of ``top_p``) that together cut the expert calls most while the int8
  perplexity on held-out text stays within ``--ppl-budget`` of the int8 perplexity with the
  model's own k (:func:`choose_k`); the MACs saved count the expert calls the tokens made;
* ``place``: the ``--host-experts`` most chosen experts of each layer stay on the host;
* ``size-hardware``: rows and cols in {2, 4, 8, 16}, m:n in {2:4, 1:4, 4:4} (those the pruned
  weights satisfy), loader banks and router lanes, under the board's DSP, block-RAM, LUT and FF
  budget (:func:`moegen.hls.model.resources`), maximizing :func:`moegen.hls.model.tokens_per_second`
  at the chosen k and top-p (the measured spread of experts per token); the device memory then
  holds as many cold experts of a layer as fit;
* ``emit``: the config (YAML that ``load_config`` accepts), an image of every expert for it, and
  ``report.md`` and ``report.json``.

Calibration and held-out text are the shipped corpus (:mod:`moegen.host.demo.corpus`), bytes as
token ids (modulo the vocabulary when it is smaller than 256). int8 perplexities run golden's
integer experts on the host through :func:`moegen.host.offload.offload` with no device.
"""

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import UserError
from .prune import PRUNE_METHODS

__all__ = [
    "STEPS", "TOP_P_THRESHOLDS", "FlowOptions", "choose_k", "compile_model", "gated", "int8_experts", "limit_k",
    "perplexity", "profile", "size_hardware",
]

STEPS = ("profile", "prune", "quantize", "choose-k", "place", "size-hardware", "emit")
#: Tokens per window of the calibration, perplexity and recovery passes.
CONTEXT = 256
#: Inputs recorded per expert by the profiling pass (SparseGPT's down Hessian is ffn x ffn).
PROFILE_ROWS = 1024
#: Most recovery fine-tune steps the flow accepts.
MAX_RECOVER_STEPS = 100_000
#: Top-p thresholds ``choose-k`` tries at each k above 1, in the order it tries them.
TOP_P_THRESHOLDS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)
#: Steps of the perplexity budget in ``choose-k``'s knapsack, and how far the allowance shrinks
#: below the estimate of a combination that measured over the budget.
COMBINATION_BINS = 1000
SHRINK = 0.75
#: Candidate array sides, sparsity patterns, loader banks of the hardware search.
SIDES = (2, 4, 8, 16)
SPARSITIES = ((2, 4), (1, 4), (4, 4))
BANKS = (2, 3, 4)
#: FPGA families :func:`moegen.hls.model.resources` models.
_MODELED_FAMILIES = ("ecp5",)
_RESOURCE_NAMES = {"dsps": "DSPs", "brams": "block RAMs", "luts": "LUTs", "ffs": "FFs"}


@dataclasses.dataclass(frozen=True)
class FlowOptions:
    """What ``moegen compile`` was asked for.

    Members
    -------
    model_dir : Path
        A Hugging Face checkpoint folder of a supported family.
    board : str
        A board of :data:`moegen.boards.BOARDS`.
    out : Path
        The output folder; one subfolder per step.
    calibration_bytes, heldout_bytes : int
        Corpus bytes for the profiling pass and for the perplexities of ``choose-k``.
    ppl_budget : float
        Relative perplexity increase ``choose-k`` accepts (0.01 is 1%).
    host_experts : int or None
        Experts per layer on the host; default a quarter of the experts (at least 1).
    prune_method : str
        One of :data:`moegen.hls.prune.PRUNE_METHODS`.
    recover_steps : int
        Steps of the recovery fine-tune after pruning; 0 is none.
    """

    model_dir: Path
    board: str
    out: Path
    calibration_bytes: int = 4096
    heldout_bytes: int = 4096
    ppl_budget: float = 0.01
    host_experts: int | None = None
    prune_method: str = "sparsegpt"
    recover_steps: int = 0


def _check_options(options):
    from ..boards import get_board

    board = get_board(options.board)
    _budget(board)  # a board the resource model does not cover fails before any step runs
    if not (Path(options.model_dir) / "config.json").is_file():
        raise UserError(f"{options.model_dir}: not a model folder (no config.json)")
    for name in ("calibration_bytes", "heldout_bytes"):
        value = getattr(options, name)
        if not 64 <= value <= 1 << 20:
            raise UserError(f"--{name.replace('_', '-')} must be in 64..1048576, not {value}")
    if not 0 <= options.ppl_budget <= 1:
        raise UserError(f"--ppl-budget must be in 0..1 (a fraction), not {options.ppl_budget}")
    if options.prune_method not in PRUNE_METHODS:
        raise UserError(f"--prune-method must be one of {', '.join(PRUNE_METHODS)}, not {options.prune_method!r}")
    steps = options.recover_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_RECOVER_STEPS:
        raise UserError(f"--recover-steps must be an integer in 0..{MAX_RECOVER_STEPS} (0: no fine-tune), "
                        f"not {steps!r}")
    return board


def _step_index(name, option):
    if name not in STEPS:
        raise UserError(f"unknown step {name!r} for {option}; steps in order: {', '.join(STEPS)}")
    return STEPS.index(name)


# -- model, text, perplexity -------------------------------------------------------------------

def _load_model(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..host.offload import SUPPORTED_FAMILIES, experts_modules

    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir}: cannot read the model config: {str(error).splitlines()[0]}") from None
    if hf_config.model_type not in SUPPORTED_FAMILIES:
        raise UserError(f"{model_dir}: model type {hf_config.model_type!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_FAMILIES)}")
    hf_logging.disable_progress_bar()  # the flow's own progress lines say what runs
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir}: cannot load the model: {str(error).splitlines()[0]}") from None
    if not experts_modules(model):
        raise UserError(f"{model_dir}: no fused experts modules (gate_up_proj/down_proj) found")
    return model.eval()


def _token_ids(data, vocab):
    return torch.tensor(list(data), dtype=torch.int64) % vocab


def _windows(ids, context):
    """Non-overlapping windows ``[B, context]`` of a 1-D id tensor (the tail is dropped)."""
    context = min(context, len(ids))
    return ids[: len(ids) // context * context].view(-1, context)


def training_ids(vocab):
    """The whole training text as token ids (1-D)."""
    from ..host.demo import corpus

    return _token_ids(corpus.training_text(), vocab)


def calibration_ids(nbytes, vocab, context=CONTEXT):
    from ..host.demo import corpus

    return _windows(_token_ids(corpus.training_text()[:nbytes], vocab), context)


def heldout_ids(nbytes, vocab, context=CONTEXT):
    from ..host.demo import corpus

    return _windows(_token_ids(corpus.heldout(nbytes), vocab), context)


@torch.no_grad()
def perplexity(model, windows, batch_size=16):
    """Per-token perplexity of ``model`` on ``windows [B, S]`` (every token after a window's first)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        logprobs = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        total -= logprobs.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def limit_k(router, k, top_p=None, tally=None):
    """A forward hook on ``router`` that keeps its ``k`` first choices (the routers order them by
    score), rescaled to the total the full choice had when ``k`` cuts, and with ``top_p`` keeps of
    those only the first whose cumulative weight reaches ``top_p`` (the device router's dynamic
    gating: cut choices get weight 0, the kept ones keep theirs). ``tally`` (int64, at least
    ``k + 1`` entries), when given, counts the tokens by the experts they keep. Returns the hook
    handle."""

    def hook(module, args, output):
        index = next(i for i, t in enumerate(output) if torch.is_tensor(t) and not t.is_floating_point())
        weights = next(i for i, t in enumerate(output) if i != index and torch.is_tensor(t)
                       and t.shape == output[index].shape)
        w = output[weights]
        kept = w[..., :k]
        if k < w.shape[-1]:
            kept = kept * (w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-30))
        count = torch.full(kept.shape[:-1], kept.shape[-1])
        if top_p is not None:
            reached = kept.cumsum(-1) >= top_p
            count = torch.where(reached.any(-1), reached.int().argmax(-1) + 1, count)
            kept = torch.where(torch.arange(kept.shape[-1]) < count[..., None], kept, 0)
        if tally is not None:
            tally.add_(torch.bincount(count.flatten(), minlength=len(tally)))
        result = list(output)
        result[index], result[weights] = output[index][..., :k], kept.to(w.dtype)
        return tuple(result)

    return router.register_forward_hook(hook)


@contextlib.contextmanager
def int8_experts(model, calibration, config, quantized=None):
    """``model`` with golden's integer experts ``quantized[layer][expert]`` (None: the model's
    own, converted for ``config``) computed on the host (``offload`` with no device and no host
    experts); yields the :class:`Offload` handle."""
    from ..host.offload import offload

    handle = offload(model, None, policy="static", hot=0, calibration=calibration, config=config,
                     quantized=None if quantized is None else [dict(enumerate(experts)) for experts in quantized])
    try:
        yield handle
    finally:
        handle.remove()


# -- pruning -----------------------------------------------------------------------------------

def _output_error(weights, reference, x):
    from ..golden.expert import expert_float

    if not len(x):
        return None
    want = expert_float(x.double(), reference)
    return float((expert_float(x.double(), weights) - want).norm() / want.norm().clamp_min(1e-30))


# -- configs and the hardware search -----------------------------------------------------------

def _base_config(board):
    """The board's preset config, else the default one retargeted to the board where the
    config knows it."""
    from ..config import PRESETS, AccelConfig, load_config
    from ..errors import ConfigError

    base = load_config(board.name if board.name in PRESETS else "default")
    data = base.to_dict()
    data["target"]["board"] = board.name
    try:
        return AccelConfig.from_dict(data)
    except ConfigError:
        return base


def _make_config(base, meta, *, rows, cols, m, n, banks, lanes, images=1, name=None):
    """An AccelConfig for the model of ``meta`` on ``base``'s memory, link and clock."""
    from ..config import AccelConfig
    from ..golden.device import ALIGN
    from ..golden.formats import ImageLayout, align_up
    from ..host.device import batch_bytes, route_bytes

    a = base.array
    lay = ImageLayout(meta["hidden"], meta["ffn"], cols, m, n, a.weight_width, a.act_width)
    tile = max(matrix.tile_stride for matrix in lay.matrices)
    data = base.to_dict()
    data["name"] = name or base.name
    data["router"].update(experts=meta["experts"], k_max=meta["k"], lanes=lanes)
    data["array"].update(rows=rows, cols=cols, m=m, n=n, acc_width=32)
    data["loader"].update(banks=banks, bank_bytes=1 << max(6, (tile - 1).bit_length()))
    # the images, and one batch of max_tokens rows with k expert calls each above them
    tokens = base.model.max_tokens
    calls = min(meta["experts"], meta["k"] * tokens)
    need = images * align_up(lay.nbytes, ALIGN) + max(batch_bytes(meta["hidden"], tokens, calls, meta["k"] * tokens),
                                                      route_bytes(meta["experts"], meta["k"], tokens))
    data["memory"].update(size_bytes=max(4096, align_up(need, 2048)))
    data["model"].update(hidden=meta["hidden"], ffn=meta["ffn"], layers=meta["layers"])
    data["target"]["board"] = base.target.board
    return AccelConfig.from_dict(data)


def _budget(board):
    if board.family not in _MODELED_FAMILIES:
        raise UserError(f"board {board.name}: no resource model for FPGA family {board.family!r}; modeled: "
                        f"{', '.join(_MODELED_FAMILIES)}")
    return {"dsps": board.dsps, "brams": board.brams, "luts": board.luts, "ffs": board.ffs}


def _over(used, budget):
    return {key: used[key] - budget[key] for key in budget if used[key] > budget[key]}


def _expected_cycles(config, shares):
    from .model import layer_cycles

    return sum(share * layer_cycles(config, c) for layer in shares for c, share in enumerate(layer) if c and share)


def size_hardware(board, meta, shares, pruned_mn, cold):
    """The config of largest modeled tokens/s within ``board``'s budget, its resources and
    figures. ``shares[layer][c]`` is the fraction of tokens that run ``c`` experts in a layer
    (:func:`choose_k`); ``cold`` is the experts per layer the device memory should hold."""
    from ..errors import ConfigError
    from .model import resources

    budget = _budget(board)
    base = _base_config(board)
    pm, pn = pruned_mn
    lanes = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= meta["experts"]} | {meta["experts"]})
    best, closest, evaluated = None, None, 0
    for rows in SIDES:
        for cols in SIDES:
            for m, n in SPARSITIES:
                if n != pn or m < pm:  # the pruned weights must satisfy m:n
                    continue
                for banks in BANKS:
                    for lane in lanes:
                        try:
                            config = _make_config(base, meta, rows=rows, cols=cols, m=m, n=n, banks=banks, lanes=lane)
                        except ConfigError:
                            continue
                        evaluated += 1
                        used = resources(config, board.family)
                        over = _over(used, budget)
                        if over:
                            worst = max(over[key] / budget[key] for key in over)
                            if closest is None or worst < closest[0]:
                                closest = (worst, config, used, over)
                            continue
                        cycles = _expected_cycles(config, shares)
                        tps = config.target.clock_mhz * 1e6 / cycles
                        smaller = best is not None and tps == best[0] and sum(used.values()) < sum(best[2].values())
                        if best is None or tps > best[0] or smaller:
                            best = (tps, config, used)
    if best is None:
        if closest is None:
            raise UserError(f"board {board.name}: no candidate config is valid for this model")
        _, config, used, over = closest
        a = config.array
        needs = "; ".join(f"{used[key]} {_RESOURCE_NAMES[key]} of {budget[key]} (over by {amount})"
                          for key, amount in over.items())
        raise UserError(f"nothing fits board {board.name}: the closest design (rows {a.rows}, cols {a.cols}, "
                        f"{a.m}:{a.n}, banks {config.loader.banks}, router lanes {config.router.lanes}) needs {needs}")
    tps, config, used = best
    a = config.array
    images = 1
    for count in range(max(1, cold), 1, -1):  # the most cold experts of a layer the memory can hold
        bigger = _make_config(base, meta, rows=a.rows, cols=a.cols, m=a.m, n=a.n, banks=config.loader.banks,
                              lanes=config.router.lanes, images=count)
        if not _over(resources(bigger, board.family), budget):
            config, images = bigger, count
            break
    return config, {"tokens_per_second": tps, "resources": resources(config, board.family), "budget": budget,
                    "candidates": evaluated, "images_in_memory": images}


# -- the steps ---------------------------------------------------------------------------------

class _Flow:
    """One run of the flow: its options, the board, the loaded model and the steps' results."""

    def __init__(self, options, board):
        self.options = options
        self.board = board
        self.out = Path(options.out)
        self._model = None
        self.results = {}

    @property
    def model(self):
        if self._model is None:
            self._model = _load_model(self.options.model_dir)
        return self._model

    def folder(self, step):
        return self.out / step

    def result(self, step):
        """The ``result.json`` of an earlier step, from this run or read from the output folder."""
        if step not in self.results:
            path = self.folder(step) / "result.json"
            if not path.is_file():
                raise UserError(f"{path.parent}: no result of step {step!r}; run it first (or start from it)")
            self.results[step] = json.loads(path.read_text())
        return self.results[step]

    @property
    def meta(self):
        return self.result("profile")["model"]

    def calibration(self):
        return calibration_ids(self.options.calibration_bytes, self.meta["vocab"])

    def provisional_config(self):
        """The target config (the board's preset shapes) for the model: the m:n of pruning and the
        layout of the quantize step's images."""
        base = _base_config(self.board)
        a = base.array
        return _make_config(base, self.meta, rows=a.rows, cols=a.cols, m=a.m, n=a.n, banks=base.loader.banks,
                            lanes=min(base.router.lanes, self.meta["experts"]), name=f"{base.name}-target")

    def quantized(self):
        from ..golden.image import read_image

        folder = self.folder("quantize") / "images"
        return [[read_image((folder / _image_name(layer, e)).read_bytes())[1] for e in range(self.meta["experts"])]
                for layer in range(self.meta["layers"])]


def _image_name(layer, expert):
    return f"layer{layer:02d}-expert{expert:03d}.bin"


def profile(model, calibration, rows=None):
    """A profiling pass over ``calibration [B, S]``: per layer, how often each expert was chosen
    and up to ``rows`` (default :data:`~moegen.host.offload.CALIBRATION_ROWS`) of its inputs
    (``[N, hidden]``, maybe ``N == 0``)."""
    from ..host.offload import CALIBRATION_ROWS, Profiler, experts_modules

    modules = experts_modules(model)
    profiler = Profiler.run(model, modules, calibration, rows=rows or CALIBRATION_ROWS)
    experts = modules[0].gate_up_proj.shape[0]
    inputs = [[profiler.rows(m, e) for e in range(experts)] for m in modules]
    return [profiler.counts[id(m)].tolist() for m in modules], inputs


def experts_per_token(share):
    """The mean experts per token of a spread ``share`` (``share[c]``: the tokens keeping ``c``)."""
    return sum(c * value for c, value in enumerate(share))


def _candidates(k_model, thresholds):
    """Gatings ``(k, top_p)`` below ``(k_model, None)``, roughly in order of fewer expert calls."""
    for k in range(k_model, 0, -1):
        if k < k_model:
            yield k, None
        if k > 1:
            yield from ((k, p) for p in thresholds)


def _cheapest_combination(options, allowance, bins=COMBINATION_BINS):
    """One option per layer (``options[layer]``: ``(loss, experts)``, option 0 of loss 0) with
    the fewest experts in all whose losses add up to at most ``allowance``: a knapsack over
    ``bins`` steps of the allowance, each loss rounded up to whole steps."""
    unit = allowance / bins

    def steps(loss):
        return 0 if loss <= 0 else bins + 1 if unit <= 0 or math.isinf(loss) else math.ceil(loss / unit)

    best = [(0.0, ())] + [None] * bins  # best[used steps] = (experts, choice)
    for layer_options in options:
        following = [None] * (bins + 1)
        for used, state in enumerate(best):
            if state is None:
                continue
            for option, (loss, experts) in enumerate(layer_options):
                total = used + steps(loss)
                if total <= bins and (following[total] is None or state[0] + experts < following[total][0]):
                    following[total] = (state[0] + experts, (*state[1], option))
        best = following
    return min((state for state in best if state is not None), key=lambda state: state[0])[1]


def choose_k(measure, k_model, layers, budget, thresholds=TOP_P_THRESHOLDS):
    """Per-layer gating ``(k, top_p)`` that cuts the expert calls most while ``measure`` stays
    within ``budget`` of ``measure`` at the model's k.

    ``measure(gating)`` takes a ``(k, top_p)`` per layer and returns ``(perplexity, shares)``,
    ``shares[layer][c]`` the fraction of tokens that kept ``c`` experts. Each layer alone tries the
    gatings of ``_candidates`` until one goes over the budget; those that pass are its options.
    The combination with the fewest expert calls whose single-layer perplexity losses add up to
    at most the budget is measured; while it goes over, the allowance shrinks below its estimate
    and the next combination is measured (a combination met again, its options free alone but
    over budget together, loses the option that saves the most). Returns ``(gating, reference,
    final, shares, trials)``.
    """
    full = [(k_model, None)] * layers
    reference, reference_shares = measure(full)
    limit = reference * (1 + budget)
    trials, options, losses = [], [], []
    for layer in range(layers):
        options.append([(k_model, None)])
        losses.append([(0.0, experts_per_token(reference_shares[layer]))])
        for candidate in _candidates(k_model, thresholds):
            ppl, shares = measure([*full[:layer], candidate, *full[layer + 1:]])
            experts = experts_per_token(shares[layer])
            trials.append({"layer": layer, "k": candidate[0], "top_p": candidate[1], "ppl": ppl,
                           "experts_per_token": experts, "kept": ppl <= limit})
            if ppl > limit:
                break
            options[-1].append(candidate)
            losses[-1].append((ppl - reference, experts))
    allowance, tried = limit - reference, set()
    while True:
        choice = _cheapest_combination(losses, allowance)
        if choice in tried:  # its options cost nothing alone but too much together: drop the one saving most
            layer = max((layer for layer, option in enumerate(choice) if option),
                        key=lambda layer: losses[layer][0][1] - losses[layer][choice[layer]][1])
            losses[layer][choice[layer]] = (math.inf, losses[layer][choice[layer]][1])
            continue
        if not any(choice):
            return full, reference, reference, reference_shares, trials
        tried.add(choice)
        gating = [options[layer][option] for layer, option in enumerate(choice)]
        ppl, shares = measure(gating)
        trials.append({"gating": gating, "ppl": ppl, "kept": ppl <= limit})
        if ppl <= limit:
            return gating, reference, ppl, shares, trials
        estimate = sum(max(0.0, losses[layer][option][0]) for layer, option in enumerate(choice))
        allowance = SHRINK * min(allowance, estimate)


@contextlib.contextmanager
def gated(routers, gating, k_model):
    """The routers of each layer limited by ``gating`` (a ``(k, top_p)`` per layer,
    :func:`limit_k`) inside the block; yields each layer's tally of tokens by experts kept
    (``[k_model + 1]``)."""
    tallies = [torch.zeros(k_model + 1, dtype=torch.int64) for _ in routers]
    hooks = [limit_k(router, k, top_p, tally)
             for router, (k, top_p), tally in zip(routers, gating, tallies, strict=True)]
    try:
        yield tallies
    finally:
        for hook in hooks:
            hook.remove()


def shares_of(tallies):
    """Each tally of :func:`gated` as fractions of its tokens."""
    return [(tally / tally.sum().clamp_min(1)).tolist() for tally in tallies]


def _profile(flow, folder):
    from ..host.offload import experts_modules

    model = flow.model
    modules = experts_modules(model)
    experts, two_ffn, hidden = modules[0].gate_up_proj.shape
    meta = {"family": model.config.model_type, "hidden": int(hidden), "ffn": int(two_ffn) // 2,
            "experts": int(experts), "layers": len(modules), "k": int(model.config.num_experts_per_tok),
            "vocab": int(model.config.vocab_size)}
    flow.results["profile"] = {"model": meta}
    calibration = flow.calibration()
    counts, inputs = profile(model, calibration, rows=PROFILE_ROWS)
    torch.save({"inputs": inputs}, folder / "profile.pt")
    return {"model": meta, "calibration_tokens": calibration.numel(), "counts": counts}


def _profile_inputs(flow):
    return torch.load(flow.folder("profile") / "profile.pt", weights_only=True)["inputs"]


def _prune(flow, folder):
    from ..host.offload import expert_weights, experts_modules
    from .prune import prune, pruned_copy, recover

    options = flow.options
    config = flow.provisional_config()
    m, n = config.array.m, config.array.n
    inputs = _profile_inputs(flow)
    errors = {method: [] for method in ("magnitude", options.prune_method)}
    dense, pruned = [], []
    for layer, module in enumerate(experts_modules(flow.model)):
        dense.append([expert_weights(module, e) for e in range(flow.meta["experts"])])
        pruned.append([prune(options.prune_method, weights, x, m, n)
                       for weights, x in zip(dense[-1], inputs[layer], strict=True)])
        for weights, chosen, x in zip(dense[-1], pruned[-1], inputs[layer], strict=True):
            for method in errors:
                error = _output_error(chosen if method == options.prune_method else prune(method, weights, x, m, n),
                                      weights, x)
                if error is not None:
                    errors[method].append(error)
    result = {"m": m, "n": n, "method": options.prune_method,
              "mean_output_error": {method: sum(values) / len(values) if values else None
                                    for method, values in errors.items()}}
    if options.recover_steps:
        student = pruned_copy(flow.model, pruned)
        losses = recover(student, flow.model, training_ids(flow.meta["vocab"]), steps=options.recover_steps,
                         context=CONTEXT)
        pruned = [[expert_weights(module, e) for e in range(flow.meta["experts"])]
                  for module in experts_modules(student)]
        recovered = [_output_error(weights, reference, x)
                     for layer in range(len(pruned))
                     for weights, reference, x in zip(pruned[layer], dense[layer], inputs[layer], strict=True)]
        recovered = [error for error in recovered if error is not None]
        result["recovery"] = {"steps": options.recover_steps, "loss_first": losses[0], "loss_last": losses[-1],
                              "mean_output_error": sum(recovered) / len(recovered) if recovered else None}
    torch.save({"experts": [[{"gate": w.gate, "up": w.up, "down": w.down} for w in layer] for layer in pruned]},
               folder / "pruned.pt")
    return result


def _quantize(flow, folder):
    from ..golden.expert import ExpertWeights, quantize_expert
    from ..golden.image import write_image
    from ..host.offload import CALIBRATION_ROWS

    config = flow.provisional_config()
    a = config.array
    inputs = _profile_inputs(flow)
    pruned = torch.load(flow.folder("prune") / "pruned.pt", weights_only=True)["experts"]
    (folder / "images").mkdir()
    scales = []
    for layer, experts in enumerate(pruned):
        everything = torch.cat(inputs[layer])
        layer_scales = []
        for e, weights in enumerate(experts):
            calib = inputs[layer][e] if len(inputs[layer][e]) else everything[:CALIBRATION_ROWS]
            qe = quantize_expert(ExpertWeights(**weights), calib, m=a.m, n=a.n, cols=a.cols,
                                 weight_bits=a.weight_width, act_bits=a.act_width)
            (folder / "images" / _image_name(layer, e)).write_bytes(
                write_image(qe, config_hash=config.device_hash, expert_id=e, layer=layer))
            layer_scales.append(qe.out_scale)
        scales.append(layer_scales)
    return {"m": a.m, "n": a.n, "cols": a.cols, "weight_bits": a.weight_width, "act_bits": a.act_width,
            "out_scales": scales}


def _choose_k(flow, folder):
    meta, budget = flow.meta, flow.options.ppl_budget
    heldout = heldout_ids(flow.options.heldout_bytes, meta["vocab"])
    model = flow.model
    with int8_experts(model, flow.calibration(), flow.provisional_config(), flow.quantized()) as handle:
        def measure(gating):
            with gated(handle.routers, gating, meta["k"]) as tallies:
                return perplexity(model, heldout), shares_of(tallies)

        gating, reference, final, shares, trials = choose_k(measure, meta["k"], meta["layers"], budget)
    macs = 3 * meta["hidden"] * meta["ffn"]
    experts = sum(experts_per_token(share) for share in shares)
    full = meta["k"] * meta["layers"]
    return {"k": [k for k, _ in gating], "top_p": [p for _, p in gating], "k_model": meta["k"],
            "ppl_int8": reference, "ppl_chosen": final, "ppl_budget": budget, "heldout_tokens": heldout.numel(),
            "experts_per_token": shares, "trials": trials,
            "expert_macs_per_token": {"model_k": full * macs, "chosen": experts * macs},
            "macs_saved": 1 - experts / full}


def _place(flow, folder):
    experts = flow.meta["experts"]
    hot = flow.options.host_experts
    hot = max(1, experts // 4) if hot is None else hot
    if not 0 <= hot <= experts:
        raise UserError(f"--host-experts must be in 0..{experts} (experts per layer), not {hot}")
    counts = flow.result("profile")["counts"]
    placement = []
    for layer_counts in counts:
        order = sorted(range(experts), key=lambda e: (-layer_counts[e], e))
        share = sum(layer_counts[e] for e in order[:hot]) / max(1, sum(layer_counts))
        placement.append({"host": sorted(order[:hot]), "device": sorted(order[hot:]), "host_share": share})
    return {"host_experts": hot, "layers": placement}


def _size_hardware(flow, folder):
    prune = flow.result("prune")
    shares = flow.result("choose-k")["experts_per_token"]
    cold = flow.meta["experts"] - flow.result("place")["host_experts"]
    config, figures = size_hardware(flow.board, flow.meta, shares, (prune["m"], prune["n"]), cold)
    name = f"compiled-{flow.board.name}"
    config = config.from_dict({**config.to_dict(), "name": name})
    (folder / "config.yaml").write_text(config.to_yaml())
    a = config.array
    return {**figures, "config": name, "hash": config.hash, "device_hash": config.device_hash,
            "array": {"rows": a.rows, "cols": a.cols, "m": a.m, "n": a.n}, "banks": config.loader.banks,
            "router_lanes": config.router.lanes, "memory_bytes": config.memory.size_bytes}


def _repack(qe, m, n, cols):
    from ..golden.pack import pack_mn, unpack_mn

    bits = qe.gate.layout.value_bits
    return dataclasses.replace(qe, **{name: pack_mn(unpack_mn(getattr(qe, name)), m, n, cols, value_bits=bits)
                                      for name in ("gate", "up", "down")})


def _emit(flow, folder):
    from ..config import load_config
    from ..golden.image import read_image, write_image

    config = load_config(str(flow.folder("size-hardware") / "config.yaml"))
    a = config.array
    (folder / "config.yaml").write_text(config.to_yaml())
    images = folder / "images"
    images.mkdir()
    for layer, experts in enumerate(flow.quantized()):
        for e, qe in enumerate(experts):
            data = write_image(_repack(qe, a.m, a.n, a.cols), config_hash=config.device_hash, expert_id=e, layer=layer)
            read_image(data, config_hash=config.device_hash, expert_id=e, layout=config.image_layout)
            (images / _image_name(layer, e)).write_bytes(data)
    report = {"model_dir": str(flow.options.model_dir), "board": flow.board.name,
              **{step: flow.result(step) for step in STEPS[:-1]},
              "emit": {"config": "config.yaml", "images": len(list(images.iterdir())), "hash": config.hash}}
    del report["quantize"]["out_scales"]
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text(_markdown(report))
    return report["emit"]


def _fraction(value):
    return "(no calibration inputs)" if value is None else f"{value:.4f}"


def _markdown(report):
    meta, k, hw = report["profile"]["model"], report["choose-k"], report["size-hardware"]
    prune = report["prune"]
    errors = ", ".join(f"{method} {_fraction(error)}" for method, error in prune["mean_output_error"].items())
    recovery = prune.get("recovery")
    recovered = [] if recovery is None else [
        f"Recovery fine-tune: {recovery['steps']} steps, distillation loss {recovery['loss_first']:.4f} to "
        f"{recovery['loss_last']:.4f}, mean relative output error after it "
        f"{_fraction(recovery['mean_output_error'])}.", ""]
    gating = ", ".join(f"k {k}" if p is None else f"k {k} top-p {p}" for k, p in zip(k["k"], k["top_p"], strict=True))
    lines = [
        f"# moegen compile: {report['model_dir']} on {report['board']}", "",
        f"Model: {meta['family']}, {meta['layers']} MoE layers of {meta['experts']} experts (top-{meta['k']}), "
        f"hidden {meta['hidden']}, expert ffn {meta['ffn']}.", "",
        "## Pruning and quantization", "",
        f"{prune['m']}:{prune['n']}, mean relative expert output error on calibration inputs: {errors} "
        f"(kept: {prune['method']}).", "", *recovered,
        "## Per-layer k", "",
        f"int8 perplexity {k['ppl_int8']:.4f} with k = {k['k_model']}; chosen per layer: {gating}: "
        f"{k['ppl_chosen']:.4f} (budget {100 * k['ppl_budget']:.2f}%); expert MACs saved "
        f"{100 * k['macs_saved']:.1f}%.", "",
        "| layer | host experts | host share of choices |", "| --- | --- | --- |",
        *(f"| {i} | {layer['host']} | {layer['host_share']:.2f} |"
          for i, layer in enumerate(report["place"]["layers"])),
        "", "## Hardware", "",
        f"Array {hw['array']['rows']}x{hw['array']['cols']} {hw['array']['m']}:{hw['array']['n']}, {hw['banks']} "
        f"banks, {hw['router_lanes']} router lanes, {hw['memory_bytes']} bytes of device memory "
        f"({hw['images_in_memory']} images); modeled {hw['tokens_per_second']:.1f} tokens/s "
        f"({hw['candidates']} candidates).", "",
        "| resource | modeled | budget |", "| --- | --- | --- |",
        *(f"| {key} | {hw['resources'][key]} | {hw['budget'][key]} |" for key in hw["budget"]),
        "", f"Config hash {hw['hash']} (device 0x{hw['device_hash']:08x}).", "",
    ]
    return "\n".join(lines)


_STEP_FUNCTIONS = {"profile": _profile, "prune": _prune, "quantize": _quantize, "choose-k": _choose_k,
                   "place": _place, "size-hardware": _size_hardware, "emit": _emit}


def compile_model(options, *, start="profile", stop="emit", progress=print):
    """Run the steps ``start`` through ``stop`` of :data:`STEPS`; returns ``{step: result}``.

    Steps before ``start`` must have results in ``options.out``. A failing step leaves no folder
    of its own behind (and earlier steps' folders as they were).
    """
    first, last = _step_index(start, "--from"), _step_index(stop, "--until")
    if first > last:
        raise UserError(f"--from {start} comes after --until {stop}")
    board = _check_options(options)
    flow = _Flow(options, board)
    for step in STEPS[:first]:
        flow.result(step)
    flow.out.mkdir(parents=True, exist_ok=True)
    begin = time.monotonic()
    for index in range(first, last + 1):
        step = STEPS[index]
        progress(f"[{index + 1}/{len(STEPS)}] {step} ({time.monotonic() - begin:.1f} s)")
        temporary = flow.out / f".{step}.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        try:
            result = _STEP_FUNCTIONS[step](flow, temporary)
            (temporary / "result.json").write_text(json.dumps(result, indent=1))
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        shutil.rmtree(flow.folder(step), ignore_errors=True)
        temporary.rename(flow.folder(step))
        flow.results[step] = result
    progress(f"done: {', '.join(STEPS[first:last + 1])} in {flow.out} ({time.monotonic() - begin:.1f} s)")
    return {step: flow.results[step] for step in STEPS[first:last + 1]}

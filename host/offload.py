"""Offload a Hugging Face MoE model's cold experts to a moegen device.

``offload(model, device, policy=..., hot=..., calibration=...)`` registers moegen as an
experts implementation (transformers' ``ExpertsInterface``) and switches the model to it.
The model's own router and shared experts stay where they are; each MoE layer's experts
call comes to :class:`OffloadedLayer`, which asks the placement policy
(:mod:`moegen.host.policies`) where each selected expert runs:

* ``host``: the float expert on the model's device (CPU, or GPU when the model is there);
* ``move``: the expert's weights are first moved into the host's expert cache (what
  mixtral-offloading does), then it runs on the host;
* ``device``: the tokens of all such experts are grouped per expert and sent to the
  accelerator in one batch per layer step (``Device.run_experts``): int8 activations out,
  int32 accumulators back.

Conversion happens once, in :func:`offload`: a profiling pass over ``calibration`` tokens
records each expert's inputs and how often it is chosen; every expert is pruned to the
device's M:N pattern, quantized with those inputs as calibration (golden's static scales),
written as an expert image and uploaded. The accumulator adds ``weight * y`` per token; the
host folds each expert's output scale ``s_e`` into the weight (``round(w * s_e / s * 2**15)``,
``s`` the layer's largest) and scales the sum by ``s / 2**15``.

With ``block=True`` the whole routed MoE block runs on the device, for models whose experts
all fit in its memory: the host computes the router's logits (``E x H`` MACs per token, a
few percent of one expert's), quantizes them to the router's fixed-point format and the
device's router chooses the experts and their weights (``Device.route``, each layer's ``K``
register set to the model's top-k); every chosen expert then runs on the device with its
tokens, accumulated there. The model's own choice is only compared: the telemetry counts
the tokens whose expert set the device chose differently (fixed-point logits can break
near-ties the other way). Shared experts stay on the host.

A device call that fails (timeout, link or device error) is computed on the host with
golden's integer expert (and golden's router) instead, bit-identical to what the device
returns, with one warning and a count in the telemetry: the model's output does not change.
"""

import time
import warnings
import weakref
from typing import NamedTuple

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..errors import UserError
from ..golden.device import ALIGN, WEIGHT_ONE, wrap_int32
from ..golden.expert import ExpertWeights, expert_int, prune_expert, quantize_activations, quantize_expert
from ..golden.formats import align_up
from ..golden.image import write_image
from ..golden.router import quantize_logits, route
from .device import DeviceError, batch_bytes, route_bytes
from .link import LinkError, LinkTimeout
from .policies import make_policy
from .telemetry import Telemetry

__all__ = ["BLOCK_FAMILIES", "IMPLEMENTATION", "SUPPORTED_FAMILIES", "HostCost", "Offload", "OffloadedLayer",
           "Profiler", "block_rows", "experts_modules", "float_expert", "offload"]

#: The name moegen registers in transformers' ExpertsInterface.
IMPLEMENTATION = "moegen"
#: ``config.model_type`` of the supported families (shared experts, where a family has them,
#: stay on the host).
SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
#: Calibration rows kept per expert.
CALIBRATION_ROWS = 256
#: Calibration rows kept per layer (the prefetch predictor's fit), the same tokens in each.
LAYER_ROWS = 4096
#: Families whose routing the device's router computes, for block mode (Mixtral renormalizes
#: over the chosen experts; Qwen2-MoE, Qwen3-MoE and OLMoE do when ``norm_topk_prob``).
#: DeepSeek-V3's group-limited routing stays on the host.
BLOCK_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

_LAYERS = weakref.WeakKeyDictionary()  # experts module -> OffloadedLayer


def _moegen_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    layer = _LAYERS.get(module)
    if layer is None:  # a module this process did not offload: transformers' own forward
        return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)
    return layer(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _moegen_experts_forward)


def experts_modules(model):
    """The fused experts modules of ``model`` in layer order (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``)."""
    found = []
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if type(module).__name__.endswith("Experts") and {"gate_up_proj", "down_proj"} <= params.keys():
            found.append(module)
    return found


def _check_family(model, config):
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"model type {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
    modules = experts_modules(model)
    if not modules:
        raise UserError(f"{type(model).__name__}: no fused experts modules (gate_up_proj/down_proj) found")
    _, two_ffn, hidden = modules[0].gate_up_proj.shape
    want = (config.model.hidden, config.model.ffn)
    if (hidden, two_ffn // 2) != want:
        raise UserError(f"model experts are hidden {hidden}, ffn {two_ffn // 2}; device config {config.name!r} has "
                        f"model.hidden {want[0]}, model.ffn {want[1]}")
    if len(modules) > config.model.layers:
        raise UserError(f"model has {len(modules)} MoE layers; device config {config.name!r} has model.layers "
                        f"{config.model.layers}")
    return modules


def expert_weights(module, e):
    """Float weights of expert ``e`` of a fused experts module."""
    gate, up = module.gate_up_proj[e].detach().float().cpu().chunk(2, dim=0)
    return ExpertWeights(gate, up, module.down_proj[e].detach().float().cpu())


def float_expert(module, e, x):
    """Expert ``e`` of a fused experts module on ``x [T, hidden]``, as the model computes it."""
    gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(module.act_fn(gate) * up, module.down_proj[e])


class Profiler:
    """Records each expert's inputs and selection counts during a calibration pass."""

    def __init__(self, modules, rows):
        self.limit = rows
        self.inputs = {id(m): {} for m in modules}
        self.counts = {id(m): torch.zeros(m.gate_up_proj.shape[0], dtype=torch.int64) for m in modules}
        self.layer_inputs = {id(m): [] for m in modules}  # the first LAYER_ROWS tokens of each layer

    def rows(self, module, expert):
        """The recorded inputs of ``expert`` of ``module``: ``[N, hidden]``, ``N`` up to the
        row limit, maybe 0."""
        kept = self.inputs[id(module)].get(expert)
        if not kept:
            return torch.zeros(0, module.gate_up_proj.shape[2])
        return torch.cat(kept)[:self.limit]

    @classmethod
    def run(cls, model, modules, calibration, rows=CALIBRATION_ROWS):
        """One forward pass of ``model`` over ``calibration`` token ids with every experts
        module recorded; returns the profiler (``counts``, ``inputs`` by ``id(module)``)."""
        profiler = cls(modules, rows)
        previous = model.config._experts_implementation
        ALL_EXPERTS_FUNCTIONS.register("moegen-profile", profiler)
        model.set_experts_implementation("moegen-profile")
        try:
            with torch.no_grad():
                model(input_ids=calibration.to(model.device))
        finally:
            model.set_experts_implementation(previous)
        return profiler

    def __call__(self, module, hidden_states, top_k_index, top_k_weights):
        inputs, counts = self.inputs[id(module)], self.counts[id(module)]
        kept = self.layer_inputs[id(module)]
        room = LAYER_ROWS - sum(len(x) for x in kept)  # the same first rows in every layer
        if room > 0:
            kept.append(hidden_states[:room].detach().float().cpu())
        for e in top_k_index.unique().tolist():
            if e >= len(counts):
                continue
            tokens = (top_k_index == e).any(-1)
            counts[e] += int(tokens.sum())
            kept = inputs.setdefault(e, [])
            if sum(len(x) for x in kept) < self.limit:
                kept.append(hidden_states[tokens].detach().float().cpu())
        return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)


class OffloadedLayer:
    """One MoE layer's experts under a policy: host float experts, moved experts, device
    experts; see the module docstring."""

    def __init__(self, index, module, quantized, handles, offload):
        self.index = index
        self.module = module
        self.router = offload.routers[index]
        self.k = self.router.top_k
        self.quantized = quantized  # expert -> QuantizedExpert
        self.handles = handles  # expert -> ExpertHandle
        self.offload = offload
        self.out_scale = max(qe.out_scale for qe in quantized.values())
        #: Each expert's output scale over the layer's, folded into its accumulation weights.
        self.scale_ratio = {e: qe.out_scale / self.out_scale for e, qe in quantized.items()}
        self.experts = module.gate_up_proj.shape[0]

    def host_expert(self, e, x):
        return float_expert(self.module, e, x)

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        off = self.offload
        if off.block_rows is not None:
            return self._block(hidden_states, top_k_index).to(hidden_states.device, hidden_states.dtype)
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        picked = top_k_index[(top_k_index >= 0) & (top_k_index < self.experts)]
        counts = torch.bincount(picked.flatten().cpu(), minlength=self.experts)
        chosen = {e: int(counts[e]) for e in counts.nonzero().flatten().tolist()}
        placement = off.policy.place(self.index, chosen, hidden_states)
        device_experts = []
        for e in chosen:
            where = placement[e]
            tokens, slot = torch.where(top_k_index == e)
            if where == "device":
                device_experts.append((e, tokens.cpu(), top_k_weights[tokens, slot].detach().double().cpu()))
                continue
            start = time.perf_counter()
            y = self.host_expert(e, hidden_states[tokens])
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).float())
            off.telemetry.host_call(self.index, e, len(tokens), time.perf_counter() - start, moved=where == "move",
                                    weight_bytes=off.expert_bytes)
        if device_experts:
            out += self._device_experts(hidden_states, device_experts).to(out.device)
        return out.to(hidden_states.dtype)

    def _device_experts(self, hidden_states, calls):
        """Cold experts on the device, ``max_tokens`` rows at a time; returns ``[T, H]``."""
        rows_max = self.offload.config.model.max_tokens
        x = hidden_states.detach().float().cpu()
        total = torch.zeros(x.shape, dtype=torch.float64)
        for start in range(0, len(x), rows_max):
            stop = min(start + rows_max, len(x))
            chunk = []
            for e, tokens, weights in calls:
                inside = (tokens >= start) & (tokens < stop)
                if inside.any():
                    chunk.append((e, tokens[inside] - start, weights[inside]))
            if chunk:
                total[start:stop] = self._device_rows(x[start:stop], chunk)
        return total.float()

    def _device_rows(self, x, calls):
        """One device batch: rows ``x [R, H]`` (``R <= max_tokens``) and ``calls`` ``(expert,
        rows, float weights)``; returns the weighted sum ``[R, H]`` (float64)."""
        # per-token quantization: each row once, whichever experts chose it
        x_q, mult, shift, _ = quantize_activations(x, self.offload.config.array.act_width)
        batch = []
        for e, rows, weights in calls:
            wq = torch.clamp(torch.round(weights * self.scale_ratio[e] * WEIGHT_ONE), 0, WEIGHT_ONE).to(torch.int64)
            batch.append((e, x_q[rows], mult[rows], shift[rows], rows, wq))
        return self._run(batch, len(x)).double() * (self.out_scale / WEIGHT_ONE)

    def _block(self, hidden_states, model_choice):
        """The routed block on the device: route the quantized logits there, then run every
        chosen expert; returns ``[T, H]``. Counts the tokens where the device chose other
        experts than the model (``model_choice``)."""
        off = self.offload
        r = off.config.router
        x = hidden_states.detach().float().cpu()
        logits = quantize_logits(torch.nn.functional.linear(x, self.router.weight.detach().float().cpu()),
                                 width=r.logit_width, frac=r.logit_frac)
        total = torch.zeros(x.shape, dtype=torch.float64)
        model_sets = model_choice.cpu().sort(-1).values
        for start in range(0, len(x), off.block_rows):
            stop = min(start + off.block_rows, len(x))
            routing = self._route(logits[start:stop])
            chosen = routing.indices[:, :self.k]
            off.telemetry.routed(self.index, stop - start,
                                 int((chosen.sort(-1).values != model_sets[start:stop]).any(-1).sum()))
            experts = chosen[chosen >= 0].unique().tolist()
            off.policy.place(self.index, dict.fromkeys(experts, 0), None)  # all resident there: counts the hits
            calls = []
            for e in experts:
                rows, slot = torch.where(chosen == e)
                calls.append((e, rows, routing.weights[rows, slot].double() / (1 << (r.weight_width - 1))))
            total[start:stop] = self._device_rows(x[start:stop], calls)
        return total.float()

    def _route(self, logits):
        """Device routing of fixed-point logits (its cycles and link bytes counted); golden's
        router when there is no device or it fails."""
        r = self.offload.config.router
        routing, cycles, sent, received, fallback = self._on_device(
            lambda device: device.route(logits, layer=self.index))
        if routing is None:
            routing = route(logits, k=self.k, mode=r.mode, logit_frac=r.logit_frac, weight_width=r.weight_width)
        self.offload.telemetry.route_call(self.index, cycles=cycles, link_bytes=sent + received, fallback=fallback)
        return routing

    def _on_device(self, call):
        """``call(device)`` with its busy cycles and link bytes: ``(result, cycles, bytes out,
        bytes in, fallback)``; result None when there is no device or the call failed (one
        warning)."""
        off = self.offload
        device = off.device
        if device is None:
            return None, 0, 0, 0, False
        stats = device.link.stats
        sent, received, counters = stats["bytes_out"], stats["bytes_in"], off.device_counters()
        try:
            result = call(device)
            cycles, fallback = off.device_counters() - counters, False
        except (DeviceError, LinkError, LinkTimeout, OSError) as error:
            off.warn_fallback(error)
            result, cycles, fallback = None, 0, True
        return result, cycles, stats["bytes_out"] - sent, stats["bytes_in"] - received, fallback

    def _run(self, batch, rows):
        """One device batch; the golden reference when there is no device or it fails."""
        off = self.offload
        start = time.perf_counter()
        calls = [(self.handles.get(e), x_q, mult, shift, r.tolist(), w.tolist()) for e, x_q, mult, shift, r, w in batch]
        acc, cycles, sent, received, fallback = self._on_device(lambda device: device.run_experts(calls, rows))
        if acc is None:
            acc = self.reference(batch, rows)
        elapsed = time.perf_counter() - start
        tokens = sum(len(b[1]) for b in batch)
        for e, x_q, *_ in batch:
            share = len(x_q) / tokens
            off.telemetry.device_call(self.index, e, len(x_q), cycles=round(cycles * share),
                                      bytes_out=round(sent * share), bytes_in=round(received * share),
                                      seconds=elapsed * share, fallback=fallback)
        return acc

    def reference(self, batch, rows):
        """Golden's integer result of a device batch (the fallback, bit-identical)."""
        acc = torch.zeros(rows, self.module.down_proj.shape[1], dtype=torch.int64)
        for e, x_q, mult, shift, r, w in batch:
            y = expert_int(x_q, mult, shift, self.quantized[e])
            acc[r] += w[:, None] * y
        return wrap_int32(acc)


class Offload:
    """The handle :func:`offload` returns: layers, policy, telemetry, and undo.

    Members
    -------
    layers : list of OffloadedLayer
    policy : Policy
    block_rows : int or None
        Rows per device batch when the whole routed block runs on the device (router
        included; what the memory above the images holds); None otherwise.
    telemetry : Telemetry
    frequency : list of tensor
        Per layer, how often the calibration pass chose each expert.
    calibration : list of tensor
        Per layer, the experts' inputs ``[N, hidden]`` of the calibration pass, up to
        :data:`LAYER_ROWS` (row ``i`` is the same token in every layer).
    host_cost : HostCost
        The host's measured time for one expert call (for modeled times and ``cost``).
    """

    def __init__(self, model, device, config, frequency, *, block_rows=None):
        self.model = model
        self.device = device
        self.config = config
        self.block_rows = block_rows
        self.policy = None
        self.frequency = frequency
        self.layers = []
        self.telemetry = Telemetry(len(frequency), len(frequency[0]))
        self.warned = False
        self.routers = []
        self.calibration = []
        self.host_cost = None
        self.previous = model.config._experts_implementation
        if device is not None and not config.device.counters:
            warnings.warn(f"moegen: config {config.name!r} has no counter registers (device.counters: false): "
                          "the telemetry's device cycles read 0", RuntimeWarning, stacklevel=3)

    @property
    def expert_bytes(self):
        """Bytes of one expert image (what a weight move carries)."""
        return self.config.image_layout.nbytes

    def device_counters(self):
        """``BUSY_CYCLES``; 0 without a device or counters (``device.counters: false``)."""
        if self.device is None or not self.config.device.counters:
            return 0
        try:
            return self.device.read_reg("BUSY_CYCLES")
        except (LinkError, LinkTimeout, OSError):
            return 0

    def warn_fallback(self, error):
        if not self.warned:
            warnings.warn(f"moegen: device call failed ({error}); computing on the host instead", RuntimeWarning,
                          stacklevel=4)
            self.warned = True

    def report(self):
        """The telemetry as a text table."""
        return self.telemetry.report()

    def plot(self, path):
        """Placement heat map and hit rate over time, as an image file."""
        return self.telemetry.plot(path)

    def remove(self):
        """Give the model back its previous experts implementation."""
        for layer in self.layers:
            _LAYERS.pop(layer.module, None)
        self.model.set_experts_implementation(self.previous)


class HostCost(NamedTuple):
    """The host's time for one float expert call: ``call_s + tokens * token_s``."""

    call_s: float
    token_s: float

    def seconds(self, calls, tokens):
        return calls * self.call_s + tokens * self.token_s

    @classmethod
    def measure(cls, module, tokens_max, repeats=20):
        """Time expert 0 of ``module`` on 1 and ``tokens_max`` tokens (the fastest of
        ``repeats`` runs each, the usual defence against a busy machine's outliers)."""
        def fastest(tokens):
            x = torch.randn(tokens, module.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(0))
            x = x.to(module.gate_up_proj.device, module.gate_up_proj.dtype)
            best = float("inf")
            with torch.no_grad():
                for _ in range(repeats):
                    start = time.perf_counter()
                    float_expert(module, 0, x).sum().item()
                    best = min(best, time.perf_counter() - start)
            return best

        one, many = fastest(1), fastest(max(2, tokens_max))
        token_s = max(0.0, (many - one) / (max(2, tokens_max) - 1))
        return cls(max(0.0, one - token_s), token_s)


def _quantize(module, profiler, config):
    """Every expert of ``module`` pruned to the config's M:N and quantized, calibrated on its
    profiled inputs (an expert the pass never chose: 16 seeded Gaussian rows)."""
    a = config.array
    quantized = {}
    for e in range(module.gate_up_proj.shape[0]):
        calib = profiler.rows(module, e)
        if not len(calib):
            calib = torch.randn(16, config.model.hidden, generator=torch.Generator().manual_seed(e))
        pruned = prune_expert(expert_weights(module, e), a.m, a.n)
        quantized[e] = quantize_expert(pruned, calib, m=a.m, n=a.n, cols=a.cols, weight_bits=a.weight_width,
                                       act_bits=a.act_width)
    return quantized


def _router_of(model, experts):
    """The router (``gate``) next to an experts module."""
    for module in model.modules():
        if getattr(module, "experts", None) is experts and hasattr(module, "gate"):
            return module.gate
    raise UserError(f"{type(model).__name__}: no router next to an experts module")


def block_rows(config, layers, experts, k, floor=0):
    """Rows per device batch when all ``layers x experts`` images are on the device above
    ``floor`` bytes already used: the most (up to ``max_tokens``) whose buffers fit above
    them; a :class:`UserError` when none do."""
    model, r = config.model, config.router
    images = floor + layers * experts * align_up(config.image_layout.nbytes, ALIGN)
    free = config.memory.size_bytes - images

    def buffers(rows):  # up to k expert calls per row, or the routing of the rows
        return max(batch_bytes(model.hidden, rows, min(experts, k * rows), k * rows),
                   route_bytes(r.experts, r.k_max, rows))

    fits = [rows for rows in range(1, model.max_tokens + 1) if buffers(rows) <= free]
    if not fits:
        raise UserError(f"block mode needs all {layers} x {experts} expert images on the device ({images} bytes "
                        f"with what is there) plus {buffers(1)} bytes of buffers; config {config.name!r} has "
                        f"memory.size_bytes {config.memory.size_bytes}: use a larger memory or offload without "
                        f"block=True")
    return fits[-1]


def _block_mode(model, router, config):
    """The router mode a family's block needs; an error when the device's differs."""
    family = model.config.model_type
    if family not in BLOCK_FAMILIES:
        raise UserError(f"block mode supports {', '.join(BLOCK_FAMILIES)}; model type {family!r} routes on the host")
    renorm = family == "mixtral" or getattr(router, "norm_topk_prob", False)
    mode = "softmax_topk_renorm" if renorm else "softmax_topk"
    if config.router.mode != mode:
        raise UserError(f"this {family} model routes with {mode}; device config {config.name!r} has router.mode "
                        f"{config.router.mode}")
    if router.top_k > config.router.k_max:
        raise UserError(f"the model chooses {router.top_k} experts per token; device config {config.name!r} has "
                        f"router.k_max {config.router.k_max}")
    if router.weight.shape[0] != config.router.experts:
        raise UserError(f"the model has {router.weight.shape[0]} experts per layer; device config {config.name!r} "
                        f"has router.experts {config.router.experts}")


def offload(model, device, *, policy=None, hot=None, calibration=None, quantized=None, block=False,
            host_cost=None, **policy_options):
    """Put ``model``'s cold experts on ``device``; returns an :class:`Offload` handle.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A supported MoE family (:data:`SUPPORTED_FAMILIES`) whose expert shapes match the
        device's config.
    device : moegen.host.Device
        A connected device (``open_device``); ``None`` computes device calls with golden on
        the host (the int8 reference).
    policy : str
        A placement policy name (:data:`moegen.host.policies.POLICIES`); default ``static``.
    hot : int
        Experts per layer the host keeps (its expert cache or static hot set); default
        a quarter of the experts.
    calibration : LongTensor ``[B, S]``
        Token ids for the profiling pass (expert frequencies and quantization inputs).
    quantized : list of dict or None
        Per layer, ``expert -> QuantizedExpert`` to use instead of converting the model's
        experts again (for instance ``[layer.quantized for layer in other.layers]``).
    block : bool
        Run the whole routed block on the device, router included (:data:`BLOCK_FAMILIES`;
        every expert image must fit in device memory); takes no ``policy`` or ``hot``.
    host_cost : HostCost or None
        The host's expert cost to decide and model with; measured (:meth:`HostCost.measure`)
        when None. Pass one to compare runs on the same footing.
    policy_options
        Passed to the policy (``link`` for ``cost``); ``config`` (an AccelConfig) when
        ``device`` is None.
    """
    config = device.config if device is not None else policy_options.pop("config")
    modules = _check_family(model, config)
    if calibration is None:
        raise UserError("offload needs calibration token ids (a [batch, seq] tensor) for its profiling pass")
    experts = modules[0].gate_up_proj.shape[0]
    routers = [_router_of(model, module) for module in modules]
    if block:
        if policy is not None or hot is not None:
            raise UserError("block=True runs every expert on the device: give no policy or hot")
        for router in routers:
            _block_mode(model, router, config)
        rows = block_rows(config, len(modules), experts, routers[0].top_k,
                          0 if device is None else device.images_end)
        policy, hot = "static", 0
    else:
        rows = None
    policy = "static" if policy is None else policy
    hot = max(1, experts // 4) if hot is None else hot
    if not 0 <= hot <= experts:
        raise UserError(f"hot must lie in 0..{experts} (experts per layer), not {hot}")

    if quantized is not None and len(quantized) != len(modules):
        raise UserError(f"quantized has {len(quantized)} layers; the model has {len(modules)} MoE layers")
    profiler = Profiler.run(model, modules, calibration)
    handle = Offload(model, device, config, [profiler.counts[id(m)] for m in modules], block_rows=rows)
    handle.routers = routers
    handle.calibration = [torch.cat(profiler.layer_inputs[id(m)]) for m in modules]
    handle.host_cost = HostCost.measure(modules[0], config.model.max_tokens) if host_cost is None else host_cost
    handle.policy = make_policy(policy, handle, hot=hot, **policy_options)
    for index, module in enumerate(modules):
        experts_q = quantized[index] if quantized is not None else _quantize(module, profiler, config)
        handles = {}
        for e in range(experts):
            if device is not None and handle.policy.uses_device(index, e):
                image = write_image(experts_q[e], config_hash=config.device_hash, expert_id=e, layer=index)
                handles[e] = device.upload_expert(image, expert=e)
        if block and device is not None:
            device.set_k(index, routers[index].top_k)
        handle.layers.append(OffloadedLayer(index, module, experts_q, handles, handle))
    for layer in handle.layers:
        _LAYERS[layer.module] = layer
    model.set_experts_implementation(IMPLEMENTATION)
    return handle

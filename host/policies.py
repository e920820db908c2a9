"""Placement policies: for each MoE layer step, where each chosen expert runs.

A policy answers ``place(layer, experts, hidden) -> {expert: "host" | "move" | "device"}``
(``experts`` maps each chosen expert to its token count; see :mod:`moegen.host.offload`) and
``uses_device(layer, expert)`` (which images to upload).
The host holds ``hot`` experts per layer. Registered by name in :data:`POLICIES`:

* ``static``: the ``hot`` experts the profiling pass chose most stay on the host, every
  other expert runs on the device;
* ``lru``: the mixtral-offloading baseline: an LRU cache of ``hot`` experts per layer on the
  host; a miss moves the expert's weights into the cache (evicting the least recently
  used); nothing runs on the device;
* ``lfu``: the same cache, evicting the least frequently used;
* ``prefetch``: ``cost``'s cache, plus a predictor of layer ``l+1``'s router logits from layer
  ``l``'s input (a linear map fitted by least squares on the profiling pass, as ProMoE
  learns one, rather than ``l+1``'s router applied to ``l``'s input) that moves the
  ``width`` (default ``k + 1``) likeliest experts of each token into the cache ahead of
  time; experts still missing go wherever ``cost``'s rule finds cheaper (for its
  ``link``). ``recall`` reports how many of the experts a layer chose had been predicted;
* ``cost``: an LRU cache, filled at first with the profiling pass's most chosen experts (as
  ``static`` keeps them), whose misses go wherever is cheaper: the device (its modeled
  cycles for the expert's tokens at the board clock plus activation bytes over the link) or
  a move (the weights over the link, then the host's compute by its measured
  :class:`~moegen.host.offload.HostCost`).
"""

import inspect
from collections import OrderedDict

import torch

from ..errors import UserError
from ..golden.device import x_words
from ..hls.model import call_cycles

__all__ = ["LINKS", "POLICIES", "ModeledLink", "Policy", "make_policy"]


class ModeledLink:
    """A host link by its bandwidth and per-request latency, for modeled times."""

    def __init__(self, name, bytes_per_s, latency_s):
        self.name = name
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s

    def seconds(self, nbytes, requests=1):
        return nbytes / self.bytes_per_s + requests * self.latency_s


#: PCIe gen3 x4 (3.94 GB/s after 128b/130b, 80% after TLP overhead, 1 us round trip) and a
#: 3 Mbaud UART (8N1: 300 kB/s).
LINKS = {
    "pcie-gen3-x4": ModeledLink("pcie-gen3-x4", 3.94e9 * 0.8, 1e-6),
    "uart-3m": ModeledLink("uart-3m", 3e6 / 10, 0.0),
}


class Policy:
    """Base: every chosen expert on the host (everything resident)."""

    name = "host"

    def __init__(self, offload, *, hot):
        self.offload = offload
        self.hot = hot
        self.layers = len(offload.frequency)

    def uses_device(self, layer, expert):
        return False

    def place(self, layer, experts, hidden):
        return dict.fromkeys(experts, "host")


class Static(Policy):
    name = "static"

    def __init__(self, offload, *, hot):
        super().__init__(offload, hot=hot)
        self.resident = [set(torch.argsort(f, descending=True, stable=True)[:hot].tolist()) for f in offload.frequency]

    def uses_device(self, layer, expert):
        return expert not in self.resident[layer]

    def place(self, layer, experts, hidden):
        tel = self.offload.telemetry
        placement = {}
        for e in experts:
            placement[e] = "host" if e in self.resident[layer] else "device"
            tel.hit(layer, e, True)  # every expert is resident somewhere: nothing moves
        return placement


class LRU(Policy):
    name = "lru"

    def __init__(self, offload, *, hot):
        super().__init__(offload, hot=hot)
        self.cache = [OrderedDict() for _ in range(self.layers)]
        self.uses = [[0] * len(offload.frequency[0]) for _ in range(self.layers)]

    def _victim(self, layer):
        return next(iter(self.cache[layer]))

    def _admit(self, layer, e):
        """Make ``e`` resident; True when it already was."""
        cache = self.cache[layer]
        self.uses[layer][e] += 1
        if e in cache:
            cache.move_to_end(e)
            return True
        if self.hot == 0:
            return False
        if len(cache) >= self.hot:
            del cache[self._victim(layer)]
        cache[e] = True
        return False

    def place(self, layer, experts, hidden):
        placement = {}
        for e in experts:
            resident = self._admit(layer, e)
            self.offload.telemetry.hit(layer, e, resident)
            placement[e] = "host" if resident else "move"
        return placement


class LFU(LRU):
    name = "lfu"

    def _victim(self, layer):
        uses = self.uses[layer]
        # fewest uses; among those the least recently used (first in the cache's order)
        return min(enumerate(self.cache[layer]), key=lambda pair: (uses[pair[1]], pair[0]))[1]


class Cost(LRU):
    name = "cost"

    def __init__(self, offload, *, hot, link="pcie-gen3-x4"):
        super().__init__(offload, hot=hot)
        if link not in LINKS:
            raise UserError(f"unknown link {link!r}; known links: {', '.join(LINKS)}")
        self.link = LINKS[link]
        for layer, frequency in enumerate(offload.frequency):  # start from the profiling pass's hot set,
            hottest = torch.argsort(frequency, descending=True, stable=True)[:hot].tolist()
            for e in reversed(hottest):  # the hottest admitted last, evicted last
                self.cache[layer][e] = True

    def uses_device(self, layer, expert):
        return True

    def _miss(self, layer, e, tokens):
        """Where a missing expert runs: ``move`` (admitted to the cache) or ``device``,
        whichever the link, the host's compute and the device's cycles make cheaper. The
        cycles come from the cycle model (:func:`moegen.hls.model.call_cycles`, checked
        against the harness), so a run with golden in place of the device decides alike."""
        config = self.offload.config
        move_s = self.link.seconds(self.offload.expert_bytes) + self.offload.host_cost.seconds(1, tokens)
        # activations with their factors and a table word out, the int32 accumulator back
        act_bytes = tokens * (4 * x_words(config.model.hidden) + 4 + 4 * config.model.hidden)
        most = config.model.max_tokens  # the device takes max_tokens rows a batch
        cycles = sum(call_cycles(config, min(most, tokens - start)) for start in range(0, tokens, most))
        device_s = cycles / (config.target.clock_mhz * 1e6) + self.link.seconds(act_bytes, 4)
        if move_s < device_s:
            self._admit(layer, e)
            return "move"
        return "device"

    def place(self, layer, experts, hidden):
        tel = self.offload.telemetry
        placement = {}
        for e in experts:
            resident = e in self.cache[layer]
            tel.hit(layer, e, resident)
            if resident:
                self._admit(layer, e)
                placement[e] = "host"
            else:
                placement[e] = self._miss(layer, e, experts[e])
        return placement


class Prefetch(Cost):
    name = "prefetch"

    def __init__(self, offload, *, hot, width=None, ridge=1.0, link="pcie-gen3-x4"):
        super().__init__(offload, hot=hot, link=link)
        k = offload.model.config.num_experts_per_tok
        experts = len(offload.frequency[0])
        if not ridge > 0:
            raise UserError(f"prefetch ridge must be positive, not {ridge!r}")
        self.width = k + 1 if width is None else width
        if not 1 <= self.width <= experts:
            raise UserError(f"prefetch width must lie in 1..{experts} (experts per layer), not {self.width}")
        self.predicted = [None] * self.layers
        calibration = offload.calibration
        self.predictors = [None] + [_fit_predictor(calibration[layer], calibration[layer + 1],
                                                   offload.routers[layer + 1], ridge)
                                    for layer in range(self.layers - 1)]

    def _predict(self, layer, hidden):
        """Layer ``layer``'s likely experts: the ``width`` largest predicted logits of each
        token of the previous layer's input ``hidden``, likeliest last (most tokens, then the
        largest logit), so that they are the most recently used when a small cache admits
        them in this order."""
        weight, bias = self.predictors[layer]
        top = torch.topk(hidden.detach().float().cpu() @ weight + bias, self.width, dim=-1)
        experts = weight.shape[1]
        votes = torch.bincount(top.indices.flatten(), minlength=experts)
        best = torch.full((experts,), -torch.inf).scatter_reduce(0, top.indices.flatten(), top.values.flatten(), "amax")
        return sorted(votes.nonzero().flatten().tolist(), key=lambda e: (votes[e].item(), best[e].item()))

    def place(self, layer, experts, hidden):
        tel = self.offload.telemetry
        predicted = self.predicted[layer]
        if predicted is not None:
            tel.predicted(len(predicted & set(experts)), len(experts))
        placement = super().place(layer, experts, hidden)
        if layer + 1 < self.layers:
            ahead = self._predict(layer + 1, hidden)
            self.predicted[layer + 1] = set(ahead)
            for e in ahead:
                if not self._admit(layer + 1, e):
                    tel.prefetch(layer + 1, e, self.offload.expert_bytes)
        return placement

    @property
    def recall_rate(self):
        return self.offload.telemetry.recall()


def _fit_predictor(inputs, next_inputs, router, ridge):
    """Least squares (ridge ``ridge``) from one layer's expert inputs to the next layer's
    router logits on the calibration pass (ProMoE's learned predictor, linear): ``(weight
    [H, E], bias [E])``."""
    x = torch.cat([inputs.double(), torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.linear(next_inputs.double(), router.weight.detach().double().cpu())
    solution = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y)
    return solution[:-1].float(), solution[-1].float()


POLICIES = {cls.name: cls for cls in (Static, LRU, LFU, Prefetch, Cost)}


def make_policy(name, offload, *, hot, **options):
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "offload", "hot")]
    for option in options:
        if option not in known:
            raise UserError(f"policy {name!r} takes no option {option!r}; its options: {', '.join(known) or 'none'}")
    return cls(offload, hot=hot, **options)

"""What the offload did, per layer and expert: calls, tokens, hits, bytes, cycles, time.

:class:`Telemetry` is filled by :mod:`moegen.host.offload` and the policies. ``report()`` is
a text table per layer; ``summary(link, clock_mhz=, tokens=, host_cost=)`` the totals and the
modeled decode time with a :class:`~moegen.host.policies.ModeledLink`; ``plot(path)`` a
placement heat map and the hit rate over time (matplotlib, no display needed).
"""

from dataclasses import dataclass, fields

import numpy as np

__all__ = ["ExpertCounters", "RouteCounters", "Telemetry"]


@dataclass
class ExpertCounters:
    calls: int = 0  # layer steps that chose the expert
    tokens: int = 0
    host_calls: int = 0
    host_tokens: int = 0
    device_calls: int = 0
    device_tokens: int = 0
    hits: int = 0  # chosen while resident (host cache or device), no weights moved
    misses: int = 0
    moves: int = 0  # weights moved into the host cache on demand
    prefetches: int = 0  # weights moved ahead of time (overlapped with compute)
    weight_bytes: int = 0  # weight bytes moved (moves and prefetches)
    bytes_out: int = 0  # link bytes host -> device for device calls
    bytes_in: int = 0
    device_cycles: int = 0
    host_s: float = 0.0
    device_s: float = 0.0
    fallbacks: int = 0


@dataclass
class RouteCounters:
    """ROUTE commands of a layer (block mode)."""

    calls: int = 0
    device_cycles: int = 0
    link_bytes: int = 0
    fallbacks: int = 0  # calls the host routed instead (the device failed)


class Telemetry:
    """Counters per (layer, expert) and the hit/miss sequence."""

    def __init__(self, layers, experts):
        self.layers = layers
        self.experts = experts
        self.reset()

    def reset(self):
        """Zero every counter (for instance after a warm-up)."""
        self.counters = [[ExpertCounters() for _ in range(self.experts)] for _ in range(self.layers)]
        self.sequence = []  # 1 for a hit, 0 for a miss, in order
        #: Per layer, tokens the device routed and those whose expert set differed from the
        #: model's own routing (block mode).
        self.routed_tokens = [0] * self.layers
        self.routing_differs = [0] * self.layers
        self.prediction = [0, 0]  # chosen experts that were predicted, chosen experts (prefetch)
        self.routes = [RouteCounters() for _ in range(self.layers)]

    def __getitem__(self, index):
        layer, expert = index
        return self.counters[layer][expert]

    def hit(self, layer, expert, resident):
        c = self.counters[layer][expert]
        c.hits += resident
        c.misses += not resident
        self.sequence.append(int(resident))

    def routed(self, layer, tokens, differ):
        self.routed_tokens[layer] += tokens
        self.routing_differs[layer] += differ

    def predicted(self, hits, chosen):
        self.prediction[0] += hits
        self.prediction[1] += chosen

    def recall(self):
        """Share of the chosen experts a prefetch had predicted (nan: none predicted)."""
        return self.prediction[0] / self.prediction[1] if self.prediction[1] else float("nan")

    def route_call(self, layer, *, cycles, link_bytes, fallback):
        counts = self.routes[layer]
        counts.calls += 1
        counts.device_cycles += cycles
        counts.link_bytes += link_bytes
        counts.fallbacks += fallback

    def route_totals(self):
        """ROUTE commands over all layers, as one :class:`RouteCounters`."""
        return RouteCounters(*(sum(getattr(r, f.name) for r in self.routes) for f in fields(RouteCounters)))

    def routing_agreement(self):
        """Share of device-routed tokens whose experts equal the model's (nan: none routed)."""
        tokens = sum(self.routed_tokens)
        return 1 - sum(self.routing_differs) / tokens if tokens else float("nan")

    def prefetch(self, layer, expert, nbytes):
        c = self.counters[layer][expert]
        c.prefetches += 1
        c.weight_bytes += nbytes

    def host_call(self, layer, expert, tokens, seconds, *, moved, weight_bytes):
        c = self.counters[layer][expert]
        c.calls += 1
        c.tokens += tokens
        c.host_calls += 1
        c.host_tokens += tokens
        c.host_s += seconds
        if moved:
            c.moves += 1
            c.weight_bytes += weight_bytes

    def device_call(self, layer, expert, tokens, *, cycles, bytes_out, bytes_in, seconds, fallback):
        c = self.counters[layer][expert]
        c.calls += 1
        c.tokens += tokens
        c.device_calls += 1
        c.device_tokens += tokens
        c.device_cycles += cycles
        c.bytes_out += bytes_out
        c.bytes_in += bytes_in
        c.device_s += seconds
        c.fallbacks += fallback

    def totals(self, layer=None):
        """Sum of the counters of one layer, or of all."""
        rows = self.counters if layer is None else [self.counters[layer]]
        total = ExpertCounters()
        for row in rows:
            for c in row:
                for f in fields(ExpertCounters):
                    setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
        return total

    def hit_rate(self):
        return float(np.mean(self.sequence)) if self.sequence else float("nan")

    def summary(self, link, *, clock_mhz, tokens, host_cost):
        """Totals and the modeled time per token over ``link``: host compute by ``host_cost``
        (a :class:`~moegen.host.offload.HostCost`), moves and device activations over the
        link, device cycles at ``clock_mhz``."""
        t = self.totals()
        host_s = host_cost.seconds(t.host_calls, t.host_tokens)
        device_calls = t.device_calls
        # on-demand moves stall the step; prefetches overlap with compute
        moved_bytes = t.weight_bytes * t.moves / max(1, t.moves + t.prefetches)
        moved_s = link.seconds(moved_bytes, t.moves)
        r = self.route_totals()
        device_s = (t.device_cycles + r.device_cycles) / (clock_mhz * 1e6) \
            + link.seconds(t.bytes_out + t.bytes_in + r.link_bytes, 4 * (device_calls + r.calls))
        total_s = host_s + moved_s + device_s
        return {
            "link": link.name,
            "tokens": tokens,
            "hit_rate": self.hit_rate(),
            "host_calls": t.host_calls,
            "device_calls": device_calls,
            "moves": t.moves,
            "prefetches": t.prefetches,
            "weight_bytes_moved": t.weight_bytes,
            "link_bytes_device": t.bytes_out + t.bytes_in + r.link_bytes,
            "device_cycles": t.device_cycles + r.device_cycles,
            "route_calls": r.calls,
            "fallbacks": t.fallbacks + r.fallbacks,
            "host_s": host_s,
            "host_s_measured": t.host_s,
            "modeled_s_per_token": total_s / max(1, tokens),
        }

    def report(self):
        """Per layer: calls, tokens on host and device, hit rate, bytes, cycles, fallbacks, and
        (block mode) the tokens the device routed otherwise than the model."""
        head = ("layer", "calls", "host_tok", "dev_tok", "hit_rate", "moves", "prefetch", "weight_MB", "link_kB",
                "dev_cycles", "fallbacks")
        routed = any(self.routed_tokens)
        rows = [head + ("route_diff",) * routed]
        for layer in [*range(self.layers), None]:
            t = self.totals(layer)
            seen = t.hits + t.misses
            row = ("all" if layer is None else str(layer), str(t.calls), str(t.host_tokens),
                   str(t.device_tokens), f"{t.hits / seen:.3f}" if seen else "-", str(t.moves),
                   str(t.prefetches), f"{t.weight_bytes / 1e6:.2f}", f"{(t.bytes_out + t.bytes_in) / 1e3:.1f}",
                   str(t.device_cycles), str(t.fallbacks))
            if routed:
                layers = range(self.layers) if layer is None else [layer]
                row += (f"{sum(self.routing_differs[i] for i in layers)}/{sum(self.routed_tokens[i] for i in layers)}",)
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)

    def plot(self, path):
        """Two panels: the share of each (layer, expert)'s tokens that ran on the device,
        and the hit rate over a sliding window of expert choices. Returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        share = np.array([[c.device_tokens / c.tokens if c.tokens else np.nan for c in row]
                          for row in self.counters])
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        image = left.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        left.set(title="share of tokens on the device", xlabel="expert", ylabel="layer")
        fig.colorbar(image, ax=left)
        if self.sequence:
            window = max(1, min(200, len(self.sequence) // 10))
            rate = np.convolve(self.sequence, np.ones(window) / window, mode="valid")
            right.plot(rate)
        right.set(title="hit rate (sliding window)", xlabel="expert choice", ylabel="hit rate", ylim=(0, 1.05))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

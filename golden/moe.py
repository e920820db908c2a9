"""Float reference MoE block: a router and SwiGLU experts in Hugging Face's fused layout.

It computes what ``transformers``' ``MixtralSparseMoeBlock`` computes (checked in
tests/golden/test_moe.py) and generalizes the routing to every mode of
:mod:`moegen.golden.router`. Experts are stored as ``gate_up_proj [E, 2*ffn, hidden]`` and
``down_proj [E, hidden, ffn]``, the layout transformers 5.x uses for Mixtral, Qwen2/3-MoE,
OLMoE and DeepSeek-V3.
"""

import torch
from torch import nn

from .expert import ExpertWeights
from .router import MODES, route_float

__all__ = ["MoEBlock"]


class MoEBlock(nn.Module):
    """Float MoE block.

    Parameters
    ----------
    hidden, ffn : int
        Model width and expert intermediate width.
    experts, k : int
        Routed experts and experts per token.
    mode : str
        Routing normalization, one of :data:`moegen.golden.router.MODES`.
    """

    def __init__(self, hidden, ffn, experts, k, *, mode="softmax_topk_renorm"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not 1 <= k <= experts:
            raise ValueError(f"k must lie in 1..{experts} (experts), not {k!r}")
        self.k = k
        self.mode = mode
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, ffn) * ffn**-0.5)
        self.register_buffer("selection_bias", torch.zeros(experts))

    @property
    def experts(self):
        return self.gate_up_proj.shape[0]

    def expert_weights(self, index):
        """The float weights of one expert."""
        gate, up = self.gate_up_proj[index].detach().chunk(2, dim=0)
        return ExpertWeights(gate, up, self.down_proj[index].detach())

    def forward(self, hidden_states):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits = self.router(flat)
        bias = self.selection_bias if self.mode == "sigmoid_bias_renorm" else None
        routing = route_float(logits, k=self.k, mode=self.mode, bias=bias)
        out = torch.zeros_like(flat)
        for expert in routing.indices.unique().tolist():
            if expert < 0:
                continue
            token, slot = torch.where(routing.indices == expert)
            gate, up = nn.functional.linear(flat[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(nn.functional.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, y * routing.weights[token, slot, None].to(y.dtype))
        return out.reshape(shape)

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moegen.golden.moe import MoEBlock


def test_matches_hugging_face_mixtral_block():
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    hf = MixtralSparseMoeBlock(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = MoEBlock(32, 48, 8, 2, mode="softmax_topk_renorm")
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.down_proj.copy_(hf.experts.down_proj)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)


def test_expert_weights_are_the_fused_chunks():
    block = MoEBlock(8, 12, 4, 2)
    w = block.expert_weights(3)
    assert torch.equal(w.gate, block.gate_up_proj[3, :12]) and torch.equal(w.up, block.gate_up_proj[3, 12:])
    assert torch.equal(w.down, block.down_proj[3])


def test_selection_bias_steers_sigmoid_routing():
    torch.manual_seed(1)
    block = MoEBlock(8, 12, 4, 1, mode="sigmoid_bias_renorm")
    x = torch.randn(5, 8)
    with torch.no_grad():
        block.selection_bias[2] = 10.0
        expected = block(x)
        block.gate_up_proj[[0, 1, 3]] = 0  # the other experts no longer matter
        assert torch.equal(block(x), expected)


def test_gradients_reach_the_router():
    block = MoEBlock(8, 12, 4, 2)
    block(torch.randn(6, 8)).sum().backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from moegen.config import load_config
from moegen.errors import UserError
from moegen.host.device import open_device
from moegen.host.offload import experts_modules, offload
from moegen.host.policies import POLICIES

SHAPES = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 64}


def _family(name):
    """A tiny random instance of each supported family (no downloads), experts 16 x 32."""
    torch.manual_seed(0)
    if name == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**SHAPES, num_local_experts=4, num_experts_per_tok=2))
    if name == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(**SHAPES, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, shared_expert_intermediate_size=32))
    if name == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPES, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, head_dim=8))
    if name == "olmoe":
        return OlmoeForCausalLM(OlmoeConfig(**SHAPES, num_experts=4, num_experts_per_tok=2))
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        **SHAPES, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8))


def _ids(seed, batch=1, length=12):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_offloaded_logits_equal_the_host_int8_reference_and_stay_near_float(family):
    config = load_config("tiny")
    model = _family(family).eval()
    assert len(experts_modules(model)) == 2
    ids = _ids(1)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    golden = offload(model, None, policy="static", hot=1, calibration=_ids(2, 2), config=config)
    with torch.no_grad():
        host_int8 = model(input_ids=ids).logits
    golden.remove()
    with open_device(config, "model") as device:
        handle = offload(model, device, policy="static", hot=1, calibration=_ids(2, 2))
        with torch.no_grad():
            offloaded = model(input_ids=ids).logits
        totals = handle.telemetry.totals()
        assert totals.device_tokens > 0 and totals.host_tokens > 0 and totals.fallbacks == 0
        handle.remove()
    assert torch.equal(offloaded, host_int8)
    # int8 + 2:4 pruning of random experts: the logits move, but stay correlated with float
    cos = torch.nn.functional.cosine_similarity(offloaded.flatten(), reference.flatten(), dim=0)
    assert cos > 0.9


@pytest.mark.parametrize("how", [{"policy": "static", "hot": 1}, {"block": True}], ids=["static", "block"])
def test_a_failing_device_falls_back_to_the_host_with_the_same_output(how):
    config = load_config("tiny")
    model = _family("mixtral").eval()
    ids = _ids(3)
    with open_device(config, "model", timeout=0.01, retries=2) as device:
        handle = offload(model, device, calibration=_ids(2, 2), **how)
        with torch.no_grad():
            good = model(input_ids=ids).logits

        class Dead:
            def write(self, data):
                raise OSError("link down")

            def read(self, limit, timeout):
                return b""

            def close(self):
                pass

        device.link.transport = Dead()
        with pytest.warns(RuntimeWarning, match="device call failed .*computing on the host"), torch.no_grad():
            fallen = model(input_ids=ids).logits
        assert torch.equal(fallen, good)
        assert handle.telemetry.totals().fallbacks > 0
        if "block" in how:  # golden's router took over as well
            assert all(route.fallbacks > 0 for route in handle.telemetry.routes)
        handle.remove()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_runs_and_reports(tmp_path, policy):
    config = load_config("tiny")
    model = _family("mixtral").eval()
    with open_device(config, "model") as device:
        handle = offload(model, device, policy=policy, hot=2, calibration=_ids(2, 2))
        with torch.no_grad():
            model(input_ids=_ids(4))
        report = handle.report()
        assert report.splitlines()[0].split()[:3] == ["layer", "calls", "host_tok"]
        assert handle.plot(tmp_path / "p.png").stat().st_size > 1000
        t = handle.telemetry.totals()
        assert t.calls > 0 and t.hits + t.misses > 0
        if policy in ("lru", "lfu"):
            assert t.device_calls == 0 and t.moves > 0
        if policy == "static":
            assert t.moves == 0
        handle.remove()


def test_lru_and_lfu_evict_what_they_should():
    from moegen.host.policies import LFU, LRU
    from moegen.host.telemetry import Telemetry

    class Stub:
        def __init__(self):
            self.frequency = [torch.zeros(4)]
            self.telemetry = Telemetry(1, 4)

    lru, lfu = LRU(Stub(), hot=2), LFU(Stub(), hot=2)
    for e in [0, 0, 0, 1, 2]:
        lru.place(0, [e], None)
        lfu.place(0, [e], None)
    assert list(lru.cache[0]) == [1, 2]  # 0 was least recently used
    assert sorted(lfu.cache[0]) == [0, 2]  # 1 was least frequently used


def test_bad_models_and_configs_are_named():
    config = load_config("tiny")
    model = _family("mixtral")
    with open_device(config, "model") as device:
        with pytest.raises(UserError, match="offload needs calibration token ids"):
            offload(model, device)
        with pytest.raises(UserError, match="unknown policy 'fifo'; known policies: "):
            offload(model, device, policy="fifo", calibration=_ids(1))
        with pytest.raises(UserError, match=r"hot must lie in 0\.\.4"):
            offload(model, device, hot=9, calibration=_ids(1))
    wide = MixtralForCausalLM(MixtralConfig(**{**SHAPES, "hidden_size": 32}, num_local_experts=4))
    with open_device(config, "model") as device, pytest.raises(UserError, match="model experts are hidden 32, ffn 32"):
        offload(wide, device, calibration=_ids(1))
    gpt2 = torch.nn.Module()
    gpt2.config = type("C", (), {"model_type": "gpt2"})()
    with open_device(config, "model") as device, pytest.raises(UserError, match="'gpt2' is not supported; supported"):
        offload(gpt2, device, calibration=_ids(1))


def _routed_like(config, model):
    """``config`` with the router mode the model's block needs (the Qwen families and OLMoE
    renormalize over the chosen experts only with ``norm_topk_prob``)."""
    renorm = model.config.model_type == "mixtral" or model.config.norm_topk_prob
    mode = "softmax_topk_renorm" if renorm else "softmax_topk"
    return dataclasses.replace(config, router=dataclasses.replace(config.router, mode=mode))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_block_mode_routes_on_the_device_and_equals_the_host_int8_reference(family):
    model = _family(family).eval()
    config = _routed_like(load_config("tiny"), model)
    ids = _ids(5, 2)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    golden = offload(model, None, block=True, calibration=_ids(2, 2), config=config)
    with torch.no_grad():
        host_int8 = model(input_ids=ids).logits
    golden.remove()
    with open_device(config, "model") as device:
        handle = offload(model, device, block=True, calibration=_ids(2, 2))
        assert [device.read_reg("K", layer) for layer in range(2)] == [2, 2]
        with torch.no_grad():
            offloaded = model(input_ids=ids).logits
        handle.remove()
    assert torch.equal(offloaded, host_int8)
    t = handle.telemetry
    totals = t.totals()
    # every chosen expert ran on the device; 2 layers x 24 tokens x k = 2
    assert totals.host_tokens == 0 and totals.fallbacks == 0 and totals.device_tokens == 2 * 24 * 2
    assert t.routed_tokens == [24, 24]
    # 8-fraction-bit logits can only flip near-ties: the device chose the model's experts
    assert t.routing_agreement() >= 0.9
    assert "route_diff" in handle.report().splitlines()[0]
    cos = torch.nn.functional.cosine_similarity(offloaded.flatten(), reference.flatten(), dim=0)
    assert cos > 0.9


def test_block_mode_refuses_what_it_cannot_run():
    config = load_config("tiny")
    with open_device(config, "model") as device:
        with pytest.raises(UserError, match="give no policy or hot"):
            offload(_family("mixtral"), device, block=True, policy="lru", calibration=_ids(1))
        with pytest.raises(UserError, match="model type 'deepseek_v3' routes on the host"):
            offload(_family("deepseek_v3"), device, block=True, calibration=_ids(1))
        with pytest.raises(UserError, match=r"routes with softmax_topk; device config 'tiny' has router\.mode "
                                            r"softmax_topk_renorm"):
            offload(_family("olmoe"), device, block=True, calibration=_ids(1))
    small = dataclasses.replace(config, memory=dataclasses.replace(config.memory, size_bytes=16384))
    with open_device(small, "model") as device, pytest.raises(UserError, match=r"memory\.size_bytes 16384"):
        offload(_family("mixtral"), device, block=True, calibration=_ids(1))


def test_the_prefetch_predictor_is_the_least_squares_map_to_the_next_router():
    from moegen.host.policies import _fit_predictor

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 16, generator=generator)
    mix = torch.randn(16, 16, generator=generator)
    router = torch.nn.Linear(16, 4, bias=False)
    weight, bias = _fit_predictor(inputs, inputs @ mix + 0.5, router, ridge=1e-9)
    expected = router(inputs @ mix + 0.5)
    assert torch.allclose(inputs @ weight + bias, expected, atol=1e-3)


def test_prefetch_width_bounds_its_recall():
    config = load_config("tiny")
    model = _family("mixtral").eval()
    with open_device(config, "model") as device:
        with pytest.raises(UserError, match=r"prefetch width must lie in 1\.\.4"):
            offload(model, device, policy="prefetch", hot=1, calibration=_ids(2, 2), width=5)
        handle = offload(model, device, policy="prefetch", hot=1, calibration=_ids(2, 2), width=4)
        with torch.no_grad():
            model(input_ids=_ids(4))
        assert handle.policy.recall_rate == 1.0  # every expert predicted: nothing can be missed
        handle.remove()


def test_cost_moves_over_a_fast_link_and_runs_on_the_device_over_a_slow_one():
    from moegen.host.offload import HostCost
    from moegen.host.policies import Cost
    from moegen.host.telemetry import Telemetry

    stub = SimpleNamespace(config=load_config("default"), frequency=[torch.zeros(8)], telemetry=Telemetry(1, 8),
                           expert_bytes=64384, host_cost=HostCost(30e-6, 2e-6))
    hidden = torch.zeros(1, 128)
    # PCIe: 64 KB in ~20 us plus 32 us on the host beats ~90 us of modeled device cycles
    assert Cost(stub, hot=1, link="pcie-gen3-x4").place(0, {3: 1}, hidden) == {3: "move"}
    # UART: the same move takes ~215 ms, the device call ~2 ms
    assert Cost(stub, hot=1, link="uart-3m").place(0, {3: 1}, hidden) == {3: "device"}


def test_cost_starts_from_the_hot_set_and_evicts_its_coldest_first():
    from moegen.host.offload import HostCost
    from moegen.host.policies import Cost
    from moegen.host.telemetry import Telemetry

    frequency = torch.tensor([50, 40, 30, 1, 1, 1, 1, 1])
    stub = SimpleNamespace(config=load_config("default"), frequency=[frequency], telemetry=Telemetry(1, 8),
                           expert_bytes=64384, host_cost=HostCost(30e-6, 2e-6))
    policy = Cost(stub, hot=3)
    assert policy.place(0, {5: 1}, torch.zeros(1, 128)) == {5: "move"}
    assert sorted(policy.cache[0]) == [0, 1, 5]  # expert 2, the coldest of the hot set, made room


def test_policy_options_are_checked_by_name():
    config = load_config("tiny")
    model = _family("mixtral").eval()
    with open_device(config, "model") as device:
        with pytest.raises(UserError, match="policy 'static' takes no option 'width'; its options: none"):
            offload(model, device, policy="static", calibration=_ids(1), width=3)
        with pytest.raises(UserError, match="policy 'cost' takes no option 'widht'; its options: link"):
            offload(model, device, policy="cost", calibration=_ids(1), widht=3)
        with pytest.raises(UserError, match="prefetch ridge must be positive, not 0"):
            offload(model, device, policy="prefetch", calibration=_ids(1), ridge=0)


def test_host_cost_is_measured_and_linear_in_calls_and_tokens():
    from moegen.host.offload import HostCost

    module = experts_modules(_family("mixtral"))[0]
    cost = HostCost.measure(module, 4, repeats=3)
    assert cost.call_s > 0 or cost.token_s > 0
    assert cost.seconds(2, 10) == pytest.approx(2 * cost.call_s + 10 * cost.token_s)


def test_prefetch_admits_the_likeliest_experts_last_so_a_small_cache_keeps_them():
    from moegen.host.offload import HostCost
    from moegen.host.policies import Prefetch
    from moegen.host.telemetry import Telemetry

    stub = SimpleNamespace(
        config=load_config("tiny"), frequency=[torch.zeros(4), torch.zeros(4)], telemetry=Telemetry(2, 4),
        expert_bytes=3264, host_cost=HostCost(30e-6, 2e-6),
        model=SimpleNamespace(config=SimpleNamespace(num_experts_per_tok=2)),
        calibration=[torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)],
        routers=[torch.nn.Linear(16, 4, bias=False) for _ in range(2)])
    policy = Prefetch(stub, hot=2, width=3)
    # a predictor whose logits are 3, 2, 1, 0 for experts 1, 3, 0, 2 whatever the input
    policy.predictors[1] = (torch.zeros(16, 4), torch.tensor([1.0, 3.0, 0.0, 2.0]))
    policy.place(0, {0: 2}, torch.zeros(2, 16))
    assert policy.predicted[1] == {1, 3, 0}
    assert list(policy.cache[1]) == [3, 1]  # expert 0 admitted first, then evicted
    assert policy.place(1, {1: 1, 3: 1}, torch.zeros(2, 16)) == {1: "host", 3: "host"}

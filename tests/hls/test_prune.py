"""M:N pruning methods and the recovery fine-tune (hls/prune.py) against golden's pruning and
a tiny random Mixtral."""

import copy

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moegen.golden.expert import ExpertWeights, expert_float, prune_expert, quantize_expert
from moegen.golden.pack import prune_mn, unpack_mn
from moegen.hls.prune import (
    PRUNE_METHODS,
    activation_aware_prune,
    obs_prune,
    prune,
    pruned_copy,
    recover,
    sparsegpt_prune,
)
from moegen.host.offload import expert_weights, experts_modules


def _expert(hidden=16, ffn=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ExpertWeights(*(torch.randn(shape, generator=generator) / shape[1] ** 0.5
                           for shape in ((ffn, hidden), (ffn, hidden), (hidden, ffn))))


def _correlated_inputs(rows=256, hidden=16, seed=1):
    """Inputs with correlated channels of unequal scale, where the OBS update has work to do."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(hidden, hidden, generator=generator) * torch.linspace(0.2, 3.0, hidden)
    return torch.randn(rows, hidden, generator=generator) @ mix


def _is_mn(weight, m, n):
    return torch.equal(prune_mn(weight, m, n), weight) and bool(
        ((weight.reshape(weight.shape[0], -1, n) != 0).sum(-1) <= m).all())


def _error(pruned, dense, x):
    want = expert_float(x, dense)
    return float((expert_float(x, pruned) - want).norm() / want.norm())


def test_activation_aware_prune_follows_input_scale():
    ones = torch.ones(4, 4)
    weights = ExpertWeights(ones, ones, torch.ones(4, 4))
    x = torch.tensor([[0.1, 0.1, 5.0, 4.0]] * 8)
    pruned = activation_aware_prune(weights, x, 2, 4)
    assert pruned.gate[0].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(("m", "n"), [(2, 4), (1, 4), (1, 2), (4, 8)])
def test_obs_prune_with_a_diagonal_hessian_is_magnitude_pruning(m, n):
    # a diagonal Hessian scales every score of a column alike and spreads no error
    weight = _expert().gate
    assert torch.equal(obs_prune(weight, torch.eye(16), m, n), prune_mn(weight, m, n))


@pytest.mark.parametrize(("m", "n"), [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_keeps_mn_and_beats_magnitude_and_wanda(m, n):
    dense, x = _expert(), _correlated_inputs()
    pruned = sparsegpt_prune(dense, x, m, n)
    for matrix in (pruned.gate, pruned.up, pruned.down):
        assert _is_mn(matrix, m, n)
    errors = {method: _error(prune(method, dense, x, m, n), dense, x) for method in PRUNE_METHODS}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"]


def test_sparsegpt_experts_quantize_with_golden():
    dense, x = _expert(), _correlated_inputs()
    pruned = sparsegpt_prune(dense, x, 2, 4)
    qe = quantize_expert(pruned, x, m=2, n=4, cols=4)
    for name in ("gate", "up", "down"):
        assert not bool(((unpack_mn(getattr(qe, name)) != 0) & (getattr(pruned, name) == 0)).any())


def test_obs_prune_drops_dead_inputs_and_checks_its_arguments():
    weight = _expert().gate
    hessian = torch.eye(16)
    hessian[3, 3] = 0
    assert not bool(obs_prune(weight, hessian, 2, 4)[:, 3].any())
    with pytest.raises(ValueError, match="multiple of n=4"):
        obs_prune(weight[:, :14], torch.eye(14), 2, 4)
    with pytest.raises(ValueError, match=r"sparsity m must be an integer in 1\.\.n"):
        obs_prune(weight, hessian, 5, 4)


def test_prune_without_inputs_is_magnitude_and_names_bad_methods():
    dense = _expert()
    for method in PRUNE_METHODS:
        pruned = prune(method, dense, torch.zeros(0, 16), 2, 4)
        assert all(torch.equal(getattr(pruned, name), getattr(prune_expert(dense, 2, 4), name))
                   for name in ("gate", "up", "down"))
    with pytest.raises(ValueError, match="prune method must be one of magnitude, wanda, sparsegpt, not 'obs'"):
        prune("obs", dense, torch.zeros(0, 16), 2, 4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512)
    teacher = MixtralForCausalLM(config).eval()
    experts = [[prune_expert(expert_weights(module, e), 2, 4) for e in range(4)] for module in experts_modules(teacher)]
    ids = torch.randint(64, (4096,), generator=torch.Generator().manual_seed(2))
    return teacher, experts, ids


def _recovered(tiny, steps=20, seed=0):
    teacher, experts, ids = tiny
    student = pruned_copy(teacher, experts)
    losses = recover(student, teacher, ids, steps=steps, context=32, batch_size=4, learning_rate=1e-2, seed=seed)
    return student, losses


def _expert_tensors(model):
    return [p for module in experts_modules(model) for p in (module.gate_up_proj, module.down_proj)]


def test_recover_keeps_the_masks_and_lowers_the_loss(tiny):
    teacher, experts, _ = tiny
    before = pruned_copy(teacher, experts)
    teacher_before = copy.deepcopy(teacher)
    student, losses = _recovered(tiny)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    changed = False
    for old, new in zip(_expert_tensors(before), _expert_tensors(student), strict=True):
        assert not bool(new[old == 0].any())  # pruned weights stay exactly zero
        for matrix in new.detach():
            assert _is_mn(matrix, 2, 4)
        changed |= not torch.equal(old, new)
    assert changed
    # only the experts learn; the rest of the model and the teacher are untouched
    for (name, p), q in zip(student.named_parameters(), before.parameters(), strict=True):
        assert name.endswith(("gate_up_proj", "down_proj")) or torch.equal(p, q)
        assert p.requires_grad
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before.parameters(), strict=True))


def test_recover_is_deterministic(tiny):
    first, first_losses = _recovered(tiny, steps=5)
    second, second_losses = _recovered(tiny, steps=5)
    _, other_losses = _recovered(tiny, steps=5, seed=1)
    assert first_losses == second_losses and other_losses != first_losses
    assert all(torch.equal(a, b) for a, b in zip(_expert_tensors(first), _expert_tensors(second), strict=True))


def test_recover_checks_its_arguments(tiny):
    teacher, experts, ids = tiny
    student = pruned_copy(teacher, experts)
    with pytest.raises(ValueError, match="recovery steps must be at least 1, not 0"):
        recover(student, teacher, ids, steps=0, context=32)
    with pytest.raises(ValueError, match="at least context=32 token ids, not 16"):
        recover(student, teacher, ids[:16], steps=1, context=32)
    with pytest.raises(ValueError, match="no fused experts modules"):
        recover(torch.nn.Linear(2, 2), teacher, ids, steps=1, context=32)

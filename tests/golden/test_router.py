import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moegen.golden.router import (
    EXP2_TABLE,
    MODES,
    SIGMOID_BOUND_MIN_SUM,
    SIGMOID_TABLE,
    WEIGHT_ERROR_BOUND,
    quantize_logits,
    route,
    route_float,
)

ONE = 1 << 15  # weight_width 16 -> 15 fractional bits


def logits_strategy(max_experts=64):
    return st.tuples(st.integers(2, max_experts), st.integers(1, 8), st.integers(0, 2**31), st.sampled_from(MODES),
                     st.sampled_from([0.5, 2.0, 6.0, 40.0]))


def make_logits(experts, seed, spread, tokens=16):
    g = torch.Generator().manual_seed(seed)
    logits = quantize_logits(torch.randn(tokens, experts, generator=g) * spread)
    logits[0] = logits[0, 0]  # one token with all-equal logits
    logits[1, : experts // 2] = logits[1, 0]  # one with many ties
    return logits


@given(logits_strategy())
def test_selection_is_sorted_distinct_and_ties_go_to_lower_index(case):
    experts, k, seed, mode, spread = case
    k = min(k, experts)
    logits = make_logits(experts, seed, spread)
    bias = quantize_logits(torch.randn(experts, generator=torch.Generator().manual_seed(seed)) * 0.1, frac=16)
    r = route(logits, k=k, mode=mode, bias=bias if mode == "sigmoid_bias_renorm" else None)
    assert ((r.indices >= 0) & (r.indices < experts)).all()
    for t in range(logits.shape[0]):
        chosen = r.indices[t].tolist()
        assert len(set(chosen)) == k
        if mode == "sigmoid_bias_renorm":
            continue  # key order checked in test_sigmoid_mode_orders_by_biased_score
        keys = [(-int(logits[t, e]), e) for e in chosen]
        assert keys == sorted(keys)
        rest = set(range(experts)) - set(chosen)
        assert all((-int(logits[t, e]), e) > keys[-1] for e in rest)


@given(logits_strategy())
def test_weights_are_within_the_error_bound_of_float(case):
    experts, k, seed, mode, spread = case
    k = min(k, experts)
    logits = make_logits(experts, seed, spread)
    r = route(logits, k=k, mode=mode)
    ref = route_float(logits.double() / 256, k=k, mode=mode)
    same = (r.indices == ref.indices).all(-1)
    if mode == "sigmoid_bias_renorm":
        selected_sum = torch.gather(torch.sigmoid(logits.double() / 256), 1, ref.indices).sum(-1)
        same &= selected_sum >= SIGMOID_BOUND_MIN_SUM  # the table saturates outside [-8, 8]
    else:
        assert same.all()  # selection is by logit: exactly the float order
    err = (r.weights.double() / ONE - ref.weights).abs()
    worst = float(err[same].max()) if same.any() else 0.0
    assert worst <= WEIGHT_ERROR_BOUND[mode]


def test_sigmoid_selection_differs_from_float_only_at_near_ties():
    g = torch.Generator().manual_seed(3)
    logits = quantize_logits(torch.randn(2000, 64, generator=g) * 3)
    r = route(logits, k=8, mode="sigmoid_bias_renorm")
    ref = route_float(logits.double() / 256, k=8, mode="sigmoid_bias_renorm")
    scores = torch.sigmoid(logits.double() / 256)
    for t in torch.nonzero((r.indices != ref.indices).any(-1)).flatten().tolist():
        ours, theirs = set(r.indices[t].tolist()), set(ref.indices[t].tolist())
        gap = (scores[t, list(ours - theirs)].min() - scores[t, list(theirs - ours)].max()).abs() if ours != theirs \
            else torch.tensor(0.0)
        assert float(gap) < 2e-5  # within the table's Q0.16 resolution


def test_sigmoid_mode_orders_by_biased_score_and_weights_unbiased_scores():
    logits = torch.tensor([[0, 0, 256, 512]])  # sigmoid 0.5, 0.5, 0.73, 0.88
    bias = torch.tensor([0, 40000, 0, 0])  # lifts expert 1 above all others for selection only
    r = route(logits, k=2, mode="sigmoid_bias_renorm", bias=bias)
    assert r.indices.tolist() == [[1, 3]]
    s1, s3 = SIGMOID_TABLE[256], SIGMOID_TABLE[256 + 64]
    assert abs(int(r.weights[0, 0]) / ONE - s1 / (s1 + s3)) < 1e-4


def test_exact_values():
    assert EXP2_TABLE[0] == 1 << 16 and SIGMOID_TABLE[256] == 1 << 15
    equal = torch.zeros(1, 2, dtype=torch.int64)
    # two equal logits: S = 2 * 2**16, R = 2**40 // S = 2**23, w = (2**16 * 2**23 + 2**24) >> 25
    assert route(equal, k=2, mode="softmax_topk").weights.tolist() == [[16384, 16384]]
    assert route(equal, k=1, mode="softmax_topk_renorm").weights.tolist() == [[ONE]]
    assert route(equal, k=1, mode="softmax_topk_renorm").indices.tolist() == [[0]]


def test_all_equal_logits_pick_the_lowest_indices_with_equal_weights():
    for mode in MODES:
        r = route(torch.full((1, 12), -77), k=5, mode=mode)
        assert r.indices.tolist() == [[0, 1, 2, 3, 4]]
        assert len(set(r.weights[0].tolist())) == 1


def test_extreme_logits_and_k_equal_to_experts():
    lo, hi = -(1 << 15), (1 << 15) - 1
    logits = torch.tensor([[lo, hi, 0, hi, lo] + [0] * 251])  # E = 256
    for mode in MODES:
        r = route(logits, k=8, mode=mode)
        assert r.indices[0, :2].tolist() == [1, 3]
    full = route(logits[:, :5], k=5, mode="softmax_topk_renorm")
    assert full.indices.tolist() == [[1, 3, 2, 0, 4]]
    assert abs(int(full.weights.sum()) - ONE) <= 5
    # logits 128.0 or more below the max underflow exp to exactly 0
    assert full.weights[0, 2:].tolist() == [0, 0, 0]


@given(st.integers(2, 32), st.integers(1, 8), st.integers(0, 2**31), st.sampled_from(MODES),
       st.integers(0, ONE + 1))
def test_top_p_keeps_the_shortest_prefix_reaching_p(experts, k, seed, mode, p):
    k = min(k, experts)
    logits = make_logits(experts, seed, 2.0)
    full = route(logits, k=k, mode=mode)
    cut = route(logits, k=k, mode=mode, top_p=p)
    cumulative = torch.cumsum(full.weights, -1)
    for t in range(logits.shape[0]):
        c = int(cut.count[t])
        assert 1 <= c <= k
        assert c == k or int(cumulative[t, c - 1]) >= p
        assert c == 1 or int(cumulative[t, c - 2]) < p
        assert cut.indices[t, :c].tolist() == full.indices[t, :c].tolist()
        assert cut.weights[t, :c].tolist() == full.weights[t, :c].tolist()
        assert set(cut.indices[t, c:].tolist()) <= {-1} and set(cut.weights[t, c:].tolist()) <= {0}


def test_per_layer_k_is_a_prefix_of_larger_k():
    logits = make_logits(32, 5, 2.0)
    for mode in ("softmax_topk", "sigmoid_bias_renorm"):
        small, large = route(logits, k=2, mode=mode), route(logits, k=8, mode=mode)
        assert torch.equal(small.indices, large.indices[:, :2])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0, "mode": "softmax_topk"}, "k must"),
    ({"k": 9, "mode": "softmax_topk"}, r"1\.\.8"),
    ({"k": 2, "mode": "softmax"}, "mode must be one of"),
    ({"k": 2, "mode": "sigmoid_bias_renorm", "bias": torch.zeros(3)}, "bias"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        route(torch.zeros(1, 8, dtype=torch.int64), **kwargs)

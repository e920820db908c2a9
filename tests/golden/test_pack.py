import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moegen.golden.formats import IMAGE_ALIGN, MatrixLayout, index_bits
from moegen.golden.pack import PackedMatrix, pack_mn, prune_mn, sparse_matmul, unpack_mn
from moegen.golden.quant import quantize_symmetric

SPARSITIES = [(1, 1), (2, 2), (4, 4), (1, 2), (1, 4), (2, 4), (2, 8), (4, 8), (3, 8), (8, 16)]


@st.composite
def sparse_int_matrices(draw):
    m, n = draw(st.sampled_from(SPARSITIES))
    rows, k = draw(st.integers(1, 24)), draw(st.integers(1, 40))
    cols = draw(st.integers(1, 9))
    bits = draw(st.sampled_from([2, 4, 8]))
    seed = draw(st.integers(0, 2**31))
    weights = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    weights[torch.rand(rows, k, generator=torch.Generator().manual_seed(seed + 1)) < 0.2] = 0.0
    q, _ = quantize_symmetric(prune_mn(weights, m, n), bits, dim=1)
    return q, m, n, cols, bits


@given(sparse_int_matrices())
def test_pack_unpack_round_trip_and_byte_round_trip(case):
    q, m, n, cols, bits = case
    packed = pack_mn(q, m, n, cols, value_bits=bits)
    assert torch.equal(unpack_mn(packed), q)
    data = packed.to_bytes()
    assert len(data) == packed.layout.nbytes
    assert PackedMatrix.from_bytes(packed.layout, data) == packed


@given(sparse_int_matrices(), st.integers(1, 5))
def test_sparse_matmul_equals_dense_matmul_of_unpacked(case, tokens):
    q, m, n, cols, bits = case
    packed = pack_mn(q, m, n, cols, value_bits=bits)
    x = torch.randint(-127, 128, (tokens, q.shape[1]), generator=torch.Generator().manual_seed(tokens))
    assert torch.equal(sparse_matmul(x, packed), x @ q.T)


@given(sparse_int_matrices())
def test_indices_are_ascending_distinct_and_in_range(case):
    q, m, n, cols, bits = case
    packed = pack_mn(q, m, n, cols, value_bits=bits)
    assert ((packed.indices >= 0) & (packed.indices < n)).all()
    assert (packed.indices[..., 1:] > packed.indices[..., :-1]).all()


def test_step_record_bits_exact():
    """One channel, K=4, 2:4: values 5, -3 at inputs 1 and 3."""
    packed = pack_mn(torch.tensor([[0, 5, 0, -3]]), 2, 4, 1)
    assert packed.values.tolist() == [[[[5, -3]]]] and packed.indices.tolist() == [[[[1, 3]]]]
    # values byte by byte, then indices 1 | 3 << 2, padded to the 64-byte tile stride
    assert packed.to_bytes() == bytes([0x05, 0xFD, 0x0D]) + bytes(IMAGE_ALIGN - 3)


def test_short_groups_pad_with_lowest_unused_indices():
    packed = pack_mn(torch.tensor([[0, 0, 7, 0, 0, 0, 0, 0]]), 2, 4, 1)
    assert packed.indices.tolist() == [[[[0, 2]], [[0, 1]]]]
    assert packed.values.tolist() == [[[[0, 7]], [[0, 0]]]]


def test_tile_major_order():
    """Stream order is tile, group, column: channel 1 of tile 0 comes right after channel 0."""
    w = torch.arange(1, 17).reshape(4, 4)  # dense 4x4, cols=2 -> 2 tiles, groups of n=2
    packed = pack_mn(w, 2, 2, 2)
    assert packed.values[0, 0].tolist() == [[1, 2], [5, 6]]
    assert packed.values[0, 1].tolist() == [[3, 4], [7, 8]]
    assert packed.values[1, 0].tolist() == [[9, 10], [13, 14]]


def test_layout_sizes():
    lay = MatrixLayout(out_features=512, in_features=256, cols=8, m=2, n=4)
    assert (lay.groups, lay.tiles, lay.index_bits) == (64, 64, 2)
    assert lay.step_bits == 8 * 2 * 10 and lay.step_bytes == 20
    assert lay.tile_bytes == 1280 and lay.tile_stride == 1280 and lay.nbytes == 64 * 1280
    assert index_bits(4, 4) == 0 and index_bits(1, 16) == 4 and index_bits(1, 2) == 1


def test_prune_keeps_largest_and_lower_index_on_ties():
    w = torch.tensor([[1.0, -3.0, 3.0, 0.5, 2.0, 2.0, 2.0, 2.0, 9.0]])
    assert prune_mn(w, 2, 4).tolist() == [[0.0, -3.0, 3.0, 0.0, 2.0, 2.0, 0.0, 0.0, 9.0]]
    scores = torch.tensor([[4.0, 0, 0, 3, 0, 0, 1, 1, 0]])
    assert prune_mn(w, 2, 4, scores=scores).tolist() == [[1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 2.0, 2.0, 9.0]]


def test_pack_refuses_too_many_nonzeros_by_row_and_group():
    w = torch.tensor([[1, 0, 0, 0, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"row 0, group 1 \(inputs 4\.\.7\) has 3 nonzeros; 2:4"):
        pack_mn(w, 2, 4, 1)


@pytest.mark.parametrize(("m", "n", "match"), [(3, 6, "power of two"), (5, 4, "1..n"), (0, 4, "1..n")])
def test_bad_sparsity_is_refused(m, n, match):
    with pytest.raises(ValueError, match=match):
        pack_mn(torch.zeros(2, 8, dtype=torch.int64), m, n, 1)


def test_packed_matrix_refuses_unsorted_or_out_of_range_indices():
    good = pack_mn(torch.tensor([[0, 5, 0, -3]]), 2, 4, 1)
    with pytest.raises(ValueError, match="ascending"):
        PackedMatrix(good.layout, good.values, good.indices.flip(-1))
    with pytest.raises(ValueError, match="ascending"):
        PackedMatrix(good.layout, good.values, torch.full_like(good.indices, 1))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        PackedMatrix(good.layout, good.values, good.indices + 2)
    with pytest.raises(ValueError, match=r"-128\.\.127"):
        PackedMatrix(good.layout, good.values * 100, good.indices)
    with pytest.raises(ValueError, match="bytes"):
        PackedMatrix.from_bytes(good.layout, good.to_bytes()[:-1])
    corrupted = bytearray(good.to_bytes())
    corrupted[2] = 0b0111  # indices 3, 1: descending
    with pytest.raises(ValueError, match="ascending"):
        PackedMatrix.from_bytes(good.layout, bytes(corrupted))


@given(sparse_int_matrices())
def test_step_records_are_the_serialized_steps(case):
    q, m, n, cols, bits = case
    packed = pack_mn(q, m, n, cols, value_bits=bits)
    lay = packed.layout
    records = packed.step_records()
    assert len(records) == lay.tiles and all(len(tile) == lay.groups for tile in records)
    data = packed.to_bytes()
    for t, tile in enumerate(records):
        for g, record in enumerate(tile):
            start = t * lay.tile_stride + g * lay.step_bytes
            assert record.to_bytes(lay.step_bytes, "little") == data[start : start + lay.step_bytes]
            assert record < 1 << lay.step_bits

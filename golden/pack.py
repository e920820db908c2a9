"""M:N structured sparsity: pruning, packing into the array's stream layout, and sparse matmul.

The packed layout is the contract between the host, the loader and the array.

* A weight matrix ``W`` has shape ``[O, K]``: ``O`` output channels, ``K`` the reduction axis.
* ``K`` is split into ``G = ceil(K / n)`` groups of ``n`` consecutive inputs (zero padded).
  Every group of every output channel keeps exactly ``m`` (value, index) pairs; indices are
  ascending and distinct and ``index < n``. Groups with fewer than ``m`` nonzeros are padded
  with zero values at the lowest unused indices.
* Output channels are split into ``ceil(O / cols)`` tiles of ``cols`` channels (zero padded).
* Stream order (tile-major, the array's consumption order)::

      for tile in tiles:          # one output-stationary pass of the array
          for g in groups:        # one array step
              for c in cols:      # one array column (output channel tile*cols + c)
                  m pairs

* One step is a *step record*: a little-endian bit vector holding the ``cols * m`` values
  (``value_bits`` two's complement each, pair ``(c, j)`` at bit ``(c*m + j) * value_bits``)
  followed by the ``cols * m`` indices (``index_bits`` each, same order), padded to whole
  bytes. ``index_bits = ceil(log2 n)``, and 0 when ``m == n`` (dense: indices are implied).
* A tile is ``G`` step records back to back; tiles start every ``tile_stride`` bytes
  (``tile_bytes`` rounded up to :data:`~moegen.golden.formats.IMAGE_ALIGN`), so every tile starts on a boundary of
  the widest memory port.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .formats import MatrixLayout, check_mn

__all__ = [
    "PackedMatrix",
    "pack_mn",
    "prune_mn",
    "sparse_matmul",
    "unpack_mn",
]

def prune_mn(weight, m, n, *, scores=None):
    """Keep the ``m`` highest-scoring of every ``n`` consecutive weights along the last axis.

    ``scores`` defaults to ``|weight|`` (magnitude pruning); an activation-aware method passes
    its own importance scores of the same shape. Ties keep the lower index. The last axis
    need not be a multiple of ``n``: the final group is shorter and keeps ``min(m, len)``.
    """
    check_mn(m, n)
    weight = torch.as_tensor(weight)
    scores = weight.abs() if scores is None else torch.as_tensor(scores)
    if scores.shape != weight.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} differs from weight shape {tuple(weight.shape)}")
    k = weight.shape[-1]
    pad = -k % n
    padded = torch.nn.functional.pad(scores.double(), (0, pad), value=-float("inf"))
    grouped = padded.reshape(*weight.shape[:-1], -1, n)
    # stable descending sort: equal scores keep index order, so the lower index wins
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order[..., :m], True)
    keep = keep.reshape(*weight.shape[:-1], -1)[..., :k]
    return torch.where(keep, weight, torch.zeros_like(weight))


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """An M:N packed matrix: ``values`` and ``indices``, both ``[tiles, groups, cols, m]``.

    Construction checks the contract: indices in ``0..n-1``, strictly ascending within every
    (tile, group, column); values within ``value_bits``. A violating matrix is refused here,
    so it is never serialized or sent to a device.
    """

    layout: MatrixLayout
    values: torch.Tensor
    indices: torch.Tensor

    def __post_init__(self):
        lay = self.layout
        shape = (lay.tiles, lay.groups, lay.cols, lay.m)
        for name in ("values", "indices"):
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"packed {name} must have shape {shape}, not {tuple(tensor.shape)}")
        lo, hi = -(1 << (lay.value_bits - 1)), (1 << (lay.value_bits - 1)) - 1
        if self.values.numel() and not (lo <= int(self.values.min()) and int(self.values.max()) <= hi):
            raise ValueError(f"packed values must lie in {lo}..{hi} for value_bits={lay.value_bits}")
        if self.indices.numel() and not (int(self.indices.min()) >= 0 and int(self.indices.max()) < lay.n):
            raise ValueError(f"packed indices must lie in 0..{lay.n - 1}")
        if lay.m > 1 and not bool((self.indices[..., 1:] > self.indices[..., :-1]).all()):
            raise ValueError("packed indices must be strictly ascending (distinct) within every group")

    @cached_property
    def dense_float(self):
        """The unpacked ``[out_features, in_features]`` matrix as float64 (cached)."""
        return unpack_mn(self).double()

    def __eq__(self, other):
        return (
            isinstance(other, PackedMatrix)
            and self.layout == other.layout
            and torch.equal(self.values, other.values)
            and torch.equal(self.indices, other.indices)
        )

    def step_records(self):
        """Step records as integers (the little-endian bit vectors), ``[tiles][groups]``:
        what the array receives per step."""
        lay = self.layout
        data = self.to_bytes()
        return [
            [int.from_bytes(data[t * lay.tile_stride + g * lay.step_bytes :][: lay.step_bytes], "little")
             for g in range(lay.groups)]
            for t in range(lay.tiles)
        ]

    def to_bytes(self):
        """Serialize in stream order; tiles padded to ``tile_stride`` with zero bytes."""
        lay = self.layout
        steps = lay.tiles * lay.groups
        bits = np.zeros((steps, lay.step_bytes * 8), dtype=np.uint8)
        values = self.values.reshape(steps, -1).numpy() & ((1 << lay.value_bits) - 1)
        _scatter_bits(bits, values, 0, lay.value_bits)
        if lay.index_bits:
            indices = self.indices.reshape(steps, -1).numpy()
            _scatter_bits(bits, indices, lay.cols * lay.m * lay.value_bits, lay.index_bits)
        tiles = np.packbits(bits, axis=1, bitorder="little").reshape(lay.tiles, lay.tile_bytes)
        padded = np.zeros((lay.tiles, lay.tile_stride), dtype=np.uint8)
        padded[:, : lay.tile_bytes] = tiles
        return padded.tobytes()

    @classmethod
    def from_bytes(cls, layout, data):
        """Parse ``layout.nbytes`` bytes written by :meth:`to_bytes` (validating the contract)."""
        if len(data) != layout.nbytes:
            raise ValueError(f"packed matrix needs {layout.nbytes} bytes, got {len(data)}")
        lay = layout
        tiles = np.frombuffer(bytes(data), dtype=np.uint8).reshape(lay.tiles, lay.tile_stride)
        steps = tiles[:, : lay.tile_bytes].reshape(lay.tiles * lay.groups, lay.step_bytes)
        bits = np.unpackbits(steps, axis=1, bitorder="little")
        pairs = lay.cols * lay.m
        raw = _gather_bits(bits, pairs, 0, lay.value_bits)
        sign = 1 << (lay.value_bits - 1)
        values = (raw ^ sign) - sign
        if lay.index_bits:
            indices = _gather_bits(bits, pairs, pairs * lay.value_bits, lay.index_bits)
        else:
            indices = np.broadcast_to(np.tile(np.arange(lay.m), lay.cols), raw.shape)
        shape = (lay.tiles, lay.groups, lay.cols, lay.m)
        return cls(
            lay,
            torch.from_numpy(values.reshape(shape).astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(indices).reshape(shape).astype(np.int64)),
        )


def _scatter_bits(bits, fields, start, width):
    """Write ``fields[s, p]`` (``width`` bits, LSB first) at ``start + p*width`` of row ``s``."""
    positions = start + np.arange(fields.shape[1])[:, None] * width + np.arange(width)
    bits[:, positions] = (fields[:, :, None] >> np.arange(width)) & 1


def _gather_bits(bits, count, start, width):
    positions = start + np.arange(count)[:, None] * width + np.arange(width)
    return (bits[:, positions].astype(np.int64) << np.arange(width)).sum(axis=-1)


def pack_mn(weight, m, n, cols, *, value_bits=8):
    """Pack an integer ``[O, K]`` matrix that already satisfies M:N into the stream layout.

    Raises ``ValueError`` naming the first (row, group) with more than ``m`` nonzeros; prune
    with :func:`prune_mn` first.
    """
    weight = torch.as_tensor(weight)
    if weight.dim() != 2 or weight.dtype.is_floating_point or weight.dtype == torch.bool:
        raise ValueError(f"pack_mn needs a 2-D integer matrix, got {weight.dtype} {tuple(weight.shape)}")
    layout = MatrixLayout(weight.shape[0], weight.shape[1], cols, m, n, value_bits)
    padded = torch.zeros(layout.tiles * cols, layout.groups * n, dtype=torch.int64)
    padded[: weight.shape[0], : weight.shape[1]] = weight
    grouped = padded.reshape(layout.tiles * cols, layout.groups, n)
    nonzero = grouped != 0
    over = (nonzero.sum(-1) > m).nonzero()
    if len(over):
        row, group = (int(v) for v in over[0])
        raise ValueError(
            f"row {row}, group {group} (inputs {group * n}..{group * n + n - 1}) has "
            f"{int(nonzero[row, group].sum())} nonzeros; {m}:{n} sparsity allows at most {m}"
        )
    # nonzero positions first (ascending), then the lowest zero positions; keep m, re-sort
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :m]
    indices = torch.sort(order, dim=-1).values
    values = torch.gather(grouped, -1, indices)
    shape = (layout.tiles, cols, layout.groups, m)
    return PackedMatrix(
        layout,
        values.reshape(shape).permute(0, 2, 1, 3).contiguous(),
        indices.reshape(shape).permute(0, 2, 1, 3).contiguous(),
    )


def unpack_mn(packed):
    """The dense ``[O, K]`` integer matrix of a :class:`PackedMatrix` (exact inverse of pack)."""
    lay = packed.layout
    dense = torch.zeros(lay.tiles, lay.groups, lay.cols, lay.n, dtype=torch.int64)
    dense.scatter_(-1, packed.indices, packed.values)
    dense = dense.permute(0, 2, 1, 3).reshape(lay.tiles * lay.cols, lay.groups * lay.n)
    return dense[: lay.out_features, : lay.in_features].contiguous()


def sparse_matmul(x, packed):
    """``x @ unpack_mn(packed).T`` for integer ``x [T, K]``: what the array computes, each
    output selecting ``m`` activations of every group by the stored indices (the other
    weights of the group are zero). Computed as a float64 product of the unpacked matrix,
    which is exact: every partial sum of 8-bit products over at most 65535 inputs stays far
    below 2**53."""
    lay = packed.layout
    x = torch.as_tensor(x, dtype=torch.int64)
    if x.dim() != 2 or x.shape[1] != lay.in_features:
        raise ValueError(f"activations must be [T, {lay.in_features}], not {tuple(x.shape)}")
    return torch.round(x.double() @ packed.dense_float.T).to(torch.int64)

"""Shapes and sizes of the data formats, shared by config, golden, RTL and host.

Torch-free on purpose: the config validates shapes with these classes, and the CLI stays
quick to start. The formats themselves are defined in :mod:`moegen.golden.pack` (M:N stream
layout) and :mod:`moegen.golden.image` (expert images).
"""

from dataclasses import dataclass

__all__ = [
    "HEADER_SIZE",
    "IMAGE_ALIGN",
    "ROUTER_MODES",
    "ImageLayout",
    "MatrixLayout",
    "align_up",
    "check_mn",
    "index_bits",
]

#: Routing normalization modes (defined in :mod:`moegen.golden.router`).
ROUTER_MODES = ("softmax_topk", "softmax_topk_renorm", "sigmoid_bias_renorm")
#: Size of an expert image header in bytes.
HEADER_SIZE = 64
#: Byte alignment of tiles and image sections: the widest memory port (512 bits).
IMAGE_ALIGN = 64


def align_up(value, alignment=IMAGE_ALIGN):
    return -(-value // alignment) * alignment


def check_mn(m, n):
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"sparsity n must be a power of two >= 1, not {n!r}")
    if not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"sparsity m must be an integer in 1..n ({n}), not {m!r}")


def index_bits(m, n):
    """Bits per stored index: ``ceil(log2 n)``, or 0 for dense ``m == n`` (indices implied)."""
    check_mn(m, n)
    return 0 if m == n else (n - 1).bit_length()


@dataclass(frozen=True)
class MatrixLayout:
    """Shape of one packed ``[out_features, in_features]`` matrix in the stream layout.

    Parameters
    ----------
    out_features, in_features : int
        ``O`` and ``K`` of the dense matrix.
    cols : int
        Array columns: output channels per tile.
    m, n : int
        Sparsity: ``m`` kept of every ``n`` consecutive weights along ``K``.
    value_bits : int
        Width of a stored weight (two's complement).
    """

    out_features: int
    in_features: int
    cols: int
    m: int
    n: int
    value_bits: int = 8

    def __post_init__(self):
        check_mn(self.m, self.n)
        for name in ("out_features", "in_features", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not isinstance(self.value_bits, int) or not 2 <= self.value_bits <= 16:
            raise ValueError(f"value_bits must be an integer in 2..16, not {self.value_bits!r}")

    @property
    def groups(self):
        """Array steps per tile: ``ceil(in_features / n)``."""
        return -(-self.in_features // self.n)

    @property
    def tiles(self):
        return -(-self.out_features // self.cols)

    @property
    def index_bits(self):
        return index_bits(self.m, self.n)

    @property
    def step_bits(self):
        return self.cols * self.m * (self.value_bits + self.index_bits)

    @property
    def step_bytes(self):
        return -(-self.step_bits // 8)

    @property
    def tile_bytes(self):
        return self.groups * self.step_bytes

    @property
    def tile_stride(self):
        return align_up(self.tile_bytes)

    @property
    def nbytes(self):
        return self.tiles * self.tile_stride


@dataclass(frozen=True)
class ImageLayout:
    """Section offsets and size of an image for given shapes (no data needed)."""

    hidden: int
    ffn: int
    cols: int
    m: int
    n: int
    weight_bits: int = 8
    act_bits: int = 8

    def __post_init__(self):
        if not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            raise ValueError(f"act_bits must be an integer in 2..8 (table entries are bytes), not {self.act_bits!r}")
        self.matrices  # noqa: B018 - validates the matrix shapes now

    @property
    def matrices(self):
        """Layouts of gate, up and down."""
        gate = MatrixLayout(self.ffn, self.hidden, self.cols, self.m, self.n, self.weight_bits)
        down = MatrixLayout(self.hidden, self.ffn, self.cols, self.m, self.n, self.weight_bits)
        return gate, gate, down

    @property
    def offsets(self):
        """(gate, up, down, params, lut, end) byte offsets."""
        out = [HEADER_SIZE]
        sizes = [lay.nbytes for lay in self.matrices] + [4 * (2 * self.ffn + self.hidden + 3), 1 << self.act_bits]
        for size in sizes:
            out.append(align_up(out[-1] + size, IMAGE_ALIGN))
        return tuple(out)

    @property
    def nbytes(self):
        return self.offsets[-1]



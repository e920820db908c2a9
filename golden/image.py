"""Expert images: the bytes the host writes to device memory and the loader reads.

Layout (little-endian; every section starts on an :data:`~moegen.golden.formats.IMAGE_ALIGN`
boundary; offsets are from the start of the image):

=======  =====  ==============================================================
offset   type   field
=======  =====  ==============================================================
0        4s     magic ``b"MOEX"``
4        u16    format version (:data:`VERSION`)
6        u16    header size (64)
8        u32    config hash: first 32 bits of the config's sha256 (device ID)
12       u16    expert id
14       u16    layer
16       u32    hidden
20       u32    ffn
24       u8     m
25       u8     n
26       u8     cols (array columns the matrices are tiled for)
27       u8     weight bits
28       u8     activation bits
29       3x     reserved, zero
32       u32    gate offset
36       u32    up offset
40       u32    down offset
44       u32    params offset
48       u32    activation table offset
52       u32    image size in bytes (header included)
56       u32    CRC-32 of bytes ``[64, size)``
60       u32    CRC-32 of bytes ``[0, 60)``
=======  =====  ==============================================================

Sections: gate, up, down (packed matrices, :mod:`moegen.golden.pack`); params, u32 words:
``ffn`` gate channel factors, ``ffn`` up, ``hidden`` down (each ``mult | shift << 16``),
then the gated multiply's ``mult`` and ``shift``, then the output scale as float32 (host
only); the activation table, ``2**act_bits`` int8 entries.

CRC-32 is IEEE 802.3 (``zlib.crc32``: reflected, polynomial 0xEDB88320, init and final XOR
0xFFFFFFFF). A reader refuses a bad image with an :class:`ImageError` whose ``code`` is one
of :class:`ImageErrorCode` (the same codes the loader reports in its status register).
"""

import enum
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .expert import QuantizedExpert, param_words
from .formats import HEADER_SIZE, ImageLayout
from .pack import PackedMatrix

__all__ = [
    "MAGIC",
    "VERSION",
    "ImageError",
    "ImageErrorCode",
    "ImageHeader",
    "read_header",
    "read_image",
    "with_header_field",
    "write_image",
]

MAGIC = b"MOEX"
VERSION = 1
_HEADER = struct.Struct("<4sHHIHHIIBBBBB3xIIIIIIII")
assert _HEADER.size == HEADER_SIZE


class ImageErrorCode(enum.IntEnum):
    """Why an image was refused; shared with the loader's status register."""

    TRUNCATED = 1
    BAD_MAGIC = 2
    BAD_VERSION = 3
    BAD_HEADER_CRC = 4
    HASH_MISMATCH = 5
    EXPERT_MISMATCH = 6
    BAD_SHAPE = 7
    BAD_PAYLOAD_CRC = 8


class ImageError(ValueError):
    """An expert image is malformed or does not belong to this device."""

    def __init__(self, code, message):
        self.code = ImageErrorCode(code)
        super().__init__(f"{self.code.name.lower()}: {message}")


@dataclass(frozen=True)
class ImageHeader:
    config_hash: int
    expert_id: int
    layer: int
    layout: ImageLayout


def _params_section(qe):
    words = param_words(qe)[: 2 * qe.ffn + qe.hidden + 2]  # the table has its own section
    return np.array(words, dtype="<u4").tobytes() + struct.pack("<f", qe.out_scale)


def write_image(qe, *, config_hash, expert_id, layer=0):
    """Serialize a :class:`QuantizedExpert` into image bytes."""
    lay = ImageLayout(
        qe.hidden, qe.ffn, qe.gate.layout.cols, qe.gate.layout.m, qe.gate.layout.n,
        qe.gate.layout.value_bits, qe.act_bits,
    )
    for name, value, hi in (("config_hash", config_hash, 1 << 32), ("expert_id", expert_id, 1 << 16),
                            ("layer", layer, 1 << 16)):
        if not isinstance(value, int) or not 0 <= value < hi:
            raise ValueError(f"{name} must be an integer in 0..{hi - 1}, not {value!r}")
    offsets = lay.offsets
    image = bytearray(lay.nbytes)
    sections = [qe.gate.to_bytes(), qe.up.to_bytes(), qe.down.to_bytes(), _params_section(qe),
                (qe.act_lut.numpy() & 0xFF).astype(np.uint8).tobytes()]
    for start, data in zip(offsets, sections, strict=False):
        image[start : start + len(data)] = data
    payload_crc = zlib.crc32(image[HEADER_SIZE:])
    header = _HEADER.pack(
        MAGIC, VERSION, HEADER_SIZE, config_hash, expert_id, layer, lay.hidden, lay.ffn, lay.m, lay.n,
        lay.cols, lay.weight_bits, lay.act_bits, *offsets, payload_crc, 0,
    )
    image[:HEADER_SIZE] = header[:60] + struct.pack("<I", zlib.crc32(header[:60]))
    return bytes(image)


def with_header_field(image, offset, fmt, value):
    """``image`` with one header field (``struct`` format ``fmt`` at byte ``offset``) set to
    ``value`` and the header CRC re-sealed, so that only the field is wrong (for testing the
    checks that read it)."""
    data = bytearray(image)
    struct.pack_into(fmt, data, offset, value)
    struct.pack_into("<I", data, 60, zlib.crc32(data[:60]))
    return bytes(data)


def read_header(data, *, config_hash=None, expert_id=None, layout=None):
    """Check and parse the header of ``data`` (which may hold only the header).

    ``layout``, when given, is the only :class:`ImageLayout` accepted (a device runs images of
    its own shapes only); another is refused with ``BAD_SHAPE``.
    """
    if len(data) < HEADER_SIZE:
        raise ImageError(ImageErrorCode.TRUNCATED, f"image has {len(data)} bytes, the header alone needs {HEADER_SIZE}")
    fields = _HEADER.unpack_from(data)
    magic, version, header_size, image_hash, image_expert, layer, hidden, ffn, m, n, cols, wbits, abits = fields[:13]
    *offsets, payload_crc, header_crc = fields[13:]
    if magic != MAGIC:
        raise ImageError(ImageErrorCode.BAD_MAGIC, f"magic is {magic!r}, expected {MAGIC!r}")
    if version != VERSION or header_size != HEADER_SIZE:
        raise ImageError(ImageErrorCode.BAD_VERSION,
                         f"format version {version} (header {header_size} bytes); this reader knows version {VERSION}")
    if zlib.crc32(bytes(data[:60])) != header_crc:
        raise ImageError(ImageErrorCode.BAD_HEADER_CRC, "header CRC-32 does not match its contents")
    if config_hash is not None and image_hash != config_hash:
        raise ImageError(ImageErrorCode.HASH_MISMATCH,
                         f"image was built for config hash {image_hash:08x}, this device is {config_hash:08x}")
    if expert_id is not None and image_expert != expert_id:
        raise ImageError(ImageErrorCode.EXPERT_MISMATCH, f"image holds expert {image_expert}, expected {expert_id}")
    try:
        lay = ImageLayout(hidden, ffn, cols, m, n, wbits, abits)
        expected = lay.offsets
    except ValueError as error:
        raise ImageError(ImageErrorCode.BAD_SHAPE, str(error)) from None
    if tuple(offsets) != expected:
        raise ImageError(ImageErrorCode.BAD_SHAPE,
                         f"section offsets {tuple(offsets)} do not match shapes (expected {expected})")
    if layout is not None and lay != layout:
        raise ImageError(ImageErrorCode.BAD_SHAPE, f"image shapes {lay} differ from this device's {layout}")
    return ImageHeader(image_hash, image_expert, layer, lay), payload_crc


def read_image(data, *, config_hash=None, expert_id=None, layout=None):
    """Check and parse image bytes; returns ``(ImageHeader, QuantizedExpert)``.

    ``config_hash``, ``expert_id`` and ``layout``, when given, must match the header.
    """
    header, payload_crc = read_header(data, config_hash=config_hash, expert_id=expert_id, layout=layout)
    lay = header.layout
    if len(data) < lay.nbytes:
        raise ImageError(ImageErrorCode.TRUNCATED, f"image has {len(data)} bytes, its header says {lay.nbytes}")
    if zlib.crc32(bytes(data[HEADER_SIZE : lay.nbytes])) != payload_crc:
        raise ImageError(ImageErrorCode.BAD_PAYLOAD_CRC, "payload CRC-32 does not match its contents")
    gate_off, up_off, down_off, params_off, lut_off, _ = lay.offsets
    gate_lay, up_lay, down_lay = lay.matrices
    matrices = [
        PackedMatrix.from_bytes(ml, data[off : off + ml.nbytes])
        for ml, off in ((gate_lay, gate_off), (up_lay, up_off), (down_lay, down_off))
    ]
    count = 2 * lay.ffn + lay.hidden + 2
    words = torch.from_numpy(np.frombuffer(bytes(data[params_off : params_off + 4 * count]), "<u4").astype(np.int64))
    (out_scale,) = struct.unpack_from("<f", data, params_off + 4 * count)
    factors = torch.split(words[:-2], [lay.ffn, lay.ffn, lay.hidden])
    lut_bytes = bytes(data[lut_off : lut_off + (1 << lay.act_bits)])
    lut = torch.from_numpy(np.frombuffer(lut_bytes, np.int8).astype(np.int64))
    expert = QuantizedExpert(
        *matrices,
        *(part for f in factors for part in (f & 0xFFFF, f >> 16)),
        int(words[-2]),
        int(words[-1]),
        lut,
        out_scale,
        lay.act_bits,
    )
    return header, expert

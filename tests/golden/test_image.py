import struct
import zlib

import pytest
import torch

from moegen.golden.expert import (
    ExpertWeights,
    expert_int,
    prune_expert,
    quantize_activations,
    quantize_expert,
)
from moegen.golden.formats import HEADER_SIZE, IMAGE_ALIGN, ImageLayout
from moegen.golden.image import MAGIC, ImageError, ImageErrorCode, read_image, with_header_field, write_image

HASH = 0xDA3A601A


@pytest.fixture(scope="module")
def expert():
    g = torch.Generator().manual_seed(0)
    w = ExpertWeights(*(torch.randn(*shape, generator=g) for shape in ((40, 24), (40, 24), (24, 40))))
    return quantize_expert(prune_expert(w, 2, 4), torch.randn(64, 24, generator=g), m=2, n=4, cols=3)


@pytest.fixture(scope="module")
def image(expert):
    return write_image(expert, config_hash=HASH, expert_id=5, layer=2)


def test_round_trip(expert, image):
    header, back = read_image(image, config_hash=HASH, expert_id=5)
    assert (header.config_hash, header.expert_id, header.layer) == (HASH, 5, 2)
    for name in ("gate", "up", "down"):
        assert getattr(back, name) == getattr(expert, name)
    for name in ("gate_mult", "gate_shift", "up_mult", "up_shift", "down_mult", "down_shift", "act_lut"):
        assert torch.equal(getattr(back, name), getattr(expert, name)), name
    assert (back.gated_mult, back.gated_shift, back.out_scale) == (expert.gated_mult, expert.gated_shift,
                                                                    expert.out_scale)
    x_q, tm, ts, _ = quantize_activations(torch.randn(4, 24))
    assert torch.equal(expert_int(x_q, tm, ts, back), expert_int(x_q, tm, ts, expert))


def test_header_fields_at_documented_offsets(image):
    lay = ImageLayout(24, 40, 3, 2, 4)
    assert image[:4] == MAGIC
    assert struct.unpack_from("<HHIHHII", image, 4) == (1, HEADER_SIZE, HASH, 5, 2, 24, 40)
    assert tuple(image[24:29]) == (2, 4, 3, 8, 8)
    offsets = struct.unpack_from("<6I", image, 32)
    assert offsets == lay.offsets and all(o % IMAGE_ALIGN == 0 for o in offsets)
    assert len(image) == lay.nbytes
    assert struct.unpack_from("<I", image, 56)[0] == zlib.crc32(image[HEADER_SIZE:])
    assert struct.unpack_from("<I", image, 60)[0] == zlib.crc32(image[:60])


def _flip(image, offset):
    data = bytearray(image)
    data[offset] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize(("mutate", "code", "match"), [
    (lambda im: im[:HEADER_SIZE - 1], ImageErrorCode.TRUNCATED, "header alone needs 64"),
    (lambda im: im[: len(im) // 2], ImageErrorCode.TRUNCATED, "its header says"),
    (lambda im: with_header_field(im, 0, "<4s", b"MOEY"), ImageErrorCode.BAD_MAGIC, "magic"),
    (lambda im: with_header_field(im, 4, "<H", 2), ImageErrorCode.BAD_VERSION, "version 2"),
    (lambda im: _flip(im, 20), ImageErrorCode.BAD_HEADER_CRC, "header CRC"),
    (lambda im: with_header_field(im, 8, "<I", 0x12345678), ImageErrorCode.HASH_MISMATCH, "12345678"),
    (lambda im: with_header_field(im, 12, "<H", 6), ImageErrorCode.EXPERT_MISMATCH, "expert 6, expected 5"),
    (lambda im: with_header_field(im, 36, "<I", 4096), ImageErrorCode.BAD_SHAPE, "offsets"),
    (lambda im: with_header_field(im, 25, "<B", 3), ImageErrorCode.BAD_SHAPE, "power of two"),
    (lambda im: _flip(im, HEADER_SIZE + 7), ImageErrorCode.BAD_PAYLOAD_CRC, "payload CRC"),
    (lambda im: _flip(im, len(im) - 1), ImageErrorCode.BAD_PAYLOAD_CRC, "payload CRC"),
])
def test_bad_images_are_refused_by_name(image, mutate, code, match):
    with pytest.raises(ImageError, match=match) as info:
        read_image(mutate(image), config_hash=HASH, expert_id=5)
    assert info.value.code == code
    assert str(info.value).startswith(code.name.lower())


def test_writer_checks_ids(expert):
    with pytest.raises(ValueError, match="expert_id"):
        write_image(expert, config_hash=HASH, expert_id=1 << 16)
    with pytest.raises(ValueError, match="config_hash"):
        write_image(expert, config_hash=-1, expert_id=0)


def test_a_device_layout_refuses_images_of_other_shapes(expert, image):
    own = ImageLayout(24, 40, 3, 2, 4)
    header, _ = read_image(image, config_hash=HASH, expert_id=5, layout=own)
    assert header.layout == own
    for other in (ImageLayout(24, 40, 4, 2, 4), ImageLayout(24, 40, 3, 1, 4), ImageLayout(24, 40, 3, 2, 4, 8, 6)):
        with pytest.raises(ImageError, match="differ from this device's") as info:
            read_image(image, config_hash=HASH, expert_id=5, layout=other)
        assert info.value.code == ImageErrorCode.BAD_SHAPE
    # the expert id is checked before the shapes, as in the loader
    with pytest.raises(ImageError) as info:
        read_image(image, config_hash=HASH, expert_id=6, layout=ImageLayout(24, 40, 4, 2, 4))
    assert info.value.code == ImageErrorCode.EXPERT_MISMATCH

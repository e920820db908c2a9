import random
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moegen.golden.link import (
    BYTE_FAULTS,
    FrameParser,
    LinkModel,
    Opcode,
    Request,
    Response,
    Status,
    corrupt,
    encode_request,
    encode_response,
)


def test_request_bytes_exact():
    frame = encode_request(7, Opcode.WRITE_MEM, 0x1000, payload=b"\x01\x02")
    body = bytes([7, 4, 0]) + struct.pack("<IH", 0x1000, 2) + b"\x01\x02"
    assert frame == b"\xa5" + body + struct.pack("<I", zlib.crc32(body))
    read = encode_request(8, Opcode.READ_CSR, 4, read_length=8)
    assert len(read) == 14 and read[8:10] == b"\x08\x00"


@given(st.lists(st.tuples(st.integers(0, 255), st.sampled_from(list(Opcode)), st.integers(0, 2**32 - 1),
                          st.binary(max_size=40)), max_size=12))
def test_frames_round_trip_through_the_parser_in_any_chunking(requests):
    stream = b"".join(encode_request(s, op, a, payload=p if op in (2, 4, 5) else b"",
                                     read_length=0 if op in (2, 4, 5) else len(p)) for s, op, a, p in requests)
    parser = FrameParser()
    rng = random.Random(len(stream))
    frames, i = [], 0
    while i < len(stream):
        step = rng.randrange(1, 9)
        frames += parser.feed(stream[i : i + step])
        i += step
    assert [(f.seq, f.opcode, f.address) for f in frames] == [(s, op, a) for s, op, a, _ in requests]
    assert parser.dropped == 0


def _corrupt(frame, rng):
    kind = rng.choice(BYTE_FAULTS)
    return corrupt(frame, kind, rng.randrange(len(frame)), rng)


def test_corrupted_frames_are_never_accepted():
    """1000 frames, each corrupted by a flipped, dropped, duplicated or truncated byte, then
    an idle gap (the host waits for a response), then a good frame: every accepted frame is
    one that was sent, byte for byte (a duplicated byte after the CRC leaves a frame intact),
    and every good frame after a gap is received."""
    rng = random.Random(5)
    parser = FrameParser(max_payload=64)
    sent, accepted, good = [], [], []
    for i in range(1000):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        request = Request(i % 256, Opcode.WRITE_MEM, rng.randrange(1 << 20), len(payload), payload)
        sent.append(request)
        accepted += parser.feed(_corrupt(encode_request(request.seq, request.opcode, request.address,
                                                        payload=payload), rng))
        parser.timeout()
        good.append(Request(i % 256, Opcode.NOP, i, 0))
        got = parser.feed(encode_request(i % 256, Opcode.NOP, i))
        assert got == [good[-1]]
    corrupted_but_accepted = [frame for frame in accepted if frame not in good]
    assert all(frame in sent for frame in corrupted_but_accepted)
    assert parser.dropped > 900


def _device(max_payload=32, **kwargs):
    csrs, queue = {0: 0x12345678}, []
    mem = bytearray(256)

    def submit(words):
        if len(queue) >= 2:
            return False
        queue.append(words)
        return True

    model = LinkModel(csr_read=lambda a: csrs.get(a, 0), csr_write=csrs.__setitem__, mem=mem, submit=submit,
                      max_payload=max_payload, **kwargs)
    return model, csrs, mem, queue


def _ask(model, *args, **kwargs):
    (response,) = FrameParser(responses=True).feed(model.receive(encode_request(*args, **kwargs)))
    return response


def test_model_executes_requests():
    model, csrs, mem, queue = _device()
    assert _ask(model, 1, Opcode.READ_CSR, 0, read_length=4) == Response(1, 1, Status.OK, struct.pack("<I", 0x12345678))
    assert _ask(model, 2, Opcode.WRITE_CSR, 8, payload=struct.pack("<II", 5, 6)).status == Status.OK
    assert csrs[8] == 5 and csrs[12] == 6
    assert _ask(model, 3, Opcode.WRITE_MEM, 250, payload=b"abcdef").status == Status.OK
    assert _ask(model, 4, Opcode.READ_MEM, 250, read_length=6).payload == b"abcdef" == mem[250:]
    assert _ask(model, 5, Opcode.SUBMIT, 0, payload=struct.pack("<I", 9)).status == Status.OK and queue == [[9]]
    assert _ask(model, 6, Opcode.NOP, 0) == Response(6, 0, Status.OK)


@pytest.mark.parametrize(("args", "kwargs", "status"), [
    ((Opcode.READ_MEM, 250), {"read_length": 7}, Status.BAD_ADDRESS),
    ((Opcode.READ_CSR, 2), {"read_length": 4}, Status.BAD_ADDRESS),
    ((Opcode.READ_CSR, 0), {"read_length": 6}, Status.BAD_LENGTH),
    ((Opcode.READ_MEM, 0), {"read_length": 33}, Status.BAD_LENGTH),
    ((9, 0), {}, Status.BAD_OPCODE),
])
def test_model_refuses_bad_requests_without_side_effects(args, kwargs, status):
    model, csrs, mem, _ = _device()
    before = (dict(csrs), bytes(mem))
    assert _ask(model, 1, *args, **kwargs).status == status
    assert (dict(csrs), bytes(mem)) == before


@pytest.mark.parametrize(("args", "kwargs", "status"), [
    ((Opcode.READ_MEM, 4), {"read_length": 6}, Status.BAD_LENGTH),  # the length is checked first
    ((Opcode.READ_MEM, 6), {"read_length": 8}, Status.BAD_ADDRESS),
    ((Opcode.WRITE_MEM, 4), {"payload": b"abcdef"}, Status.BAD_LENGTH),
    ((Opcode.WRITE_MEM, 252), {"payload": b"abcdefgh"}, Status.BAD_ADDRESS),
    ((Opcode.WRITE_MEM, 2), {"payload": b"abcd"}, Status.BAD_ADDRESS),
    ((Opcode.WRITE_MEM, 248), {"payload": b"abcdefgh"}, Status.OK),
    ((Opcode.READ_MEM, 256), {"read_length": 0}, Status.OK),
])
def test_memory_accesses_are_whole_aligned_words(args, kwargs, status):
    model, _, mem, _ = _device(mem_word=4)
    before = bytes(mem)
    assert _ask(model, 1, *args, **kwargs).status == status
    assert (bytes(mem) == before) == (status != Status.OK or args[0] == Opcode.READ_MEM)


def test_an_unmapped_csr_word_refuses_the_whole_access():
    writes = []
    model = LinkModel(csr_read=lambda a: a, csr_write=lambda a, v: writes.append((a, v)), mem=bytearray(16),
                      submit=lambda words: True, max_payload=64, csr_mapped=lambda a: a < 16)
    assert _ask(model, 1, Opcode.READ_CSR, 8, read_length=8).payload == struct.pack("<II", 8, 12)
    assert _ask(model, 2, Opcode.READ_CSR, 8, read_length=12).status == Status.BAD_ADDRESS
    assert _ask(model, 3, Opcode.WRITE_CSR, 12, payload=bytes(8)).status == Status.BAD_ADDRESS
    assert _ask(model, 4, Opcode.WRITE_CSR, 2 ** 32 - 4, payload=bytes(4)).status == Status.BAD_ADDRESS
    assert writes == []
    assert _ask(model, 5, Opcode.WRITE_CSR, 8, payload=struct.pack("<II", 1, 2)).status == Status.OK
    assert writes == [(8, 1), (12, 2)]


def test_mem_word_is_checked():
    with pytest.raises(ValueError, match="mem_word must be a positive integer, not 0"):
        _device(mem_word=0)


def test_a_retry_of_a_write_replays_its_status_without_executing():
    model, _, _, queue = _device()
    frame = encode_request(9, Opcode.SUBMIT, 0, payload=struct.pack("<I", 1))
    first = model.receive(frame)
    assert model.receive(frame) == first and queue == [[1]]
    assert _ask(model, 10, Opcode.SUBMIT, 0, payload=struct.pack("<I", 2)).status == Status.OK
    full = encode_request(11, Opcode.SUBMIT, 0, payload=struct.pack("<I", 3))
    assert FrameParser(responses=True).feed(model.receive(full))[0].status == Status.QUEUE_FULL
    queue.clear()  # room again, but a retry only replays the cached QUEUE_FULL
    assert FrameParser(responses=True).feed(model.receive(full))[0].status == Status.QUEUE_FULL and queue == []
    assert (model.frames, model.dropped) == (5, 0)


def test_a_retry_of_a_read_is_executed_again_with_fresh_data():
    model, csrs, mem, _ = _device()
    frame = encode_request(4, Opcode.READ_CSR, 0, read_length=4)
    assert FrameParser(responses=True).feed(model.receive(frame))[0].payload == struct.pack("<I", 0x12345678)
    csrs[0] = 7
    assert FrameParser(responses=True).feed(model.receive(frame))[0].payload == struct.pack("<I", 7)
    mem[0] = 1
    assert _ask(model, 5, Opcode.READ_MEM, 0, read_length=1).payload == b"\x01"
    mem[0] = 2
    assert _ask(model, 5, Opcode.READ_MEM, 0, read_length=1).payload == b"\x02"


def test_the_same_sequence_number_with_another_opcode_is_not_a_retry():
    model, _, mem, _ = _device()
    assert _ask(model, 6, Opcode.READ_MEM, 0, read_length=2).payload == b"\0\0"
    assert _ask(model, 6, Opcode.WRITE_MEM, 0, payload=b"ab").status == Status.OK and mem[:2] == b"ab"


def test_sequence_zero_is_never_a_retry():
    model, _, _, queue = _device()
    model.receive(encode_request(1, Opcode.SUBMIT, 0, payload=struct.pack("<I", 1)))
    model.receive(encode_request(0, Opcode.NOP, 0))  # a restarted host syncs with seq 0 ...
    model.receive(encode_request(1, Opcode.SUBMIT, 0, payload=struct.pack("<I", 2)))  # ... and counts from 1
    assert queue == [[1], [2]]


def test_responses_encode_and_parse():
    frame = encode_response(3, Opcode.READ_MEM, Status.OK, b"xyz")
    assert FrameParser(responses=True).feed(frame) == [Response(3, 3, 0, b"xyz")]
    assert frame[0] == 0x5A and frame[4:6] == b"\x03\x00"

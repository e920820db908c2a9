import random
import struct

import pytest

from moegen.errors import UserError
from moegen.golden.link import LinkModel, Status
from moegen.host.link import (
    ByteFaults,
    FaultyTransport,
    LinkClient,
    LinkError,
    LinkTimeout,
    ModelTransport,
    open_transport,
)


def make_device(max_payload=64, mem_size=4096):
    csrs, queue = {}, []
    mem = bytearray(mem_size)
    model = LinkModel(csr_read=lambda a: csrs.get(a, 0), csr_write=csrs.__setitem__, mem=mem,
                      submit=lambda words: queue.append(words) or True, max_payload=max_payload)
    return model, csrs, mem, queue


def test_client_reads_and_writes_through_the_model():
    model, _, mem, queue = make_device()
    client = LinkClient(ModelTransport(model), max_payload=64)
    client.sync()
    client.write_csr(0x10, 1, 2, 3)
    assert client.read_csr(0x10, 3) == [1, 2, 3]
    data = bytes(range(200))
    client.write_mem(100, data)  # split into 64-byte frames
    assert mem[100:300] == data and client.read_mem(100, 200) == data
    client.submit([7, 8])
    client.nop()
    assert queue == [[7, 8]] and client.stats["retries"] == 0


def test_errors_are_raised_by_name():
    model, *_ = make_device(mem_size=128)
    client = LinkClient(ModelTransport(model), max_payload=64)
    with pytest.raises(LinkError, match="READ_MEM at 0x00000070 failed: BAD_ADDRESS") as info:
        client.read_mem(0x70, 32)
    assert info.value.status == Status.BAD_ADDRESS


def test_a_silent_device_times_out_in_bounded_time():
    class Silent:
        def write(self, data):
            pass

        def read(self, limit, timeout):
            return b""

        def close(self):
            pass

    client = LinkClient(Silent(), timeout=0.01, retries=3)
    with pytest.raises(LinkTimeout, match="NOP at 0x00000000: no valid response after 3 tries"):
        client.nop()
    assert client.stats["timeouts"] == 3


def test_faulty_link_never_corrupts_silently():
    """1,000+ injected faults in both directions: every request completes with the right
    data (retries), nothing is executed twice, nothing is written wrong."""
    model, _, mem, queue = make_device(max_payload=64)
    faults = ByteFaults(0.3, seed=11)
    transport = FaultyTransport(ModelTransport(model), faults)
    client = LinkClient(transport, max_payload=64, timeout=0.005, retries=50)
    rng = random.Random(3)
    expected = bytearray(len(mem))
    submitted = []
    while faults.total < 1000:
        address = rng.randrange(0, len(mem) - 64)
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        client.write_mem(address, data)
        expected[address : address + len(data)] = data
        assert client.read_mem(address, len(data)) == data
        word = rng.randrange(1 << 32)
        client.submit([word])
        submitted.append([word])
    assert mem == expected
    assert queue == submitted
    assert client.stats["retries"] > 0 and client.stats["dropped"] > 0


def test_unknown_transport_is_named():
    with pytest.raises(UserError, match="unknown transport 'usb'; known transports: socket, serial, model"):
        open_transport("usb")


def test_socket_transport_reports_a_missing_harness(tmp_path):
    with pytest.raises(UserError, match="cannot connect to"):
        open_transport("socket", str(tmp_path / "nothing.sock"), connect_timeout=0.1)


def test_words_are_little_endian():
    model, csrs, *_ = make_device()
    LinkClient(ModelTransport(model)).write_csr(0, 0x11223344)
    assert struct.pack("<I", csrs[0]) == b"\x44\x33\x22\x11"


def test_byte_faults_inject_every_kind_and_check_their_rate():
    faults = ByteFaults(1.0, seed=2)
    data = bytes(range(32))
    mangled = [faults(data) for _ in range(200)]
    assert all(m != data for m in mangled)
    assert min(faults.injected.values()) > 20 and faults.total == 200
    assert ByteFaults(0.0)(data) == data
    with pytest.raises(ValueError, match=r"fault rate must lie in 0\.\.1, not 2"):
        ByteFaults(2)

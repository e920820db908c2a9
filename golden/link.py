"""The host link: one framed byte protocol over any byte transport (socket, UART).

Every exchange is a request frame from the host and one response frame from the device.
All multi-byte fields are little-endian; the CRC is CRC-32 (zlib's) over every byte of the
frame after the sync byte and before the CRC.

Request (host to device)::

    0   u8   sync 0xA5
    1   u8   sequence number (the host increments it per new request; a retry repeats it)
    2   u8   opcode (Opcode)
    3   u8   reserved, 0
    4   u32  address (CSR byte address, or device-memory byte address)
    8   u16  length (bytes to write, which follow as payload; or bytes to read)
    10  ...  payload (writes only)
    ..  u32  CRC-32

Response (device to host)::

    0   u8   sync 0x5A
    1   u8   sequence number of the request
    2   u8   opcode of the request
    3   u8   status (Status)
    4   u16  payload length
    6   ...  payload (the bytes read; empty otherwise)
    ..  u32  CRC-32

Rules (what the device endpoint does, and :class:`LinkModel` defines executably):

* A request whose CRC fails is dropped with all its bytes, without a response; the host
  times out and retries. A header announcing more than ``max_payload`` bytes drops just
  its sync byte. Bytes outside a frame are ignored until the next sync byte, so the parser
  resynchronizes after any garbage. (The RTL endpoint also abandons a frame that stops
  arriving for a configured number of cycles.)
* Writes are buffered until the CRC has been checked; a corrupt frame never writes.
* A request with the same sequence number as the previous valid one is a retry: the device
  answers with the previous response again and does not execute it twice (submitting a
  command twice would run it twice). Sequence number 0 is never a retry and clears the
  device's memory of the last request: a host that (re)connects starts with a seq-0 NOP,
  then counts 1..255, 1, ...
* Lengths: at most ``max_payload`` bytes; CSR accesses are whole 32-bit words at aligned
  addresses. Violations answer ``BAD_LENGTH``/``BAD_ADDRESS`` and do nothing.
"""

import enum
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "REQUEST_HEADER",
    "RESPONSE_HEADER",
    "SYNC_REQUEST",
    "SYNC_RESPONSE",
    "FrameParser",
    "LinkModel",
    "Opcode",
    "Request",
    "Response",
    "Status",
    "encode_request",
    "encode_response",
]

SYNC_REQUEST = 0xA5
SYNC_RESPONSE = 0x5A
REQUEST_HEADER = struct.Struct("<BBBBIH")
RESPONSE_HEADER = struct.Struct("<BBBBH")
CRC_BYTES = 4


class Opcode(enum.IntEnum):
    NOP = 0  # ping: answers OK with no payload
    READ_CSR = 1
    WRITE_CSR = 2
    READ_MEM = 3
    WRITE_MEM = 4
    SUBMIT = 5  # write command words into the command queue (address ignored)


class Status(enum.IntEnum):
    OK = 0
    BAD_OPCODE = 1
    BAD_ADDRESS = 2
    BAD_LENGTH = 3
    QUEUE_FULL = 4


@dataclass(frozen=True)
class Request:
    seq: int
    opcode: int
    address: int
    length: int
    payload: bytes = b""


@dataclass(frozen=True)
class Response:
    seq: int
    opcode: int
    status: int
    payload: bytes = b""


def _with_crc(body):
    return body + struct.pack("<I", zlib.crc32(body[1:]))


def encode_request(seq, opcode, address, *, payload=b"", read_length=0):
    """Bytes of a request frame. Writes carry ``payload``; reads ask for ``read_length``."""
    if not 0 <= seq < 256:
        raise ValueError(f"seq must lie in 0..255, not {seq!r}")
    if payload and read_length:
        raise ValueError("a request either writes a payload or reads, not both")
    length = len(payload) or read_length
    if not 0 <= length < 1 << 16:
        raise ValueError(f"length must lie in 0..65535, not {length}")
    if not 0 <= address < 1 << 32:
        raise ValueError(f"address must lie in 0..2**32-1, not {address!r}")
    return _with_crc(REQUEST_HEADER.pack(SYNC_REQUEST, seq, int(opcode), 0, address, length) + bytes(payload))


def encode_response(seq, opcode, status, payload=b""):
    return _with_crc(RESPONSE_HEADER.pack(SYNC_RESPONSE, seq, int(opcode), int(status), len(payload)) + bytes(payload))


def _writes(opcode):
    return opcode in (Opcode.WRITE_CSR, Opcode.WRITE_MEM, Opcode.SUBMIT)


class FrameParser:
    """Incremental parser of frames in one direction; resynchronizes on the sync byte.

    ``feed(data)`` returns the complete frames with a good CRC found so far (Request or
    Response objects); corrupt frames are counted in :attr:`dropped` and skipped.
    """

    def __init__(self, *, responses=False, max_payload=1 << 16):
        self.responses = responses
        self.max_payload = max_payload
        self.sync = SYNC_RESPONSE if responses else SYNC_REQUEST
        self.header = RESPONSE_HEADER if responses else REQUEST_HEADER
        self.buffer = bytearray()
        self.dropped = 0

    def timeout(self):
        """The line went idle in the middle of a frame: abandon it (the device's idle timer)."""
        if self.buffer:
            self.dropped += 1
            self.buffer.clear()

    def _payload_length(self, fields):
        if self.responses:
            return fields[4]
        return fields[5] if _writes(fields[2]) else 0

    def feed(self, data):
        self.buffer += data
        frames = []
        while True:
            start = self.buffer.find(self.sync)
            if start < 0:
                self.buffer.clear()
                return frames
            del self.buffer[:start]
            if len(self.buffer) < self.header.size:
                return frames
            fields = self.header.unpack_from(self.buffer)
            payload_length = self._payload_length(fields)
            if payload_length > self.max_payload:
                self.dropped += 1
                del self.buffer[:1]
                continue
            end = self.header.size + payload_length
            if len(self.buffer) < end + CRC_BYTES:
                return frames
            (crc,) = struct.unpack_from("<I", self.buffer, end)
            if zlib.crc32(self.buffer[1:end]) != crc:
                self.dropped += 1
                del self.buffer[: end + CRC_BYTES]  # the device keeps no copy to rescan
                continue
            payload = bytes(self.buffer[self.header.size : end])
            if self.responses:
                frames.append(Response(fields[1], fields[2], fields[3], payload))
            else:
                frames.append(Request(fields[1], fields[2], fields[4], fields[5], payload))
            del self.buffer[: end + CRC_BYTES]


class LinkModel:
    """Executable reference of the device side of the link: requests in, responses out.

    ``csr_read(address) -> int``, ``csr_write(address, value)``, ``mem`` (a bytearray) and
    ``submit(words) -> bool`` (False when the queue is full) are the device behind it.
    """

    def __init__(self, *, csr_read, csr_write, mem, submit, max_payload):
        self.csr_read = csr_read
        self.csr_write = csr_write
        self.mem = mem
        self.submit = submit
        self.max_payload = max_payload
        self.parser = FrameParser(max_payload=max_payload)
        self.last = None  # (seq, response bytes) of the last executed request

    def receive(self, data):
        """Bytes from the host; returns the response bytes to send back."""
        out = b""
        for request in self.parser.feed(data):
            if self.last and self.last[0] == request.seq:
                out += self.last[1]
                continue
            response = self._execute(request)
            self.last = (request.seq, response) if request.seq else None
            out += response
        return out

    def timeout(self):
        self.parser.timeout()

    def _execute(self, r):
        def answer(status, payload=b""):
            return encode_response(r.seq, r.opcode, status, payload)

        if r.opcode not in Opcode.__members__.values():
            return answer(Status.BAD_OPCODE)
        if r.length > self.max_payload:
            return answer(Status.BAD_LENGTH)
        if r.opcode == Opcode.NOP:
            return answer(Status.OK)
        if r.opcode in (Opcode.READ_CSR, Opcode.WRITE_CSR, Opcode.SUBMIT):
            if r.length % 4 or r.length == 0:
                return answer(Status.BAD_LENGTH)
            if r.opcode != Opcode.SUBMIT and r.address % 4:
                return answer(Status.BAD_ADDRESS)
        if r.opcode in (Opcode.READ_MEM, Opcode.WRITE_MEM) and r.address + r.length > len(self.mem):
            return answer(Status.BAD_ADDRESS)
        words = range(r.address, r.address + r.length, 4)
        if r.opcode == Opcode.READ_CSR:
            return answer(Status.OK, b"".join(struct.pack("<I", self.csr_read(a)) for a in words))
        if r.opcode == Opcode.WRITE_CSR:
            for i, a in enumerate(words):
                self.csr_write(a, struct.unpack_from("<I", r.payload, 4 * i)[0])
            return answer(Status.OK)
        if r.opcode == Opcode.READ_MEM:
            return answer(Status.OK, bytes(self.mem[r.address : r.address + r.length]))
        if r.opcode == Opcode.WRITE_MEM:
            self.mem[r.address : r.address + r.length] = r.payload
            return answer(Status.OK)
        accepted = self.submit(list(struct.unpack(f"<{r.length // 4}I", r.payload)))
        return answer(Status.OK if accepted else Status.QUEUE_FULL)

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
* Retries. The device remembers the sequence number, opcode and status of the last request
  it executed. A request with the same sequence number (not 0) and the same opcode is a
  retry. A retry of a write (``WRITE_CSR``, ``WRITE_MEM``, ``SUBMIT``) is not executed again
  (submitting a command twice would run it twice): the device replays the cached response,
  the remembered status with no payload. A retry of anything else (``NOP``, ``READ_CSR``,
  ``READ_MEM``, an unknown opcode) is executed again and answered with fresh data, so the
  device never has to keep a read's payload. Sequence number 0 is never a retry and clears
  the device's memory of the last request: a host that (re)connects starts with a seq-0
  NOP, then counts 1..255, 1, ...
* Lengths: at most ``max_payload`` bytes. CSR accesses are whole 32-bit words at aligned
  addresses, and every word of the range must be mapped (``csr_mapped``). Memory accesses
  are whole memory words (``mem_word`` bytes, the memory port's width) at aligned addresses
  inside the memory. Violations answer ``BAD_LENGTH``/``BAD_ADDRESS`` and do nothing.
* Checks run in this order; the first that fails gives the status: an unknown opcode
  (``BAD_OPCODE``); a length above ``max_payload`` (``BAD_LENGTH``); for CSR and SUBMIT
  requests a length of 0 or not a multiple of 4 (``BAD_LENGTH``), for CSR requests a
  misaligned address (``BAD_ADDRESS``); for memory requests a length not a multiple of
  ``mem_word`` (``BAD_LENGTH``), then a misaligned address or a range past the end of memory
  (``BAD_ADDRESS``); for CSR requests an unmapped word (``BAD_ADDRESS``); for SUBMIT more
  words than the command queue has room for (``QUEUE_FULL``, nothing pushed).
"""

import enum
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "BYTE_FAULTS",
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
    "corrupt",
    "encode_request",
    "encode_response",
]

SYNC_REQUEST = 0xA5
SYNC_RESPONSE = 0x5A
REQUEST_HEADER = struct.Struct("<BBBBIH")
RESPONSE_HEADER = struct.Struct("<BBBBH")
CRC_BYTES = 4
#: The byte faults a line can inflict, as :func:`corrupt` applies them.
BYTE_FAULTS = ("flip", "drop", "duplicate", "truncate")


def corrupt(data, kind, index, rng):
    """``data`` with one fault of ``kind`` (:data:`BYTE_FAULTS`) at byte ``index``: one bit
    flipped (which, drawn from ``rng``), the byte dropped or duplicated, or everything from it
    on cut off. Tests and the fault benchmarks inject faults with it."""
    data = bytearray(data)
    if kind == "flip":
        data[index] ^= 1 << rng.randrange(8)
    elif kind == "drop":
        del data[index]
    elif kind == "duplicate":
        data.insert(index, data[index])
    elif kind == "truncate":
        del data[index:]
    else:
        raise ValueError(f"unknown byte fault {kind!r}; known: {', '.join(BYTE_FAULTS)}")
    return bytes(data)


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
    ``submit(words) -> bool`` (False when the queue is full) are the device behind it;
    ``csr_mapped(address) -> bool`` tells which CSR byte addresses exist (default: all), and
    ``mem_word`` is the memory word in bytes that memory accesses must be whole multiples of.

    Members
    -------
    frames : int
        Request frames with a good CRC (each was answered: executed, or replayed as a retry).
    dropped : int
        Request frames dropped: bad CRC, oversize header, or abandoned by :meth:`timeout`.
    """

    def __init__(self, *, csr_read, csr_write, mem, submit, max_payload, mem_word=1, csr_mapped=None):
        if type(mem_word) is not int or mem_word < 1:
            raise ValueError(f"mem_word must be a positive integer, not {mem_word!r}")
        self.csr_read = csr_read
        self.csr_write = csr_write
        self.csr_mapped = csr_mapped or (lambda address: True)
        self.mem = mem
        self.submit = submit
        self.max_payload = max_payload
        self.mem_word = mem_word
        self.parser = FrameParser(max_payload=max_payload)
        self.frames = 0
        self.last = None  # (seq, opcode, status) of the last executed request with seq != 0

    @property
    def dropped(self):
        return self.parser.dropped

    def receive(self, data):
        """Bytes from the host; returns the response bytes to send back."""
        out = b""
        for request in self.parser.feed(data):
            self.frames += 1
            if _writes(request.opcode) and self.last and self.last[:2] == (request.seq, request.opcode):
                out += encode_response(request.seq, request.opcode, self.last[2])
                continue
            status, payload = self._execute(request)
            self.last = (request.seq, request.opcode, status) if request.seq else None
            out += encode_response(request.seq, request.opcode, status, payload)
        return out

    def timeout(self):
        self.parser.timeout()

    def _check(self, r):
        """The status of request ``r`` before it runs (QUEUE_FULL is the queue's to say)."""
        if r.opcode not in Opcode.__members__.values():
            return Status.BAD_OPCODE
        if r.length > self.max_payload:
            return Status.BAD_LENGTH
        if r.opcode in (Opcode.READ_CSR, Opcode.WRITE_CSR, Opcode.SUBMIT):
            if r.length % 4 or r.length == 0:
                return Status.BAD_LENGTH
            if r.opcode != Opcode.SUBMIT and r.address % 4:
                return Status.BAD_ADDRESS
        if r.opcode in (Opcode.READ_MEM, Opcode.WRITE_MEM):
            if r.length % self.mem_word:
                return Status.BAD_LENGTH
            if r.address % self.mem_word or r.address + r.length > len(self.mem):
                return Status.BAD_ADDRESS
        if r.opcode in (Opcode.READ_CSR, Opcode.WRITE_CSR) and not all(
                self.csr_mapped(a) for a in range(r.address, r.address + r.length, 4)):
            return Status.BAD_ADDRESS
        return Status.OK

    def _execute(self, r):
        """Run request ``r``; returns (status, response payload)."""
        status = self._check(r)
        if status != Status.OK or r.opcode == Opcode.NOP:
            return status, b""
        words = range(r.address, r.address + r.length, 4)
        if r.opcode == Opcode.READ_CSR:
            return status, b"".join(struct.pack("<I", self.csr_read(a)) for a in words)
        if r.opcode == Opcode.WRITE_CSR:
            for i, a in enumerate(words):
                self.csr_write(a, struct.unpack_from("<I", r.payload, 4 * i)[0])
            return status, b""
        if r.opcode == Opcode.READ_MEM:
            return status, bytes(self.mem[r.address : r.address + r.length])
        if r.opcode == Opcode.WRITE_MEM:
            self.mem[r.address : r.address + r.length] = r.payload
            return status, b""
        accepted = self.submit(list(struct.unpack(f"<{r.length // 4}I", r.payload)))
        return (Status.OK if accepted else Status.QUEUE_FULL), b""

"""The host end of the link: byte transports by name, and a client that frames requests,
checks responses, times out and retries (see :mod:`moegen.golden.link` for the protocol).

Transports move bytes and nothing else; they register by name in :data:`TRANSPORTS`:

* ``socket``: a Unix or TCP stream socket (the Verilator harness listens on one);
* ``serial``: a serial port through pyserial (a board's UART);
* ``model``: an in-process :class:`~moegen.golden.link.LinkModel` (tests and dry runs).

:class:`LinkClient` never hangs: every read has a deadline, a request without a valid
response is retried with the same sequence number (the device answers a retry without
executing it twice), and after ``retries`` attempts it raises :class:`LinkTimeout`.
"""

import random
import socket
import struct
import threading
import time

from ..errors import UserError
from ..golden.link import BYTE_FAULTS, FrameParser, Opcode, Status, corrupt, encode_request

__all__ = [
    "TRANSPORTS",
    "ByteFaults",
    "FaultyTransport",
    "LinkClient",
    "LinkError",
    "LinkTimeout",
    "open_transport",
    "serve_model",
]


class LinkError(RuntimeError):
    """The device answered a request with an error status."""

    def __init__(self, opcode, address, status):
        self.status = Status(status)
        super().__init__(f"{Opcode(opcode).name} at 0x{address:08x} failed: {self.status.name}")


class LinkTimeout(TimeoutError):
    """No valid response after every retry."""


class SocketTransport:
    """A stream socket: ``path`` (Unix) or ``host:port`` (TCP)."""

    def __init__(self, address, *, connect_timeout=10.0):
        family, target = ((socket.AF_INET, _host_port(address)) if ":" in address else (socket.AF_UNIX, address))
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(target)
                break
            except (FileNotFoundError, ConnectionRefusedError) as error:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise UserError(f"cannot connect to {address}: {error.strerror}") from None
                time.sleep(0.05)

    def write(self, data):
        self.sock.sendall(data)

    def read(self, limit, timeout):
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data = self.sock.recv(limit)
        except TimeoutError:
            return b""
        if not data:
            raise ConnectionError("the device closed the connection")
        return data

    def close(self):
        self.sock.close()


def _host_port(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


class SerialTransport:
    """A serial port (pyserial); ``address`` is the device path, ``baud`` its rate."""

    def __init__(self, address, *, baud=3_000_000):
        import serial  # pyserial: only needed for boards

        try:
            self.port = serial.Serial(address, baudrate=baud, timeout=0)
        except serial.SerialException as error:
            raise UserError(f"cannot open serial port {address}: {error}") from None

    def write(self, data):
        self.port.write(data)
        self.port.flush()

    def read(self, limit, timeout):
        self.port.timeout = timeout
        return self.port.read(max(1, min(limit, self.port.in_waiting or 1)))

    def close(self):
        self.port.close()


class ModelTransport:
    """An in-process device model (:class:`~moegen.golden.link.LinkModel`)."""

    def __init__(self, model):
        self.model = model
        self.pending = b""

    def write(self, data):
        self.pending += self.model.receive(data)

    def read(self, limit, timeout):
        data, self.pending = self.pending[:limit], self.pending[limit:]
        if not data:
            self.model.timeout()  # nothing to say: the line is idle
            time.sleep(min(timeout, 1e-3))
        return data

    def close(self):
        self.pending = b""


TRANSPORTS = {"socket": SocketTransport, "serial": SerialTransport, "model": ModelTransport}


def open_transport(kind, *args, **kwargs):
    """A transport by registry name; an unknown name lists the known ones."""
    if kind not in TRANSPORTS:
        raise UserError(f"unknown transport {kind!r}; known transports: {', '.join(TRANSPORTS)}")
    return TRANSPORTS[kind](*args, **kwargs)


class LinkClient:
    """Requests over a transport, with timeouts, retries and sequence numbers.

    Parameters
    ----------
    transport : object
        Has ``write(bytes)``, ``read(limit, timeout) -> bytes`` and ``close()``.
    max_payload : int
        Largest payload the device accepts; longer memory transfers are split.
    timeout : float
        Seconds to wait for each response.
    retries : int
        Attempts per request before :class:`LinkTimeout`.

    Members
    -------
    stats : dict
        ``requests``, ``retries``, ``dropped`` (corrupt response frames), ``timeouts``,
        ``bytes_out`` and ``bytes_in`` (on the line, retries included).
    """

    def __init__(self, transport, *, max_payload=256, timeout=1.0, retries=8):
        self.transport = transport
        self.max_payload = max_payload
        self.timeout = timeout
        self.retries = retries
        self.seq = 0
        self.parser = FrameParser(responses=True, max_payload=max_payload)
        self.stats = {"requests": 0, "retries": 0, "dropped": 0, "timeouts": 0, "bytes_out": 0, "bytes_in": 0}

    def close(self):
        self.transport.close()

    def sync(self):
        """Start a session: a NOP with sequence number 0, which the device never takes for
        a retry, so a restarted host cannot collide with the device's last sequence number."""
        self.seq = 0
        self._exchange(Opcode.NOP, 0, b"", 0)

    def request(self, opcode, address=0, *, payload=b"", read_length=0):
        """One request; returns the response payload. Raises LinkError or LinkTimeout."""
        self.seq = self.seq % 255 + 1  # 1..255: 0 is reserved for sync()
        return self._exchange(opcode, address, payload, read_length)

    def _exchange(self, opcode, address, payload, read_length):
        self.parser.timeout()  # forget stale bytes: late answers to earlier requests
        frame = encode_request(self.seq, opcode, address, payload=payload, read_length=read_length)
        self.stats["requests"] += 1
        for attempt in range(self.retries):
            if attempt:
                self.stats["retries"] += 1
            self.transport.write(frame)
            self.stats["bytes_out"] += len(frame)
            response = self._await(self.seq, opcode)
            if response is not None:
                if response.status != Status.OK:
                    raise LinkError(opcode, address, response.status)
                if len(response.payload) != read_length:
                    raise LinkError(opcode, address, Status.BAD_LENGTH)  # the device broke the protocol
                return response.payload
            self.stats["timeouts"] += 1
        raise LinkTimeout(f"{Opcode(opcode).name} at 0x{address:08x}: no valid response after {self.retries} tries")

    def _await(self, seq, opcode):
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            before = self.parser.dropped
            data = self.transport.read(4096, left)
            self.stats["bytes_in"] += len(data)
            frames = self.parser.feed(data)
            self.stats["dropped"] += self.parser.dropped - before
            for frame in frames:
                if frame.seq == seq and frame.opcode == opcode:
                    return frame
        self.parser.timeout()
        return None

    def nop(self):
        self.request(Opcode.NOP)

    def read_csr(self, address, count=1):
        data = self.request(Opcode.READ_CSR, address, read_length=4 * count)
        return list(struct.unpack(f"<{count}I", data))

    def write_csr(self, address, *values):
        self.request(Opcode.WRITE_CSR, address, payload=struct.pack(f"<{len(values)}I", *values))

    def read_mem(self, address, length):
        chunks = []
        for offset in range(0, length, self.max_payload):
            size = min(self.max_payload, length - offset)
            chunks.append(self.request(Opcode.READ_MEM, address + offset, read_length=size))
        return b"".join(chunks)

    def write_mem(self, address, data):
        for offset in range(0, len(data), self.max_payload):
            self.request(Opcode.WRITE_MEM, address + offset, payload=data[offset : offset + self.max_payload])

    def submit(self, words):
        self.request(Opcode.SUBMIT, payload=struct.pack(f"<{len(words)}I", *words))


class ByteFaults:
    """Corrupts byte chunks at random: a flipped bit, a dropped, duplicated or truncated
    byte run, each with probability ``rate`` per chunk (``seed`` makes it repeatable).

    Members
    -------
    injected : dict of str -> int
        Faults injected so far, by kind.
    """

    KINDS = BYTE_FAULTS

    def __init__(self, rate, seed=0):
        if not 0 <= rate <= 1:
            raise ValueError(f"fault rate must lie in 0..1, not {rate!r}")
        self.rate = rate
        self.rng = random.Random(seed)
        self.injected = dict.fromkeys(self.KINDS, 0)

    @property
    def total(self):
        return sum(self.injected.values())

    def __call__(self, data):
        if not data or self.rng.random() >= self.rate:
            return data
        i = self.rng.randrange(len(data))
        kind = self.rng.choice(self.KINDS)
        self.injected[kind] += 1
        return corrupt(data, kind, i, self.rng)


class FaultyTransport:
    """Wraps a transport and corrupts bytes in both directions with :class:`ByteFaults`."""

    def __init__(self, inner, faults):
        self.inner = inner
        self.faults = faults

    def write(self, data):
        self.inner.write(self.faults(data))

    def read(self, limit, timeout):
        return self.faults(self.inner.read(limit, timeout))

    def close(self):
        self.inner.close()


def serve_model(path, model, *, faults=None, idle=0.005):
    """Serve a :class:`~moegen.golden.link.LinkModel` on a Unix socket, one connection, in a
    daemon thread (firmware tests and dry runs without a simulator). ``idle`` seconds of
    silence tell the model the line went quiet. Returns the thread."""
    faults = faults or (lambda data: data)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run():
        with server:
            conn, _ = server.accept()
        conn.settimeout(idle)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    model.timeout()
                    continue
                if not data:
                    return
                reply = faults(model.receive(faults(data)))
                if reply:
                    conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread

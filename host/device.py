"""The host driver: one :class:`Device` API over the simulated accelerator, a board, or the
in-process golden model.

Transports register by name in :data:`DEVICES`:

* ``sim``: the Verilator harness (:mod:`moegen.host.sim`): started and built when needed, or
  attached to a running one with ``address=SOCKET``;
* ``serial``: a board's UART (``address`` is the port, at ``config.link.baud``);
* ``model``: :class:`~moegen.golden.device.DeviceModel` behind :class:`~moegen.golden.link.
  LinkModel`, in process (tests, dry runs; no cycles).

``connect()`` reads ``ID``, ``VERSION`` and ``CONFIG_HASH`` and refuses a device that is not
the one the config describes, naming the register. Every call is bounded: link requests time
out and retry (:class:`~moegen.host.link.LinkClient`), waits on the command queue have a
deadline, and a command that fails raises :class:`DeviceError` with the device's error
decoded. Device memory holds expert images from the bottom up; each batch of commands puts
its activation, table and result buffers at the top, growing down.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..golden.device import (
    ALIGN,
    QUEUE_COMMANDS,
    WEIGHT_ONE,
    Command,
    CommandError,
    DeviceModel,
    ErrorSource,
    activation_bytes,
    encode_command,
    pack_table,
    route_words,
    words_bytes,
    x_words,
)
from ..golden.formats import align_up
from ..golden.image import ImageError, ImageErrorCode, read_header
from ..golden.link import LinkModel, Status
from ..golden.router import Routing
from ..rtl.regmap import ID_VALUE, MAP_VERSION, register_map
from .link import LinkClient, LinkError, ModelTransport, SerialTransport, SocketTransport

__all__ = ["DEVICES", "Device", "DeviceError", "DeviceMismatch", "DeviceTimeout", "ExpertHandle", "batch_bytes",
           "model_link", "open_device", "require_counters", "route_bytes"]


class DeviceError(RuntimeError):
    """The device refused a command (``ERROR`` decoded), or memory ran out."""


class DeviceMismatch(UserError):
    """The device is not the one the config describes."""


class DeviceTimeout(DeviceError, TimeoutError):
    """The device did not finish in time."""


def describe_error(value):
    """``ERROR`` register value -> text: source, code name."""
    source, code = value >> 8, value & 0xFF
    if source == ErrorSource.COMMAND and code in CommandError._value2member_map_:
        return f"command error {CommandError(code).name}"
    if source == ErrorSource.LOADER and code in ImageErrorCode._value2member_map_:
        return f"expert image refused: {ImageErrorCode(code).name}"
    return f"error 0x{value:04x}"


@dataclass(frozen=True)
class ExpertHandle:
    """An expert image resident in device memory."""

    addr: int
    expert: int
    nbytes: int


class Device:
    """A connected accelerator.

    Parameters
    ----------
    config : AccelConfig
    link : LinkClient
    owner : object or None
        Closed with the device (a harness the driver started).
    wait_timeout : float
        Seconds a batch of commands may take before :class:`DeviceTimeout`.
    """

    def __init__(self, config, link, *, owner=None, wait_timeout=60.0):
        self.config = config
        self.link = link
        self.owner = owner
        self.wait_timeout = wait_timeout
        self.registers = {reg.name: reg for reg in register_map(config)}
        self.port_bytes = config.memory.port_width // 8
        self.images_end = 0
        self.experts = []  # ExpertHandle of every uploaded image, in address order
        self.fence_id = 0

    # -- session ----------------------------------------------------------------------

    def connect(self):
        """Start a link session and check the device's identity against the config."""
        self.link.sync()
        ident = self.read_reg("ID")
        if ident != ID_VALUE:
            raise DeviceMismatch(f"ID register reads 0x{ident:08x}, expected 0x{ID_VALUE:08x}: not a moegen device")
        version = self.read_reg("VERSION")
        if version >> 16 != MAP_VERSION[0]:
            raise DeviceMismatch(f"VERSION register reads {version >> 16}.{version & 0xFFFF}; this driver speaks "
                                 f"{MAP_VERSION[0]}.x")
        device_hash = self.read_reg("CONFIG_HASH")
        if device_hash != self.config.device_hash:
            raise DeviceMismatch(f"CONFIG_HASH register reads 0x{device_hash:08x}, config {self.config.name!r} is "
                                 f"0x{self.config.device_hash:08x}: the device was built from another config")
        return self

    def close(self):
        self.link.close()
        if self.owner is not None:
            self.owner.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- registers and memory -------------------------------------------------------

    def _reg_addr(self, name, index):
        reg = self.registers.get(name)
        if reg is None:
            raise UserError(f"unknown register {name!r}; registers: {', '.join(self.registers)}")
        if not 0 <= index < reg.count:
            raise UserError(f"register {name} has {reg.count} element(s); index {index} is out of range")
        return reg.offset + 4 * index

    def read_reg(self, name, index=0):
        return self.link.read_csr(self._reg_addr(name, index))[0]

    def write_reg(self, name, value, index=0):
        self.link.write_csr(self._reg_addr(name, index), value)

    def write_mem(self, addr, data):
        """Write ``data`` at ``addr`` (a multiple of the memory word), zero-padded to whole words."""
        data = bytes(data) + bytes(-len(data) % self.port_bytes)
        self.link.write_mem(addr, data)

    def read_mem(self, addr, nbytes):
        padded = nbytes + -nbytes % self.port_bytes
        return self.link.read_mem(addr, padded)[:nbytes]

    def counters(self):
        """Every counter register by name (cycles, commands, engine and loader, link): the
        register map's registers from ``CYCLES`` on, in one request. A config built without
        them (``device.counters: false``) raises :class:`~moegen.errors.UserError`."""
        require_counters(self.config, "Device.counters()")
        names = list(self.registers)
        names = names[names.index("CYCLES"):]
        first = self.registers[names[0]].offset
        values = self.link.read_csr(first, len(names))
        return dict(zip(names, values, strict=True))

    def reset(self):
        """Clear ``ERROR`` and the counters; forget the uploaded experts."""
        self.write_reg("CONTROL", 3)
        self.images_end = 0
        self.experts.clear()

    def set_k(self, layer, k, top_p=None):
        """Per-layer ``K`` and ``TOP_P`` (a fraction in (0, 1], or None for no cut)."""
        r = self.config.router
        if not 1 <= k <= r.k_max:
            raise UserError(f"k must lie in 1..{r.k_max} (router.k_max), not {k}")
        self.write_reg("K", k, layer)
        one = 1 << (r.weight_width - 1)
        self.write_reg("TOP_P", (1 << (r.weight_width + 1)) - 1 if top_p is None else round(top_p * one), layer)

    # -- experts --------------------------------------------------------------------

    def upload_expert(self, image, *, expert):
        """Check an expert image against this device and write it into device memory."""
        try:
            header, _ = read_header(image, config_hash=self.config.device_hash, expert_id=expert,
                                    layout=self.config.image_layout)
        except ImageError as error:
            raise DeviceError(f"expert image for expert {expert} refused: {error}") from None
        nbytes = header.layout.nbytes
        addr = self.images_end
        if addr + align_up(nbytes, ALIGN) > self.config.memory.size_bytes:
            raise DeviceError(f"device memory is full: {len(self.experts)} expert images use {addr} of "
                              f"{self.config.memory.size_bytes} bytes; expert {expert} needs {nbytes} more")
        self.write_mem(addr, image[:nbytes])
        self.images_end = addr + align_up(nbytes, ALIGN)
        handle = ExpertHandle(addr, expert, nbytes)
        self.experts.append(handle)
        return handle

    def run_experts(self, calls, rows):
        """Run experts and accumulate on the device; returns the accumulator ``[rows, hidden]``.

        ``calls`` is a list of ``(handle, x_q, tok_mult, tok_shift, table_rows, weights)``:
        ``x_q [T, hidden]`` int8 activations with their token factors, the accumulator row
        of each token and its Q1.15 weight. ``acc[row] += weight * y`` per token.
        """
        model = self.config.model
        if not 1 <= rows <= model.max_tokens:
            raise UserError(f"rows must lie in 1..{model.max_tokens} (model.max_tokens), not {rows}")
        arena = _Arena(self.config.memory.size_bytes, self.images_end)
        writes, commands = [], [encode_command(Command.ACC_CLEAR, rows)]
        for handle, x_q, tok_mult, tok_shift, table_rows, weights in calls:
            tokens = len(x_q)
            if not 1 <= tokens <= model.max_tokens:
                raise UserError(f"an expert call has {tokens} tokens; allowed 1..{model.max_tokens}")
            table_rows = [int(r) for r in table_rows]
            if len(set(table_rows)) != tokens or not all(0 <= r < rows for r in table_rows):
                raise UserError(f"table rows must be {tokens} distinct values in 0..{rows - 1}, got {table_rows}")
            weights = [int(w) for w in weights]
            if not all(0 <= w <= WEIGHT_ONE for w in weights):
                raise UserError(f"weights must lie in 0..{WEIGHT_ONE} (Q1.15), got {weights}")
            x_addr = arena.take(4 * tokens * x_words(model.hidden))
            table_addr = arena.take(4 * tokens)
            writes += [(x_addr, activation_bytes(x_q, tok_mult, tok_shift)),
                       (table_addr, pack_table(table_rows, weights))]
            commands.append(encode_command(Command.RUN_EXPERT, handle.addr, handle.expert | tokens << 16, x_addr,
                                           table_addr))
        out = arena.take(4 * rows * model.hidden)
        commands.append(encode_command(Command.ACC_STORE, out, rows))
        for addr, data in writes:
            self.write_mem(addr, data)
        self.execute(commands)
        acc = np.frombuffer(self.read_mem(out, 4 * rows * model.hidden), "<i4").astype(np.int64)
        return torch.from_numpy(acc.reshape(rows, model.hidden))

    def run_expert(self, handle, x_q, tok_mult, tok_shift):
        """One expert on ``T`` tokens; returns ``y [T, hidden]`` (bit-exact ``expert_int``)."""
        tokens = len(x_q)
        acc = self.run_experts([(handle, x_q, tok_mult, tok_shift, range(tokens), [WEIGHT_ONE] * tokens)], tokens)
        return acc >> 15

    def route(self, logits, *, layer=0):
        """Route fixed-point ``logits [T, experts]`` with layer ``layer``'s ``K``/``TOP_P``."""
        r = self.config.router
        logits = torch.as_tensor(logits, dtype=torch.int64)
        tokens = logits.shape[0]
        if logits.ndim != 2 or logits.shape[1] != r.experts:
            raise UserError(f"logits must be [tokens, {r.experts}], got {list(logits.shape)}")
        arena = _Arena(self.config.memory.size_bytes, self.images_end)
        logits_addr = arena.take(4 * logits.numel())
        out = arena.take(4 * tokens * route_words(r.k_max))
        self.write_mem(logits_addr, words_bytes(logits.numpy()))
        self.execute([encode_command(Command.ROUTE, layer, tokens, logits_addr, out)])
        indices, weights, counts = DeviceModel.unpack_routes(self.read_mem(out, 4 * tokens * route_words(r.k_max)),
                                                             tokens, r.k_max)
        keep = np.arange(r.k_max)[None, :] < counts[:, None]
        return Routing(torch.from_numpy(np.where(keep, indices, -1)), torch.from_numpy(weights),
                       torch.from_numpy(counts))

    # -- commands -------------------------------------------------------------------

    def execute(self, commands):
        """Submit commands and a fence, wait for the fence; a failed command raises."""
        self.fence_id = self.fence_id % 0xFFFFFFFF + 1
        commands = [*commands, encode_command(Command.FENCE, self.fence_id)]
        deadline = time.monotonic() + self.wait_timeout
        for start in range(0, len(commands), QUEUE_COMMANDS):
            words = [w for command in commands[start:start + QUEUE_COMMANDS] for w in command]
            while True:
                try:
                    self.link.submit(words)
                    break
                except LinkError as error:
                    if error.status != Status.QUEUE_FULL:
                        raise
                    self._check(self._error_and_fence()[0], deadline)
                    time.sleep(1e-3)
        while True:
            error, fence = self._error_and_fence()
            self._check(error, deadline)
            if fence == self.fence_id:
                return
            time.sleep(1e-3)

    def _error_and_fence(self):
        """``ERROR`` and ``FENCE`` in one request (``CONTROL``, between them, reads 0)."""
        first = self.registers["ERROR"].offset
        values = self.link.read_csr(first, (self.registers["FENCE"].offset - first) // 4 + 1)
        return values[0], values[-1]

    def _check(self, error, deadline):
        if error:
            self.write_reg("CONTROL", 1)
            raise DeviceError(f"device refused a command: {describe_error(error)}")
        if time.monotonic() > deadline:
            raise DeviceTimeout(f"commands not done after {self.wait_timeout:.0f} s (STATUS "
                                f"0x{self.read_reg('STATUS'):08x})")


def batch_bytes(hidden, rows, calls, tokens):
    """Device memory a :meth:`Device.run_experts` batch takes above the images, at most: ``rows``
    accumulator rows and ``calls`` expert calls carrying ``tokens`` token rows in all (each
    call's activations and table, and the accumulator's result, each ``ALIGN``-aligned)."""
    return 4 * tokens * (x_words(hidden) + 1) + 2 * calls * ALIGN + align_up(4 * rows * hidden, ALIGN)


def route_bytes(experts, k_max, rows):
    """Device memory a :meth:`Device.route` of ``rows`` tokens takes above the images."""
    return align_up(4 * rows * experts, ALIGN) + align_up(4 * rows * route_words(k_max), ALIGN)


class _Arena:
    """Buffers of one batch, from the top of device memory down to the images."""

    def __init__(self, top, floor):
        self.top = top
        self.floor = floor

    def take(self, nbytes):
        self.top -= align_up(nbytes, ALIGN)
        if self.top < self.floor:
            raise DeviceError(f"device memory is full: a batch needs buffers above the {self.floor} bytes of "
                              f"expert images")
        return self.top


def require_counters(config, reader):
    """Raises :class:`~moegen.errors.UserError` unless ``config`` builds the counter registers
    that ``reader`` (a command, a benchmark) reads: before it runs, not when it reads them."""
    if not config.device.counters:
        raise UserError(f"config {config.name!r} has no counter registers (device.counters: false), which "
                        f"{reader} reads; use a config with device.counters: true")


# -- transports ---------------------------------------------------------------------


def model_link(config, **_):
    """A DeviceModel behind a LinkModel, in process."""
    device = DeviceModel(config)
    by_word = {}
    for reg in register_map(config):
        for i in range(reg.count):
            by_word[reg.offset + 4 * i] = (reg, i)
    live = {"K": lambda i: device.k[i], "TOP_P": lambda i: device.top_p[i], "ERROR": lambda i: device.error,
            "FENCE": lambda i: device.fence, "COMMANDS": lambda i: device.commands,
            "ROUTED_TOKENS": lambda i: device.routed_tokens, "STATUS": lambda i: int(device.error != 0) << 1}

    def csr_read(addr):
        reg, i = by_word[addr]
        if reg.name in live:
            return live[reg.name](i) & 0xFFFFFFFF
        return reg.reset if reg.constant else 0

    def csr_write(addr, value):
        reg, i = by_word[addr]
        if reg.name == "K":
            device.k[i] = value
        elif reg.name == "TOP_P":
            device.top_p[i] = value
        elif reg.name == "CONTROL" and value & 1:
            device.clear_error()

    def submit(words):
        device.submit(words)
        return True

    model = LinkModel(csr_read=csr_read, csr_write=csr_write, csr_mapped=lambda addr: addr in by_word,
                      mem=device.mem, submit=submit, max_payload=config.link.max_payload,
                      mem_word=config.memory.port_width // 8)
    return ModelTransport(model), None


def _sim_link(config, *, address=None, **kwargs):
    if address is not None:
        return SocketTransport(str(address)), None
    from .sim import launch

    harness = launch(config, **kwargs)
    return SocketTransport(str(harness.socket)), harness


def _serial_link(config, *, address=None, **_):
    if address is None:
        raise UserError("the serial transport needs the port (address=/dev/ttyUSB0 or similar)")
    return SerialTransport(address, baud=config.link.baud), None


DEVICES = {"sim": _sim_link, "serial": _serial_link, "model": model_link}


def open_device(config, transport="sim", *, timeout=1.0, retries=8, wait_timeout=60.0, **kwargs):
    """A connected :class:`Device` over a transport named in :data:`DEVICES`."""
    if transport not in DEVICES:
        raise UserError(f"unknown device transport {transport!r}; known: {', '.join(DEVICES)}")
    raw, owner = DEVICES[transport](config, **kwargs)
    link = LinkClient(raw, max_payload=config.link.max_payload, timeout=timeout, retries=retries)
    device = Device(config, link, owner=owner, wait_timeout=wait_timeout)
    try:
        return device.connect()
    except BaseException:
        device.close()
        raise

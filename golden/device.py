"""The accelerator's commands, and an executable model of what they do to device memory.

``docs/device.md`` describes the commands; :class:`DeviceModel` is their definition: given
the same memory contents, registers and command words, the RTL top
(:class:`moegen.rtl.top.Accelerator`) leaves the same bytes in memory, the same accumulator
values and the same ``ERROR``/``FENCE`` values. The model runs commands at once (it has no
cycles); the host driver can use it as a device (``moegen.host.Device`` transport
``model``), which is how the offload plugin is tested without a simulator.

Every command is :data:`COMMAND_WORDS` little-endian 32-bit words; word 0 is the
:class:`Command`. Memory addresses are byte addresses aligned to :data:`ALIGN`. A failing
command sets ``ERROR = source << 8 | code`` (:class:`ErrorSource`, :class:`CommandError` or
:class:`~moegen.golden.image.ImageErrorCode`) and the device discards commands until the host
clears the error.
"""

import enum

import numpy as np
import torch

from .expert import expert_int
from .image import ImageError, read_image
from .router import route

__all__ = [
    "ALIGN",
    "COMMAND_WORDS",
    "QUEUE_COMMANDS",
    "WEIGHT_ONE",
    "Command",
    "CommandError",
    "DeviceModel",
    "ErrorSource",
    "activation_bytes",
    "encode_command",
    "pack_table",
    "route_words",
    "words_bytes",
    "wrap_int32",
    "x_words",
]

COMMAND_WORDS = 8
#: Commands the device's queue holds (a SUBMIT of more answers QUEUE_FULL).
QUEUE_COMMANDS = 8
ALIGN = 64
#: Q1.15 accumulation weight of 1.0 (``RUN_EXPERT`` table words: ``row | weight << 16``).
WEIGHT_ONE = 1 << 15


class Command(enum.IntEnum):
    NOP = 0
    ROUTE = 1  # layer, tokens, logits addr, out addr
    RUN_EXPERT = 2  # image addr, expert | tokens << 16, x addr, table addr
    ACC_CLEAR = 3  # rows
    ACC_STORE = 4  # out addr, rows
    FENCE = 5  # id


class ErrorSource(enum.IntEnum):
    COMMAND = 1
    LOADER = 2


class CommandError(enum.IntEnum):
    BAD_OPCODE = 1
    BAD_ADDRESS = 2  # misaligned, or the buffer does not lie inside device memory
    BAD_COUNT = 3  # tokens or rows of 0 or above the limit
    BAD_ROW = 4  # a RUN_EXPERT table row at or above max_tokens
    BAD_LAYER = 5


def encode_command(command, *args):
    """The :data:`COMMAND_WORDS` words of a command (missing arguments are 0)."""
    if len(args) > COMMAND_WORDS - 1:
        raise ValueError(f"a command has at most {COMMAND_WORDS - 1} arguments, got {len(args)}")
    words = [int(command), *map(int, args)]
    for i, word in enumerate(words):
        if not 0 <= word < 1 << 32:
            raise ValueError(f"command word {i} must lie in 0..2**32-1, not {word}")
    return words + [0] * (COMMAND_WORDS - len(words))


def words_bytes(words):
    """Little-endian bytes of 32-bit words (negative values wrap), as device memory holds them."""
    return (np.asarray(words, dtype=np.int64) & 0xFFFFFFFF).astype("<u4").tobytes()


def activation_bytes(x_q, tok_mult, tok_shift):
    """A ``RUN_EXPERT`` activation buffer: per token the factor word ``tok_mult | tok_shift << 16``,
    then ``x_q``'s int8 values four to a word (value ``4w + b`` in byte ``b``, zero padded)."""
    x_q = np.asarray(x_q, dtype=np.int64)
    tokens, hidden = x_q.shape
    values = np.zeros((tokens, 4 * -(-hidden // 4)), dtype=np.int8)
    values[:, :hidden] = x_q
    factors = np.asarray(tok_mult, dtype=np.int64) | np.asarray(tok_shift, dtype=np.int64) << 16
    words = values.view("<u4").astype(np.int64)
    return words_bytes(np.concatenate([factors[:, None], words], axis=1))


def wrap_int32(values):
    """Integers wrapped to int32 (two's complement), as the accumulator holds them."""
    return (values + (1 << 31)) % (1 << 32) - (1 << 31)


def x_words(hidden):
    """32-bit words per token of a ``RUN_EXPERT`` activation buffer (factor + values)."""
    return 1 + -(-hidden // 4)


def route_words(k_max):
    """32-bit words per token of a ``ROUTE`` output (count + ``k_max`` slots)."""
    return 1 + k_max


class _Failed(Exception):
    def __init__(self, source, code):
        self.value = int(source) << 8 | int(code)


class DeviceModel:
    """Device memory, per-layer registers, the accumulator, and the command queue's effect.

    Members
    -------
    mem : bytearray
        Device memory (``config.memory.size_bytes``).
    k, top_p : list of int
        The per-layer ``K`` and ``TOP_P`` registers.
    acc : numpy int64 array ``[max_tokens, hidden]``
        The accumulator, kept in int32 range (wrapping).
    error, fence, commands, routed_tokens : int
        The ``ERROR``, ``FENCE``, ``COMMANDS`` and ``ROUTED_TOKENS`` registers.
    """

    def __init__(self, config):
        self.config = config
        r, model = config.router, config.model
        self.mem = bytearray(config.memory.size_bytes)
        self.k = [r.k_max] * model.layers
        self.top_p = [(1 << (r.weight_width + 1)) - 1] * model.layers
        self.acc = np.zeros((model.max_tokens, model.hidden), dtype=np.int64)
        self.error = self.fence = self.commands = self.routed_tokens = 0
        self.port_bytes = config.memory.port_width // 8

    def submit(self, words):
        """Run whole commands (a multiple of :data:`COMMAND_WORDS` words) in order."""
        if len(words) % COMMAND_WORDS:
            raise ValueError(f"commands are {COMMAND_WORDS} words each, got {len(words)} words")
        for i in range(0, len(words), COMMAND_WORDS):
            if self.error:
                continue
            try:
                self._execute(words[i : i + COMMAND_WORDS])
                self.commands += 1
            except _Failed as failure:
                self.error = failure.value

    def clear_error(self):
        self.error = 0

    # -- helpers ----------------------------------------------------------------------

    def _buffer(self, addr, nbytes):
        if addr % ALIGN or addr + nbytes > len(self.mem):
            raise _Failed(ErrorSource.COMMAND, CommandError.BAD_ADDRESS)
        return addr

    def _count(self, value, limit):
        if not 1 <= value <= limit:
            raise _Failed(ErrorSource.COMMAND, CommandError.BAD_COUNT)
        return value

    def _padded(self, nbytes):
        return -(-nbytes // self.port_bytes) * self.port_bytes

    def _store_words(self, addr, words):
        data = words_bytes(words)
        data += bytes(self._padded(len(data)) - len(data))
        self.mem[addr : addr + len(data)] = data

    def _words(self, addr, count):
        return np.frombuffer(bytes(self.mem[addr : addr + 4 * count]), "<u4").astype(np.int64)

    # -- commands ---------------------------------------------------------------------

    def _execute(self, words):
        op = words[0]
        if op == Command.NOP:
            return
        if op == Command.ROUTE:
            self._route(*words[1:5])
        elif op == Command.RUN_EXPERT:
            self._run_expert(*words[1:5])
        elif op == Command.ACC_CLEAR:
            rows = self._count(words[1], self.config.model.max_tokens)
            self.acc[:rows] = 0
        elif op == Command.ACC_STORE:
            rows = self._count(words[2], self.config.model.max_tokens)
            addr = self._buffer(words[1], self._padded(4 * rows * self.config.model.hidden))
            self._store_words(addr, self.acc[:rows].reshape(-1))
        elif op == Command.FENCE:
            self.fence = words[1]
        else:
            raise _Failed(ErrorSource.COMMAND, CommandError.BAD_OPCODE)

    def _route(self, layer, tokens, logits_addr, out_addr):
        r = self.config.router
        if layer >= self.config.model.layers:
            raise _Failed(ErrorSource.COMMAND, CommandError.BAD_LAYER)
        tokens = self._count(tokens, 0xFFFF)
        self._buffer(logits_addr, 4 * tokens * r.experts)
        self._buffer(out_addr, self._padded(4 * tokens * route_words(r.k_max)))
        raw = self._words(logits_addr, tokens * r.experts).reshape(tokens, r.experts)
        low = raw & ((1 << r.logit_width) - 1)
        logits = np.where(low >> (r.logit_width - 1), low - (1 << r.logit_width), low)
        k = min(max(self.k[layer], 1), r.k_max)
        top_p = self.top_p[layer] if self.top_p[layer] < 1 << r.weight_width else None
        routing = route(torch.from_numpy(logits), k=k, mode=r.mode, logit_frac=r.logit_frac,
                        weight_width=r.weight_width, top_p=top_p)
        out = np.zeros((tokens, route_words(r.k_max)), dtype=np.int64)
        out[:, 0] = routing.count.numpy()
        keep = routing.indices.numpy() >= 0
        slots = np.where(keep, routing.indices.numpy() | routing.weights.numpy() << 8, 0)
        out[:, 1 : 1 + k] = slots
        self._store_words(out_addr, out.reshape(-1))
        self.routed_tokens += tokens

    def _run_expert(self, image_addr, expert_tokens, x_addr, table_addr):
        config = self.config
        model = config.model
        expert, tokens = expert_tokens & 0xFFFF, expert_tokens >> 16
        tokens = self._count(tokens, model.max_tokens)
        self._buffer(image_addr, 0)
        self._buffer(x_addr, 4 * tokens * x_words(model.hidden))
        self._buffer(table_addr, 4 * tokens)
        table = self._words(table_addr, tokens)
        rows, weights = table & 0xFFFF, table >> 16
        if (rows >= model.max_tokens).any():
            raise _Failed(ErrorSource.COMMAND, CommandError.BAD_ROW)
        layout = config.image_layout
        try:
            _, qe = read_image(self.mem[image_addr : image_addr + layout.nbytes], config_hash=config.device_hash,
                               expert_id=expert, layout=layout)
        except ImageError as error:
            raise _Failed(ErrorSource.LOADER, error.code) from None
        x = self._words(x_addr, tokens * x_words(model.hidden)).reshape(tokens, -1)
        tok_mult, tok_shift = x[:, 0] & 0xFFFF, x[:, 0] >> 16
        values = x[:, 1:].astype("<u4").view(np.int8).reshape(tokens, -1)[:, : model.hidden]
        y = expert_int(torch.from_numpy(values.astype(np.int64)), torch.from_numpy(tok_mult),
                       torch.from_numpy(tok_shift), qe).numpy()
        for t in range(tokens):
            self.acc[rows[t]] = wrap_int32(self.acc[rows[t]] + weights[t] * y[t])

    @staticmethod
    def unpack_routes(data, tokens, k_max):
        """Decode a ``ROUTE`` output buffer: ``(indices, weights, counts)`` int64 arrays."""
        words = np.frombuffer(bytes(data[: 4 * tokens * route_words(k_max)]), "<u4").astype(np.int64)
        words = words.reshape(tokens, route_words(k_max))
        return words[:, 1:] & 0xFF, words[:, 1:] >> 8, words[:, 0]


def pack_table(rows, weights):
    """``RUN_EXPERT`` table bytes: ``row | weight << 16`` per token (weights Q1.15)."""
    rows, weights = np.asarray(list(rows), dtype=np.int64), np.asarray(list(weights), dtype=np.int64)
    if rows.shape != weights.shape:
        raise ValueError(f"{len(rows)} rows but {len(weights)} weights")
    return words_bytes(rows | weights << 16)

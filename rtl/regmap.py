"""The accelerator's register map, kept as data, and the register file built from it.

:func:`register_map` lists every register of a config's accelerator: name, byte offset,
access, reset value, count (arrays such as per-layer ``K``) and documentation. Everything
else is generated from that list: the :class:`RegisterFile` hardware, the JSON map and the
C header ``moegen_regs.h`` (:mod:`moegen.generate`), and the host driver's constants.

The CSR bus (:func:`csr_bus_signature`, from the initiator's side) is word-addressed:
``addr`` is a byte offset divided by 4. A read strobe ``r_stb`` returns ``r_data`` in the
next cycle (the register's value in that cycle: the address is registered, the value is
not); a write strobe ``w_stb`` writes ``w_data`` in the same cycle. ``mapped`` tells,
combinationally, whether ``addr`` names a register; the link answers ``BAD_ADDRESS`` for an
unmapped one and never touches it (a read of one returns an unspecified value).

Access kinds:

* ``ro``: read-only; the value comes from the hardware (a constant, a status, a counter);
* ``rw``: read-write storage with a reset value, driving the hardware;
* ``wo``: write-only pulses (``CONTROL``): a write asserts the written bits for one cycle;
  reads return 0.
"""

import json
from dataclasses import dataclass

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ID_VALUE", "MAP_VERSION", "Register", "RegisterFile", "c_header", "csr_bus_signature", "map_json",
           "register_map"]

ID_VALUE = 0x4D4F4547  # "MOEG" read as a big-endian word
MAP_VERSION = (1, 0)  # (major, minor): a major change breaks drivers
CSR_ADDR_WIDTH = 10  # 1024 words


def csr_bus_signature(addr_width=CSR_ADDR_WIDTH):
    """The CSR bus, from the initiator's (the link's) side."""
    return wiring.Signature({
        "addr": Out(addr_width),
        "r_stb": Out(1),
        "r_data": In(32),
        "w_stb": Out(1),
        "w_data": Out(32),
        "mapped": In(1),
    })


@dataclass(frozen=True)
class Register:
    """One register (or an array of ``count`` consecutive ones).

    Members
    -------
    name : str
        Upper-case identifier; the C header prefixes it with ``MOEGEN_REG_``.
    offset : int
        Byte offset of the first element.
    access : str
        ``ro``, ``rw`` or ``wo``.
    doc : str
        One line: what it holds, with units and bit fields.
    count : int
        Elements of an array register (element ``i`` at ``offset + 4*i``).
    reset : int
        Reset value of ``rw`` registers; the constant value of constant ``ro`` registers.
    constant : bool
        ``ro`` and fixed by the config (IDs, geometry).
    """

    name: str
    offset: int
    access: str
    doc: str
    count: int = 1
    reset: int = 0
    constant: bool = False


def register_map(config):
    """Every register of ``config``'s accelerator, in address order."""
    r, a, model, memory = config.router, config.array, config.model, config.memory
    top_p_off = (1 << r.weight_width) + (1 << r.weight_width) - 1  # never cuts (see TopKRouter.top_p)
    entries = [
        # identity and geometry: constants of the config
        ("ID", "ro", "0x4D4F4547, 'MOEG'", 1, ID_VALUE, True),
        ("VERSION", "ro", "register map version: major << 16 | minor", 1, MAP_VERSION[0] << 16 | MAP_VERSION[1], True),
        ("CONFIG_HASH", "ro", "first 32 bits of the config's sha256", 1, config.device_hash, True),
        ("ROUTER_GEOMETRY", "ro", "experts | k_max << 16 | lanes << 24 (lanes - 1 if 256 lanes)", 1,
         r.experts | r.k_max << 16 | (r.lanes - 1 if r.lanes == 256 else r.lanes) << 24, True),
        ("ARRAY_GEOMETRY", "ro", "rows | cols << 8 | m << 16 | n << 24", 1,
         a.rows | a.cols << 8 | a.m << 16 | a.n << 24, True),
        ("MODEL_GEOMETRY", "ro", "hidden | ffn << 16", 1, model.hidden | model.ffn << 16, True),
        ("LIMITS", "ro", "max_tokens | layers << 16 | memory word bytes << 24", 1,
         model.max_tokens | model.layers << 16 | (memory.port_width // 8 % 256) << 24, True),
        ("MEM_BYTES", "ro", "device memory size in bytes (0 means 2**32)", 1, memory.size_bytes % (1 << 32), True),
        ("MAX_PAYLOAD", "ro", "largest link payload in bytes", 1, config.link.max_payload, True),
        # control and status
        ("STATUS", "ro", "bit 0 busy, bit 1 error, bits 8..15 command queue words used", 1, 0, False),
        ("ERROR", "ro", "first error since the last clear: source << 8 | code (0: none)", 1, 0, False),
        ("CONTROL", "wo", "bit 0 clear ERROR, bit 1 clear counters", 1, 0, False),
        ("FENCE", "ro", "id of the last completed FENCE command", 1, 0, False),
        # per-layer routing controls
        ("K", "rw", "experts per token of each layer", model.layers, r.k_max, False),
        ("TOP_P", "rw", "top-p threshold of each layer in weight units (reset: never cut)", model.layers,
         top_p_off, False),
    ]
    if config.device.counters:
        # counters (wrap at 2**32), the last registers: a config without them (device.counters:
        # false) has the same offsets for all the others
        entries += [
            ("CYCLES", "ro", "clock cycles since reset or clear", 1, 0, False),
            ("BUSY_CYCLES", "ro", "cycles a command was running", 1, 0, False),
            ("COMMANDS", "ro", "commands completed", 1, 0, False),
            ("ROUTED_TOKENS", "ro", "tokens routed", 1, 0, False),
            ("ENGINE_BUSY", "ro", "expert engine busy cycles", 1, 0, False),
            ("ENGINE_STEPS", "ro", "array steps", 1, 0, False),
            ("STALL_WEIGHTS", "ro", "cycles the array waited for weights", 1, 0, False),
            ("STALL_ACTIVATIONS", "ro", "cycles the array waited for activations", 1, 0, False),
            ("STALL_OUTPUT", "ro", "cycles the array waited on its output", 1, 0, False),
            ("LOAD_CYCLES", "ro", "cycles with device-memory reads in flight for the loader", 1, 0, False),
            ("LOAD_BYTES", "ro", "bytes the loader read", 1, 0, False),
            ("IMAGE_ERRORS", "ro", "images refused: header << 16 | payload CRC", 1, 0, False),
            ("LINK_FRAMES", "ro", "request frames executed", 1, 0, False),
            ("LINK_DROPPED", "ro", "request frames dropped (CRC, oversize, idle timeout)", 1, 0, False),
        ]
    registers, offset = [], 0
    for name, access, doc, count, reset, constant in entries:
        registers.append(Register(name, offset, access, doc, count, reset, constant))
        offset += 4 * count
    return tuple(registers)


def map_json(config):
    """The register map as JSON text (for tools and for humans)."""
    return json.dumps({
        "config": config.name, "config_hash": f"0x{config.device_hash:08x}",
        "version": f"{MAP_VERSION[0]}.{MAP_VERSION[1]}",
        "registers": [reg.__dict__ for reg in register_map(config)],
    }, indent=2) + "\n"


class RegisterFile(wiring.Component):
    """Registers of a :func:`register_map` on a CSR bus.

    Parameters
    ----------
    registers : tuple of Register
    addr_width : int
        CSR word-address bits.

    Members
    -------
    bus : ``In(csr_bus_signature(addr_width))``
    values : dict of name -> list of Signal(32)
        ``ro`` (non-constant) registers: the hardware drives them.
    storage : dict of name -> list of Signal(32)
        ``rw`` registers: the stored values, which drive the hardware.
    pulses : dict of name -> Signal(32)
        ``wo`` registers: the bits written, for one cycle.
    """

    def __init__(self, registers, *, addr_width=CSR_ADDR_WIDTH):
        self.registers = registers
        self.addr_width = addr_width
        super().__init__({"bus": In(csr_bus_signature(addr_width))})
        self.values, self.storage, self.pulses = {}, {}, {}
        for reg in registers:
            names = [reg.name.lower() if reg.count == 1 else f"{reg.name.lower()}_{i}" for i in range(reg.count)]
            if reg.access == "rw":
                self.storage[reg.name] = [Signal(32, init=reg.reset, name=n) for n in names]
            elif reg.access == "wo":
                self.pulses[reg.name] = Signal(32, name=names[0])
            elif not reg.constant:
                self.values[reg.name] = [Signal(32, name=n) for n in names]

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        for reg in self.registers:
            if reg.access == "wo":
                m.d.sync += self.pulses[reg.name].eq(0)
        # writes and ``mapped`` decode the bus address; reads decode it registered at the strobe
        # (the read data is then a multiplexer behind a register, not behind the initiator's
        # address logic: on ECP5 that path crossed the die), and only the bits that tell the
        # registers apart: a read of an unmapped address is never made
        words = max(reg.offset // 4 + reg.count for reg in self.registers)
        read_addr = Signal(max(1, (words - 1).bit_length()))
        with m.If(bus.r_stb):
            m.d.sync += read_addr.eq(bus.addr)
        with m.Switch(bus.addr):
            for reg in self.registers:
                for i in range(reg.count):
                    with m.Case(reg.offset // 4 + i):
                        m.d.comb += bus.mapped.eq(1)
                        with m.If(bus.w_stb):
                            if reg.access == "rw":
                                m.d.sync += self.storage[reg.name][i].eq(bus.w_data)
                            elif reg.access == "wo":
                                m.d.sync += self.pulses[reg.name].eq(bus.w_data)
        with m.Switch(read_addr):
            for reg in self.registers:
                for i in range(reg.count):
                    if reg.access != "wo":
                        with m.Case(reg.offset // 4 + i):
                            if reg.access == "rw":
                                m.d.comb += bus.r_data.eq(self.storage[reg.name][i])
                            else:
                                m.d.comb += bus.r_data.eq(reg.reset if reg.constant else self.values[reg.name][i])
        return m


def c_header(config, stamp_text):
    """``moegen_regs.h``: register offsets, identity, geometry, commands and error codes of
    ``config``'s device, for firmware (``stamp_text``: the artifact stamp, C comments)."""
    from ..golden.device import (
        ALIGN,
        COMMAND_WORDS,
        QUEUE_COMMANDS,
        WEIGHT_ONE,
        Command,
        CommandError,
        ErrorSource,
        route_words,
        x_words,
    )
    from ..golden.image import ImageErrorCode

    r, model = config.router, config.model
    lines = [stamp_text.rstrip("\n"), "#ifndef MOEGEN_REGS_H", "#define MOEGEN_REGS_H", ""]

    def define(name, value, doc=""):
        lines.append(f"#define {name} {value}{f' /* {doc} */' if doc else ''}")

    define("MOEGEN_ID_VALUE", f"0x{ID_VALUE:08X}u", "ID register: 'MOEG'")
    define("MOEGEN_MAP_VERSION", f"0x{MAP_VERSION[0] << 16 | MAP_VERSION[1]:08X}u", "VERSION: major << 16 | minor")
    define("MOEGEN_CONFIG_HASH", f"0x{config.device_hash:08X}u", f"config {config.name}, sha256 {config.hash[:16]}...")
    lines.append("")
    for reg in register_map(config):
        define(f"MOEGEN_REG_{reg.name}", f"0x{reg.offset:03X}u", f"{reg.access}: {reg.doc}")
        if reg.count > 1:
            define(f"MOEGEN_REG_{reg.name}_COUNT", reg.count)
    lines.append("")
    geometry = {"EXPERTS": r.experts, "K_MAX": r.k_max, "LOGIT_WIDTH": r.logit_width, "WEIGHT_WIDTH": r.weight_width,
                "HIDDEN": model.hidden, "FFN": model.ffn, "MAX_TOKENS": model.max_tokens, "LAYERS": model.layers,
                "MEM_BYTES": f"{config.memory.size_bytes}u", "MEM_WORD_BYTES": config.memory.port_width // 8,
                "MAX_PAYLOAD": config.link.max_payload, "IMAGE_BYTES": config.image_layout.nbytes,
                "ALIGN": ALIGN, "COMMAND_WORDS": COMMAND_WORDS, "QUEUE_COMMANDS": QUEUE_COMMANDS,
                "WEIGHT_ONE": WEIGHT_ONE, "COUNTERS": int(config.device.counters),
                "X_WORDS_PER_TOKEN": x_words(model.hidden), "ROUTE_WORDS_PER_TOKEN": route_words(r.k_max)}
    for name, value in geometry.items():
        define(f"MOEGEN_{name}", value)
    for title, enum in (("CMD", Command), ("ERRSRC", ErrorSource), ("CMDERR", CommandError),
                        ("IMGERR", ImageErrorCode)):
        lines.append("")
        for member in enum:
            define(f"MOEGEN_{title}_{member.name}", int(member))
    lines += ["", "#endif", ""]
    return "\n".join(lines)

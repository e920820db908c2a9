"""AccelConfig: the single source of truth for the hardware, the golden model and the host.

A frozen dataclass of frozen sections, loaded from YAML. Every field is type- and
range-checked when a section is built, cross-field rules run when the whole config is
built, and every error is a :class:`~moegen.errors.ConfigError` naming the file, the key
path, the value and what is allowed. Missing keys take the defaults below, which are the
``default`` preset.

The config hash is the sha256 of the canonical JSON form (every resolved value except the
``name`` label, sorted keys, no whitespace); its first 32 bits are the device hash the
accelerator reports in its ID register and the images carry.
"""

import difflib
import hashlib
import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path

import yaml

from .boards import BOARDS
from .errors import ConfigError
from .golden.formats import ROUTER_MODES, ImageLayout

__all__ = [
    "PRESETS",
    "AccelConfig",
    "ArrayConfig",
    "DeviceConfig",
    "LinkConfig",
    "LoaderConfig",
    "MemoryConfig",
    "ModelConfig",
    "RouterConfig",
    "TargetConfig",
    "load_config",
]

SCHEMA = 4
PRESETS = ("default", "tiny", "ulx3s-85f", "icebreaker")
_POW2_8_TO_512 = (8, 16, 32, 64, 128, 256, 512)


def param(default, *, lo=None, hi=None, choices=None, multiple_of=None, pattern=None, doc):
    """A config field: its default, allowed range, choices or pattern, and a one-line description."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "multiple_of": multiple_of,
                                            "pattern": pattern, "doc": doc})


def _allowed(meta):
    if meta["choices"] is not None:  # booleans as YAML writes them
        return "one of " + ", ".join(str(c).lower() if type(c) is bool else str(c) for c in meta["choices"])
    if meta["pattern"] is not None:
        return f"text matching {meta['pattern']}"
    parts = [f"{meta['lo']}..{meta['hi']}"]
    if meta["multiple_of"]:
        parts.append(f"a multiple of {meta['multiple_of']}")
    return ", ".join(parts)


def _describe(value):
    return f"{value!r} ({type(value).__name__})"


def _check_field(f, value):
    """The value, normalized to the field's type; raises ConfigError(path=(name,))."""
    meta, kind = f.metadata, f.type
    if kind is int:
        ok = type(value) is int
    elif kind is float:
        ok = type(value) in (int, float)
        value = float(value) if ok else value
    else:
        ok = type(value) is kind
    if not ok:
        raise ConfigError(f"expected {kind.__name__}, got {_describe(value)}; allowed {_allowed(meta)}", path=(f.name,))
    if meta["choices"] is not None:
        bad = value not in meta["choices"]
    elif meta["pattern"] is not None:
        bad = not re.fullmatch(meta["pattern"], value)
    else:
        bad = not meta["lo"] <= value <= meta["hi"] or (meta["multiple_of"] and value % meta["multiple_of"])
    if bad:
        raise ConfigError(f"{value!r} is not allowed; allowed {_allowed(meta)}", path=(f.name,))
    return value


class _Section:
    """Validation shared by every section: field checks, then the section's own rules."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(f.type):
                if not isinstance(value, f.type):
                    raise ConfigError(f"expected a {f.name} section, got {_describe(value)}", path=(f.name,))
                continue
            object.__setattr__(self, f.name, _check_field(f, value))
        self._rules()

    def _rules(self):
        """Cross-field rules of the section; raise ConfigError with the offending key."""


@dataclass(frozen=True)
class RouterConfig(_Section):
    experts: int = param(8, lo=2, hi=256, doc="routed experts E")
    k_max: int = param(2, lo=1, hi=8, doc="largest per-layer k the router supports")
    lanes: int = param(8, lo=1, hi=256, doc="logits accepted per cycle P (a token takes ceil(E/P) cycles)")
    logit_width: int = param(16, lo=4, hi=32, doc="bits of a signed fixed-point logit")
    logit_frac: int = param(8, lo=0, hi=31, doc="fractional bits of a logit")
    weight_width: int = param(16, lo=4, hi=24, doc="bits of an unsigned routing weight (weight_width-1 fractional)")
    mode: str = param("softmax_topk_renorm", choices=ROUTER_MODES, doc="normalization (see moegen.golden.router)")

    def _rules(self):
        if self.k_max > self.experts:
            raise ConfigError(f"{self.k_max} exceeds router.experts ({self.experts}); allowed 1..{self.experts}",
                              path=("k_max",))
        if self.lanes > self.experts:
            raise ConfigError(f"{self.lanes} exceeds router.experts ({self.experts}); allowed 1..{self.experts}",
                              path=("lanes",))
        if self.logit_frac >= self.logit_width:
            raise ConfigError(f"{self.logit_frac} must be below logit_width ({self.logit_width})", path=("logit_frac",))


@dataclass(frozen=True)
class ArrayConfig(_Section):
    rows: int = param(8, lo=1, hi=64, doc="token lanes R")
    cols: int = param(8, lo=1, hi=64, doc="output-channel lanes C")
    m: int = param(2, lo=1, hi=16, doc="nonzeros kept per group (m <= n; m == n is dense)")
    n: int = param(4, choices=(1, 2, 4, 8, 16), doc="group size along the reduction axis (a power of two)")
    act_width: int = param(8, lo=2, hi=8, doc="bits of a signed activation")
    weight_width: int = param(8, lo=2, hi=8, doc="bits of a signed weight")
    acc_width: int = param(32, lo=8, hi=32, doc="bits of a signed accumulator")

    def _rules(self):
        if self.m > self.n:
            raise ConfigError(f"{self.m} exceeds array.n ({self.n}); allowed 1..{self.n}", path=("m",))


@dataclass(frozen=True)
class LoaderConfig(_Section):
    banks: int = param(2, lo=2, hi=8, doc="on-chip weight banks (>= 2 for double buffering)")
    bank_bytes: int = param(8192, lo=64, hi=1 << 24, multiple_of=64, doc="bytes per bank; holds at least one tile")


@dataclass(frozen=True)
class MemoryConfig(_Section):
    port_width: int = param(64, choices=_POW2_8_TO_512, doc="device-memory read port in bits")
    burst_len: int = param(16, lo=1, hi=256, doc="beats per burst")
    outstanding: int = param(2, lo=1, hi=16, doc="bursts in flight")
    size_bytes: int = param(1 << 21, lo=4096, hi=1 << 32, multiple_of=64, doc="device memory size")
    latency: int = param(16, lo=0, hi=1024, doc="read latency in cycles of the simulation memory model")


@dataclass(frozen=True)
class ModelConfig(_Section):
    hidden: int = param(128, lo=1, hi=65535, doc="model width H (expert input and output)")
    ffn: int = param(256, lo=1, hi=65535, doc="expert intermediate width I")
    max_tokens: int = param(64, lo=1, hi=65535, doc="tokens per expert run")
    layers: int = param(4, lo=1, hi=256, doc="MoE layers (per-layer k registers)")


@dataclass(frozen=True)
class LinkConfig(_Section):
    max_payload: int = param(1024, lo=64, hi=4096, multiple_of=64, doc="largest request or response payload in bytes")
    idle_timeout: int = param(1 << 20, lo=1 << 10, hi=1 << 30,
                              doc="cycles of silence inside a frame before the device drops it")
    baud: int = param(3_000_000, lo=9600, hi=100_000_000, doc="UART bit rate on boards")


@dataclass(frozen=True)
class TargetConfig(_Section):
    board: str = param("ulx3s-85f", choices=tuple(BOARDS), doc="board the config is built for")
    clock_mhz: float = param(100.0, lo=1.0, hi=1000.0, doc="target clock")


@dataclass(frozen=True)
class DeviceConfig(_Section):
    counters: bool = param(True, choices=(True, False),
                           doc="the counter registers CYCLES..LINK_DROPPED; false leaves them out of the "
                               "register map and the hardware (1,487 UP5K logic cells at commit 72963d4)")
    pipeline: bool = param(True, choices=(True, False),
                           doc="register slices between the array, the epilogue and the command processor "
                               "and a register after the epilogue's activation read, for the clock (three "
                               "cycles more per expert run); false leaves them out (100 UP5K logic cells)")


def _required_acc_bits(act_width, weight_width, products):
    """Signed bits that hold any sum of ``products`` symmetric act x weight products."""
    largest = ((1 << (act_width - 1)) - 1) * ((1 << (weight_width - 1)) - 1) * products
    return largest.bit_length() + 1


@dataclass(frozen=True)
class AccelConfig(_Section):
    name: str = param("default", pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", doc="label; not part of the hash")
    router: RouterConfig = field(default_factory=RouterConfig)
    array: ArrayConfig = field(default_factory=ArrayConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def _rules(self):
        lay = self.image_layout
        gate, _, down = lay.matrices
        tile = max(gate.tile_stride, down.tile_stride)
        if self.loader.bank_bytes < tile:
            raise ConfigError(
                f"{self.loader.bank_bytes} bytes cannot hold one weight tile of {tile} bytes "
                f"(cols {self.array.cols}, {self.array.m}:{self.array.n}, "
                f"reduction {max(self.model.hidden, self.model.ffn)}); allowed >= {tile}",
                path=("loader", "bank_bytes"),
            )
        if self.memory.size_bytes < lay.nbytes:
            raise ConfigError(f"{self.memory.size_bytes} bytes cannot hold one expert image of {lay.nbytes} bytes; "
                              f"allowed >= {lay.nbytes}", path=("memory", "size_bytes"))
        a = self.array
        products = max(gate.groups, down.groups) * a.m
        need = _required_acc_bits(a.act_width, a.weight_width, products)
        if a.acc_width < need:
            raise ConfigError(f"{a.acc_width} bits can overflow: {products} products of {a.act_width}x{a.weight_width} "
                              f"bits need {need}; allowed {need}..32", path=("array", "acc_width"))

    @property
    def image_layout(self):
        """Layout of one expert image for this config."""
        return ImageLayout(self.model.hidden, self.model.ffn, self.array.cols, self.array.m, self.array.n,
                           self.array.weight_width, self.array.act_width)

    def canonical(self):
        """The hashed form: every resolved value except ``name``, plus the schema version."""
        data = asdict(self)
        del data["name"]
        data["schema"] = SCHEMA
        return data

    @property
    def hash(self):
        """sha256 (hex) of the canonical JSON form."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def device_hash(self):
        """First 32 bits of :attr:`hash`: what the device reports and images carry."""
        return int(self.hash[:8], 16)

    def to_dict(self):
        return asdict(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data, *, source=None):
        """Build from a mapping (as read from YAML); errors carry ``source`` and the key path."""
        try:
            return _build(cls, data, ())
        except ConfigError as error:
            raise error.within(source=source) from None


def _build(cls, data, path):
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys, got {_describe(data)}", path=path)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown key {key!r}; {hint}known keys: {', '.join(known)}", path=(*path, str(key)))
    kwargs = {}
    for name, f in known.items():
        if name in data:
            value = data[name]
            kwargs[name] = _build(f.type, value, (*path, name)) if is_dataclass(f.type) else value
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError("missing required key", path=(*path, name))
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.within(*path) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _preset_path(name):
    return Path(str(resources.files("moegen.configs").joinpath(f"{name}.yaml")))


def load_config(source):
    """Load a config from a YAML file path or a preset name (:data:`PRESETS`)."""
    path = _preset_path(source) if source in PRESETS else Path(source)
    where = str(source)
    if not path.is_file():
        raise ConfigError(f"no such config file (presets: {', '.join(PRESETS)})", source=where)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read: {error}", source=where) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"not valid YAML{at}: {problem}", source=where) from None
    if data is None:
        raise ConfigError("file is empty; expected a mapping with sections "
                          + ", ".join(f.name for f in fields(AccelConfig)), source=where)
    return AccelConfig.from_dict(data, source=where)

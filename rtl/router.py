"""Top-k expert router: one token per ``ceil(experts / lanes)`` cycles, bit-exact with
:func:`moegen.golden.router.route`.

Structure (every stage advances in lockstep with the output, see :class:`TopKRouter`):

* **selection**: each beat's ``lanes`` keys go through a pipelined top-k merge tree (bitonic
  top-k: sorted lists are merged pairwise by a max half-cleaner and a bitonic merger, keeping
  ``k_max``), and an accumulator merges each beat's list into the token's list, one beat per
  cycle. Keys carry the expert index in their low bits, inverted, so one unsigned comparison
  orders by key and breaks ties to the lower index.
* **normalization**: exps of the selected logits (the top-1 exp is exactly ``2**16``), a
  masked sum of the first ``k``, an exact pipelined reciprocal ``floor(2**40 / S)``
  (restoring division, :data:`DIVIDER_BITS_PER_STAGE` quotient bits per stage), one multiply
  per weight with round-half-up, then the top-p cut. With ``k_max`` 1 in ``softmax_topk_renorm``
  the one weight is the constant 1.0: no divider, and no ``k``/``top_p`` travel along.
* ``softmax_topk`` needs the sum of all exps relative to the token's maximum, which is known
  only after the last beat: a first pass finds the maximum while the beats wait in a buffer,
  and a second pass reads them back for selection and the sum (:attr:`TopKRouter.LATENCY`
  grows by the first pass, throughput does not change).
* ``sigmoid_bias_renorm`` computes each lane's sigmoid score with a table and interpolation
  and adds the expert's bias from a runtime-written memory before selection.
"""

import itertools
import math

from amaranth import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..golden.router import (
    EXP2_TABLE,
    EXP_LUT_BITS,
    EXP_MAX_SHIFT,
    EXP_ONE_BITS,
    LOG2E_BITS,
    LOG2E_Q,
    MODES,
    RECIP_BITS,
    SIGMOID_HALF,
    SIGMOID_IN_FRAC,
    SIGMOID_TABLE,
)
from .memory import unchecked_ram
from .params import check_int, reject

__all__ = [
    "DIVIDER_BITS_PER_STAGE",
    "K_WIDTH",
    "TopKRouter",
    "bias_write_signature",
    "merge_top",
    "router_input_layout",
    "router_output_layout",
    "tree_schedule",
]

#: Bits of the runtime ``k`` port: wide enough to express any ``k`` above ``k_max`` (<= 8).
K_WIDTH = 4
#: Quotient bits the reciprocal resolves per pipeline stage (two conditional subtractions).
DIVIDER_BITS_PER_STAGE = 2
#: Adder or maximum levels between registers in the per-beat reduction trees.
REDUCE_LEVELS_PER_STAGE = 2

EXP_BITS = EXP_ONE_BITS + 1  # an exp is at most 2**16
SCORE_BITS = max(SIGMOID_TABLE).bit_length()
SIGMOID_STEP_BITS = max(b - a for a, b in itertools.pairwise(SIGMOID_TABLE)).bit_length()
SIGMOID_ENTRIES = 2 * SIGMOID_HALF  # table words 0..511 hold T[j] and T[j+1] - T[j]; T[512] is a constant
EXP_SATURATION = 4  # logits further than 2**4 below the maximum have exp 0 (y >> 8 >= 23 > 17)


def router_input_layout(lanes, logit_width):
    """Payload of the router's input: ``lanes`` signed logits and the token's ``last`` beat marker."""
    return data.StructLayout({"logits": data.ArrayLayout(signed(logit_width), lanes), "last": unsigned(1)})


def _index_width(experts):
    return max(1, (experts - 1).bit_length())


def router_output_layout(experts, k_max, weight_width):
    """Payload of the router's output: one whole token per beat.

    ``count`` pairs are valid (``k``, or fewer after a top-p cut); ``index`` and ``weight`` at
    positions ``>= count`` are zero.
    """
    return data.StructLayout({
        "index": data.ArrayLayout(unsigned(_index_width(experts)), k_max),
        "weight": data.ArrayLayout(unsigned(weight_width), k_max),
        "count": unsigned(k_max.bit_length()),
    })


def bias_write_signature(experts, bias_width):
    """Write port of the per-expert selection bias (``sigmoid_bias_renorm``): one entry per cycle."""
    return wiring.Signature({
        "en": Out(1),
        "addr": Out(_index_width(experts)),
        "data": Out(signed(bias_width)),
    })


# -- sorting networks ------------------------------------------------------------------------
#
# Written once over an ``ops`` object so that the same network is built in hardware (ops on
# Values), planned (ops on comparator depths) and modelled in Python (ops on integers).
# ``None`` is a padding element below everything; it costs no hardware.


def _maximum(ops, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return ops.maximum(a, b)


def _bitonic_merge(ops, seq):
    """Sort a bitonic sequence (length a power of two) into descending order."""
    seq = list(seq)
    stride = len(seq) // 2
    while stride:
        for i in range(len(seq)):
            if i & stride:
                continue
            a, b = seq[i], seq[i + stride]
            if a is None or b is None:
                seq[i], seq[i + stride] = (b, None) if a is None else (a, None)
            else:
                seq[i], seq[i + stride] = ops.exchange(a, b)
        stride //= 2
    return seq


def merge_top(ops, a, b, k):
    """The largest ``min(k, len(a) + len(b))`` elements of two descending lists, descending.

    Bitonic top-k merge: ``max(a[i], b[M-1-i])`` keeps the top ``M`` (a bitonic sequence),
    and a bitonic merger sorts them; ``M`` is ``k`` rounded up to a power of two.
    """
    size = min(k, len(a) + len(b))
    if not a or not b:
        return list(a or b)[:size]
    width = 1 << (size - 1).bit_length()
    a = (list(a[:width]) + [None] * width)[:width]
    b = (list(b[:width]) + [None] * width)[:width]
    cleaned = [_maximum(ops, a[i], b[width - 1 - i]) for i in range(width)]
    return _bitonic_merge(ops, cleaned)[:size]


class _DepthOps:
    """Comparator depth of each element: plans where the pipeline registers go."""

    @staticmethod
    def maximum(a, b):
        return max(a, b) + 1

    @staticmethod
    def exchange(a, b):
        depth = max(a, b) + 1
        return depth, depth


def _merge_depth(len_a, len_b, k):
    return max(merge_top(_DepthOps, [0] * len_a, [0] * len_b, k), default=0)


def _tree_levels(count, k):
    """Comparator depth of each level of the per-beat merge tree over ``count`` lanes."""
    lengths, levels = [1] * count, []
    while len(lengths) > 1:
        pairs = range(0, len(lengths) - 1, 2)
        levels.append(max(_merge_depth(lengths[i], lengths[i + 1], k) for i in pairs))
        merged = [min(k, lengths[i] + lengths[i + 1]) for i in pairs]
        lengths = merged + lengths[len(merged) * 2:]
    return levels


def tree_schedule(lanes, k_max):
    """Levels of the per-beat merge tree in each pipeline stage (a register follows each).

    Levels are packed greedily up to the comparator depth of the accumulating merge, which
    is the one loop that cannot be pipelined.
    """
    budget = max(2, _merge_depth(k_max, min(k_max, lanes), k_max))
    groups, depth = [], 0
    for level in _tree_levels(lanes, k_max):
        if groups and depth + level <= budget:
            groups[-1] += 1
            depth += level
        else:
            groups.append(1)
            depth = level
    return groups


class _ValueOps:
    """Compare-exchange on packed elements: the key is everything from bit ``key_lo`` up.
    Outputs are named wires, so that later stages share them instead of copying the logic."""

    def __init__(self, pipe, key_lo):
        self.pipe = pipe
        self.key_lo = key_lo

    def maximum(self, a, b):
        return self.pipe.wire(Mux(a[self.key_lo:] > b[self.key_lo:], a, b), "cmp_max")

    def exchange(self, a, b):
        greater = self.pipe.wire(a[self.key_lo:] > b[self.key_lo:], "cmp_gt")
        return self.pipe.wire(Mux(greater, a, b), "cmp_hi"), self.pipe.wire(Mux(greater, b, a), "cmp_lo")


def _tree_level(ops, lists, k):
    pairs = range(0, len(lists) - 1, 2)
    merged = [merge_top(ops, lists[i], lists[i + 1], k) for i in pairs]
    return merged + lists[len(merged) * 2:]


# -- lockstep pipeline helpers ---------------------------------------------------------------


class _Lockstep:
    """Registers of a pipeline whose stages all advance together when ``advance`` is high."""

    def __init__(self, m, advance):
        self.m = m
        self.advance = advance
        self.valids = []
        self._names = {}

    def _name(self, name):
        count = self._names.get(name, 0)
        self._names[name] = count + 1
        return f"{name}_{count}" if count else name

    def wire(self, value, name):
        """A combinational signal: an expression used more than once is built once."""
        value = Value.cast(value)
        if len(value) == 0:
            return value
        wire = Signal(value.shape(), name=self._name(name))
        self.m.d.comb += wire.eq(value)
        return wire

    def reg(self, value, name):
        """Data register (no reset)."""
        value = Value.cast(value)
        if len(value) == 0:
            return value
        reg = Signal(value.shape(), name=self._name(name), reset_less=True)
        with self.m.If(self.advance):
            self.m.d.sync += reg.eq(value)
        return reg

    def valid(self, value, name):
        """A stage's valid bit (reset to 0)."""
        reg = Signal(name=self._name(name))
        with self.m.If(self.advance):
            self.m.d.sync += reg.eq(value)
        self.valids.append(reg)
        return reg

    def valid_delay(self, value, stages, name):
        for _ in range(stages):
            value = self.valid(value, name)
        return value

    def delay(self, value, stages, name):
        """``value`` ``stages`` advances later: registers, or a circular memory when long."""
        value = Value.cast(value)
        if stages < 3 or len(value) == 0:
            for _ in range(stages):
                value = self.reg(value, name)
            return value
        # a memory of depth `stages` read one slot ahead of the write: the oldest entry
        name = self._name(name)
        # (a slot is never read as it is written)
        write, read = unchecked_ram(self.m, f"{name}_mem", shape=unsigned(len(value)), depth=stages)
        pointer = Signal(range(stages), name=f"{name}_ptr")
        ahead = Mux(pointer == stages - 1, 0, pointer + 1)
        self.m.d.comb += [
            write.addr.eq(pointer), write.data.eq(value), write.en.eq(self.advance),
            read.addr.eq(ahead), read.en.eq(self.advance),
        ]
        with self.m.If(self.advance):
            self.m.d.sync += pointer.eq(ahead)
        return read.data if value.shape() == unsigned(len(value)) else read.data.as_signed()


def _rom_ports(m, name, table, width, count):
    """``count`` synchronous read ports on copies of ``table``, two ports per memory."""
    ports = []
    for n in range(0, count, 2):
        mem = Memory(shape=unsigned(width), depth=len(table), init=table)
        m.submodules[f"{name}_{n // 2}"] = mem
        ports += [mem.read_port() for _ in range(min(2, count - n))]
    return ports


def _divmod_const(value, divisor, limit):
    """``(value // divisor, value % divisor)`` for ``0 <= value < limit`` by multiplication."""
    if divisor & (divisor - 1) == 0:
        bits = divisor.bit_length() - 1
        return value >> bits, value & (divisor - 1)
    shift = limit.bit_length() + divisor.bit_length()
    mult = -(-(1 << shift) // divisor)
    assert all((x * mult) >> shift == x // divisor for x in range(limit))
    quotient = ((value * mult) >> shift)[:limit.bit_length()]
    return quotient, (value - quotient * divisor)[:divisor.bit_length()]


def _signed_bits(lo, hi):
    """Bits of a signed value in ``lo..hi`` (``lo < 0 <= hi``)."""
    return max((-lo - 1).bit_length(), hi.bit_length()) + 1


class TopKRouter(wiring.Component):
    """Top-k expert router, bit-exact with :func:`moegen.golden.router.route` in every mode.

    A token is ``experts`` signed fixed-point logits arriving as ``beats = ceil(experts /
    lanes)`` beats of ``lanes`` logits (beat ``b`` lane ``j`` holds expert ``b*lanes + j``;
    lanes past the last expert are ignored). The router selects the ``k`` largest selection
    keys (the logit, or sigmoid score + bias), ties to the lower expert index, and emits them
    in that order with their weights, all in one output beat.

    Throughput and latency: fully pipelined across tokens, one input beat per cycle, so one
    token every ``beats`` cycles with no bubbles between tokens, for every ``k``. A token's
    output beat is valid :attr:`LATENCY` cycles after the cycle its last input beat was
    accepted, when the output is not stalled. Every stage advances in lockstep with the
    output: ``i.ready`` and all registers follow ``~o.valid | o.ready``.

    ``LATENCY`` = 1 (input) + 3 (sigmoid scores, ``sigmoid_bias_renorm``) + the merge tree's
    stages (:func:`tree_schedule`) + 1 (the accumulating merge, if ``beats > 1``) + 3 (exps,
    softmax modes) + 1 (sum) + ``ceil(Q / 2)`` (reciprocal; ``Q`` = 25 quotient bits in the
    softmax modes, 36 in the sigmoid mode) + 4 (product, rounding, prefix sums, output).
    ``softmax_topk`` adds its first pass, ``ceil(log2(lanes) / 2) + 1 + beats``, and its beat
    pipeline is at least ``3 + ceil(log2(lanes) / 2)`` stages (the exp sum) long. Examples:
    26 cycles for E=16, k=2, P=16 in ``softmax_topk_renorm``; 31 for DeepSeek-V3's E=256,
    k=8, P=16 in ``sigmoid_bias_renorm``.

    Output format: one beat per token carrying all ``k_max`` (index, weight) slots and the
    number that are valid. That is an AXI-Stream-style beat with ``k_max`` pair lanes, a
    keep count instead of a keep mask, and ``last`` on every beat; a one-pair-per-beat stream
    could not carry ``k`` pairs per cycle at one token per cycle.

    Runtime controls are sampled with the first beat of each token and travel with it, so
    they may change between any two tokens (per-layer ``k``) without draining the pipeline.

    Parameters
    ----------
    experts : int
        Routed experts E, 2..256.
    k_max : int
        Largest runtime ``k``, 1..min(8, experts).
    lanes : int
        Logits per input beat P, 1..experts.
    logit_width : int
        Bits of a signed logit, 4..32.
    logit_frac : int
        Fractional bits of a logit, 0..logit_width-1.
    weight_width : int
        Bits of an unsigned weight, 4..24 (``weight_width - 1`` fractional bits).
    mode : str
        One of :data:`moegen.golden.router.MODES`.
    bias_width : int
        Bits of a signed selection bias in Q0.16 units (``sigmoid_bias_renorm``), 2..24.
        Selection depends only on differences of biases, so a host subtracts a common offset.

    Members
    -------
    i : ``In(stream.Signature(router_input_layout(lanes, logit_width)))``
        Logit beats; ``last`` must be set on each token's last beat (a mismatch sets
        ``framing_error``; tokens are delimited by the beat count, never by ``last``).
    o : ``Out(stream.Signature(router_output_layout(experts, k_max, weight_width)))``
        One beat per token: ``index[i]``, ``weight[i]`` for ``i < count``, in descending key
        order, ties to the lower index; zero elsewhere. ``count`` is ``k``, or the top-p count.
    k : ``In(K_WIDTH)``
        Experts per token. 0 is taken as 1 and values above ``k_max`` as ``k_max``; either
        sets ``k_error``.
    top_p : ``In(weight_width + 1)``
        Top-p threshold in weight units (``2**(weight_width-1)`` is 1.0): only the first
        ``c`` pairs are kept, ``c`` the smallest count whose cumulative weight reaches
        ``top_p`` (at least 1, at most ``k``); values ``>= 2**weight_width`` never cut.
    bias : ``In(bias_write_signature(experts, bias_width))``
        ``sigmoid_bias_renorm`` only: writes expert ``addr``'s bias when ``en`` (``addr >=
        experts`` is ignored). Write while ``busy`` is low, between layers: a write during
        traffic reaches the tokens whose beats read it later. Biases are zero after
        configuration and kept through reset.
    k_error, framing_error : ``Out(1)``
        Sticky error flags, cleared by ``clear_errors`` (a new error in the same cycle wins).
    clear_errors : ``In(1)``
    busy : ``Out(1)``
        A token, or part of one, is inside the router.
    """

    def __init__(self, *, experts=16, k_max=2, lanes=16, logit_width=16, logit_frac=8, weight_width=16,
                 mode="softmax_topk_renorm", bias_width=18):
        self.experts = check_int(self, "experts", experts, 2, 256)
        self.k_max = check_int(self, "k_max", k_max, 1, min(8, experts))
        self.lanes = check_int(self, "lanes", lanes, 1, experts)
        self.logit_width = check_int(self, "logit_width", logit_width, 4, 32)
        self.logit_frac = check_int(self, "logit_frac", logit_frac, 0, logit_width - 1)
        self.weight_width = check_int(self, "weight_width", weight_width, 4, 24)
        if mode not in MODES:
            reject(self, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.bias_width = check_int(self, "bias_width", bias_width, 2, 24)
        self._plan()
        members = {
            "i": In(stream.Signature(router_input_layout(lanes, logit_width))),
            "o": Out(stream.Signature(router_output_layout(experts, k_max, weight_width))),
            "k": In(K_WIDTH),
            "top_p": In(weight_width + 1),
            "k_error": Out(1),
            "framing_error": Out(1),
            "clear_errors": In(1),
            "busy": Out(1),
        }
        if self.sigmoid:
            members["bias"] = In(bias_write_signature(experts, bias_width))
        super().__init__(members)

    @classmethod
    def from_config(cls, router):
        """The router of a :class:`moegen.config.RouterConfig`."""
        return cls(experts=router.experts, k_max=router.k_max, lanes=router.lanes,
                   logit_width=router.logit_width, logit_frac=router.logit_frac,
                   weight_width=router.weight_width, mode=router.mode)

    @property
    def LATENCY(self):
        """Cycles from accepting a token's last beat to its output beat (no stalls)."""
        return self._latency

    @property
    def beats(self):
        """Input beats per token, ``ceil(experts / lanes)``: the cycles per token."""
        return self._beats

    # -- planning: widths and stage counts, shared by elaboration and LATENCY ----------------

    def _plan(self):
        experts, lanes, k = self.experts, self.lanes, self.k_max
        self.sigmoid = self.mode == "sigmoid_bias_renorm"
        self.two_pass = self.mode == "softmax_topk"
        self._beats = -(-experts // lanes)
        self.index_width = _index_width(experts)
        self.lane_width = (lanes - 1).bit_length()
        self.last_lanes = experts - (self._beats - 1) * lanes  # valid lanes in the last beat
        if self.sigmoid:
            bias_lo, bias_hi = -(1 << (self.bias_width - 1)), (1 << (self.bias_width - 1)) - 1
            self.key_width = _signed_bits(bias_lo, max(SIGMOID_TABLE) + bias_hi)
            self.payload_width = SCORE_BITS
        else:
            self.key_width = self.logit_width
            self.payload_width = 0
        self.tree_groups = tree_schedule(lanes, k)
        score_stages = 3 if self.sigmoid else 0
        sort_stages = score_stages + len(self.tree_groups)
        exp_stages = 3
        self.reduce_stages = -(-math.ceil(math.log2(lanes)) // REDUCE_LEVELS_PER_STAGE) if lanes > 1 else 0
        sum_stages = exp_stages + self.reduce_stages if self.two_pass else 0
        self.beat_stages = max(sort_stages, sum_stages)
        self.sort_pad = self.beat_stages - sort_stages
        self.sum_pad = self.beat_stages - sum_stages
        accumulate = 1 if self._beats > 1 else 0

        if self.sigmoid:
            self.divisor_min = min(SIGMOID_TABLE)
            self.divisor_max = k * max(SIGMOID_TABLE)
        else:
            self.divisor_min = 1 << EXP_ONE_BITS
            self.divisor_max = (experts if self.two_pass else k) << EXP_ONE_BITS
        self.quotient_bits = ((1 << RECIP_BITS) // self.divisor_min).bit_length()
        self.divider_stages = -(-self.quotient_bits // DIVIDER_BITS_PER_STAGE)
        value_stages = 0 if self.sigmoid else exp_stages
        # values, sum, reciprocal, product, rounded weight, prefix sums, output
        back_stages = value_stages + 1 + self.divider_stages + 4

        front = 1  # the accepted beat's register
        if self.two_pass:
            # maximum tree, queue push, reader issue, then the token's beats once more
            front += self.reduce_stages + 1 + self._beats
            self.buffer_depth = self._beats + self.reduce_stages + 2
            self.queue_depth = 1 + (self.buffer_depth - 1) // self._beats
        self._latency = front + self.beat_stages + accumulate + back_stages

    # -- elaboration -------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        advance = Signal()
        m.d.comb += advance.eq(~self.o.valid | self.o.ready)
        pipe = _Lockstep(m, advance)

        rec, accept, ready, front_busy = self._front(m, pipe)
        if self.two_pass:
            rec, reader_busy = self._two_pass(m, pipe, rec, accept, ready)
            front_busy = front_busy | reader_busy
        token = self._select(m, pipe, rec)
        self._normalize(m, pipe, token)
        m.d.comb += self.busy.eq(front_busy | Cat(*pipe.valids).any())
        return m

    def _front(self, m, pipe):
        """Accept beats, count them into tokens, sample the runtime controls, check ``last``."""
        beats = self._beats
        accept = Signal()
        ready = Signal()
        m.d.comb += [self.i.ready.eq(ready), accept.eq(self.i.valid & ready)]
        if not self.two_pass:
            m.d.comb += ready.eq(pipe.advance)

        beat = Signal(range(max(2, beats)), name="in_beat")  # one bit even when it stays 0
        first = beat == 0
        final = beat == beats - 1
        k = self.k
        k_bad = (k == 0) | (k > self.k_max)
        k_clamped = Mux(k == 0, 1, Mux(k > self.k_max, self.k_max, k))[:self.k_max.bit_length()]
        # the token's controls; with k_max 1 the clamped k is always 1 and top-p never cuts
        info_new = Cat(k_clamped, self.top_p) if self.k_max > 1 else Cat()
        info = info_new
        if len(info_new):
            info_held = Signal(len(info_new), name="in_info")
            info = Mux(first, info_new, info_held)

        with m.If(accept):
            m.d.sync += beat.eq(Mux(final, 0, beat + 1))
            if len(info_new):
                with m.If(first):
                    m.d.sync += info_held.eq(info_new)
        with m.If(self.clear_errors):
            m.d.sync += [self.k_error.eq(0), self.framing_error.eq(0)]
        with m.If(accept & first & k_bad):
            m.d.sync += self.k_error.eq(1)
        with m.If(accept & (self.i.payload.last != final)):
            m.d.sync += self.framing_error.eq(1)

        rec = {
            "valid": pipe.valid(accept, "in_valid"),
            "first": pipe.reg(first, "in_first"),
            "last": pipe.reg(final, "in_last"),
            "beat": pipe.reg(beat, "in_beat_reg"),
            "info": pipe.reg(info, "in_info_reg"),
            "logits": [pipe.reg(self.i.payload.logits[j], f"in_logit{j}") for j in range(self.lanes)],
        }
        return rec, accept, ready, beat != 0

    def _lane_valid(self, last, lane):
        """Whether ``lane`` holds an expert in a beat (lanes past the last expert are padding)."""
        return Const(1) if lane < self.last_lanes else ~last

    def _two_pass(self, m, pipe, rec, accept, ready):
        """``softmax_topk``: find each token's maximum while its beats wait in a buffer, then
        replay the beats with the maximum attached."""
        beats, lanes, width = self._beats, self.lanes, self.logit_width
        depth, qdepth = self.buffer_depth, self.queue_depth

        buffer = Memory(shape=unsigned(lanes * width), depth=depth, init=[])
        m.submodules.beat_buffer = buffer
        write, read = buffer.write_port(), buffer.read_port()
        wptr = Signal(range(depth), name="buf_wptr")
        rptr = Signal(range(depth), name="buf_rptr")
        count = Signal(range(depth + 1), name="buf_count")
        m.d.comb += [
            ready.eq(pipe.advance & (count < depth)),
            write.addr.eq(wptr), write.data.eq(self.i.payload.logits.as_value()), write.en.eq(accept),
        ]
        with m.If(accept):
            m.d.sync += wptr.eq(Mux(wptr == depth - 1, 0, wptr + 1))

        # pass 1: the maximum of the token's valid lanes
        lowest = -(1 << (width - 1))
        masked = [Mux(self._lane_valid(rec["last"], j), rec["logits"][j], lowest) for j in range(lanes)]
        beat_max = _reduce(pipe, masked, lambda a, b: Mux(a > b, a, b), "max")
        valid = pipe.valid_delay(rec["valid"], self.reduce_stages, "max_valid")
        first = pipe.delay(rec["first"], self.reduce_stages, "max_first")
        last = pipe.delay(rec["last"], self.reduce_stages, "max_last")
        info = pipe.delay(rec["info"], self.reduce_stages, "max_info")
        running = Signal(signed(width), name="max_running")
        token_max = pipe.wire(Mux(first, beat_max, Mux(running > beat_max, running, beat_max)), "max_token")
        with m.If(pipe.advance & valid):
            m.d.sync += running.eq(token_max)

        queue = Memory(shape=unsigned(width + len(info)), depth=qdepth, init=[])
        m.submodules.max_queue = queue
        push_port, head = queue.write_port(), queue.read_port(domain="comb")
        qwptr = Signal(range(qdepth), name="queue_wptr")
        qrptr = Signal(range(qdepth), name="queue_rptr")
        qcount = Signal(range(qdepth + 1), name="queue_count")
        push = pipe.advance & valid & last
        m.d.comb += [push_port.addr.eq(qwptr), push_port.data.eq(Cat(token_max, info)), push_port.en.eq(push)]
        with m.If(push):
            m.d.sync += qwptr.eq(Mux(qwptr == qdepth - 1, 0, qwptr + 1))

        # pass 2: replay the beats of tokens whose maximum is known
        rbeat = Signal(range(max(2, beats)), name="replay_beat")
        issue = pipe.advance & (qcount != 0)
        rfinal = rbeat == beats - 1
        pop = issue & rfinal
        m.d.comb += [read.addr.eq(rptr), read.en.eq(pipe.advance), head.addr.eq(qrptr)]
        with m.If(issue):
            m.d.sync += [rptr.eq(Mux(rptr == depth - 1, 0, rptr + 1)), rbeat.eq(Mux(rfinal, 0, rbeat + 1))]
        with m.If(pop):
            m.d.sync += qrptr.eq(Mux(qrptr == qdepth - 1, 0, qrptr + 1))
        m.d.sync += [count.eq(count + accept - issue), qcount.eq(qcount + push - pop)]

        replay = {
            "valid": pipe.valid(issue, "replay_valid"),
            "first": pipe.reg(rbeat == 0, "replay_first"),
            "last": pipe.reg(rfinal, "replay_last"),
            "beat": pipe.reg(rbeat, "replay_beat_reg"),
            "info": pipe.reg(head.data[width:], "replay_info"),
            "max": pipe.reg(head.data[:width].as_signed(), "replay_max"),
            "logits": [read.data[j * width:(j + 1) * width].as_signed() for j in range(lanes)],
        }
        return replay, (count != 0) | (qcount != 0)

    # -- selection ---------------------------------------------------------------------------

    def _delay_rec(self, pipe, rec, stages, tag):
        """The control fields of a beat record, ``stages`` later."""
        out = {"valid": pipe.valid_delay(rec["valid"], stages, f"{tag}_valid")}
        for name in ("first", "last", "beat", "info"):
            out[name] = pipe.delay(rec[name], stages, f"{tag}_{name}")
        return out

    def _keys(self, m, pipe, rec):
        """Per-lane selection keys (and sigmoid scores) of a beat; returns them and the record
        of the stage they are in."""
        lanes = self.lanes
        if not self.sigmoid:
            return [(logit, None) for logit in rec["logits"]], rec
        rest = self.logit_frac - SIGMOID_IN_FRAC
        addrs, fracs, highs = [], [], []
        for logit in rec["logits"]:
            x = logit >> rest if rest >= 0 else logit << -rest
            inside = (x >= -SIGMOID_HALF) & (x < SIGMOID_HALF)
            high = x >= SIGMOID_HALF
            addrs.append(Mux(inside, x + SIGMOID_HALF, Mux(high, SIGMOID_ENTRIES - 1, 0))[:9])
            if rest > 0:  # the fraction below the table's grid, interpolated
                fracs.append(Mux(inside, logit[:rest], 0))
            highs.append(high)
        words = [(SIGMOID_TABLE[j] | (SIGMOID_TABLE[j + 1] - SIGMOID_TABLE[j]) << SCORE_BITS)
                 for j in range(SIGMOID_ENTRIES)]
        ports = _rom_ports(m, "sigmoid_rom", words, SCORE_BITS + SIGMOID_STEP_BITS, lanes)
        for port, addr in zip(ports, addrs, strict=True):
            m.d.comb += [port.addr.eq(addr), port.en.eq(pipe.advance)]
        stage1 = self._delay_rec(pipe, rec, 1, "score1")
        fracs = [pipe.reg(f, "score_frac") for f in fracs]
        highs = [pipe.reg(h, "score_high") for h in highs]
        bases = [pipe.reg(p.data[:SCORE_BITS], "score_base") for p in ports]
        if rest > 0:
            steps = [pipe.reg((p.data[SCORE_BITS:] * f)[rest:], "score_step")
                     for p, f in zip(ports, fracs, strict=True)]
        else:
            steps = [Const(0, 1)] * lanes
        highs = [pipe.reg(h, "score_high") for h in highs]
        biases = self._bias_read(m, pipe, stage1["beat"])
        stage2 = self._delay_rec(pipe, stage1, 1, "score2")
        out = []
        for j in range(lanes):
            score = pipe.wire(Mux(highs[j], SIGMOID_TABLE[-1], bases[j] + steps[j])[:SCORE_BITS], "score_sum")
            key = (score + biases[j])[:self.key_width].as_signed()
            out.append((pipe.reg(key, "key"), pipe.reg(score, "score")))
        return out, self._delay_rec(pipe, stage2, 1, "score3")

    def _bias_read(self, m, pipe, beat):
        """Per-lane biases of beat ``beat``, one stage later (a synchronous memory read)."""
        lanes, width, beats = self.lanes, self.bias_width, self._beats
        enable = self.bias.en & (self.bias.addr < self.experts)
        if beats == 1:  # one bias per lane: registers
            biases = [Signal(signed(width), name=f"bias{j}", reset_less=True) for j in range(lanes)]
            for j, bias in enumerate(biases):
                with m.If(enable & (self.bias.addr == j)):
                    m.d.sync += bias.eq(self.bias.data)
            return biases
        mem = Memory(shape=unsigned(lanes * width), depth=beats, init=[])
        m.submodules.bias_mem = mem
        write = mem.write_port(granularity=width)
        read = mem.read_port()
        word, lane = _divmod_const(self.bias.addr, lanes, self.experts)
        m.d.comb += [
            write.addr.eq(word),
            write.data.eq(Cat(*([self.bias.data] * lanes))),
            write.en.eq(Cat(*[enable & (lane == j) for j in range(lanes)])),
            read.addr.eq(beat), read.en.eq(pipe.advance),
        ]
        return [read.data[j * width:(j + 1) * width].as_signed() for j in range(lanes)]

    def _element(self, valid, key, field, payload):
        """Pack ``{valid, key (sign flipped), ~field, payload}``: unsigned order is key order."""
        key = Value.cast(key)
        key_u = Cat(key[:-1], ~key[-1])
        parts = [] if payload is None else [payload]
        if len(Value.cast(field)):
            parts.append(~Value.cast(field))
        return Cat(*parts, key_u, valid)

    def _select(self, m, pipe, rec):
        """Top-``k_max`` of each token, sorted; returns the token record (stage T0)."""
        beats, lanes, k = self._beats, self.lanes, self.k_max
        pw, kw, lw, iw = self.payload_width, self.key_width, self.lane_width, self.index_width
        keys, krec = self._keys(m, pipe, rec)
        elements = [self._element(self._lane_valid(krec["last"], j), key, Const(j, lw), payload)
                    for j, (key, payload) in enumerate(keys)]
        ops = _ValueOps(pipe, pw)
        lists = [[el] for el in elements]
        for levels in self.tree_groups:
            for _ in range(levels):
                lists = _tree_level(ops, lists, k)
            lists = [[pipe.reg(el, "tree") for el in lst] for lst in lists]
        (beat_list,) = lists
        beat_list = [pipe.delay(el, self.sort_pad, "tree_pad") for el in beat_list]
        brec = self._delay_rec(pipe, krec, len(self.tree_groups) + self.sort_pad, "tree")

        beat_sum = None
        if self.two_pass:
            beat_sum = self._beat_exp_sum(m, pipe, rec)

        if beats == 1:
            return {"valid": brec["valid"], "info": brec["info"], "elements": beat_list, "sum": beat_sum}

        # the accumulating merge: one beat per cycle, the only loop in the datapath
        base = pipe.wire(brec["beat"] * lanes, "base")
        converted = []
        for el in beat_list:
            lane = ~el[pw:pw + lw] if lw else Const(0, 1)
            converted.append(pipe.wire(Cat(el[:pw], ~(base + lane)[:iw], el[pw + lw:]), "converted"))
        width = pw + iw + kw + 1
        acc = [Signal(width, name=f"acc{i}", reset_less=True) for i in range(k)]
        current = [pipe.wire(Mux(brec["first"], 0, a), "acc_current") for a in acc]
        merged = merge_top(ops, current, converted, k)
        valid = brec["valid"]
        with m.If(pipe.advance & valid):
            m.d.sync += [a.eq(x) for a, x in zip(acc, merged, strict=True)]
        token = {
            "valid": pipe.valid(valid & brec["last"], "token_valid"),
            "info": pipe.reg(brec["info"], "token_info"),
            "elements": acc,
            "sum": None,
        }
        if self.two_pass:
            total = Signal(range(self.divisor_max + 1), name="acc_sum", reset_less=True)
            with m.If(pipe.advance & valid):
                m.d.sync += total.eq(Mux(brec["first"], beat_sum, total + beat_sum))
            token["sum"] = total
        return token

    def _exp_units(self, m, pipe, diffs, name, keeps=None):
        """exp(-d) in Q0.16 of non-negative logit differences, three stages: product, table,
        shift. ``keeps[j]`` low (a padding lane) forces exp 0."""
        frac = self.logit_frac
        keep = min(self.logit_width, frac + EXP_SATURATION)
        shift = LOG2E_BITS + frac - EXP_LUT_BITS
        zero_y = EXP_MAX_SHIFT << EXP_LUT_BITS  # exp 0
        y_width = max((((1 << keep) - 1) * LOG2E_Q >> shift).bit_length(), zero_y.bit_length())
        ys = []
        for j, d in enumerate(diffs):
            d = Value.cast(d)
            y = ((d[:keep] * LOG2E_Q) >> shift)[:y_width]
            zero = d[keep:].any() if len(d) > keep else Const(0)
            if keeps is not None:
                zero = zero | ~keeps[j]
            ys.append(Mux(zero, zero_y, y))
        ys = [pipe.reg(y, f"{name}_y") for y in ys]
        ports = _rom_ports(m, f"{name}_rom", EXP2_TABLE, EXP_BITS, len(ys))
        for port, y in zip(ports, ys, strict=True):
            m.d.comb += [port.addr.eq(y[:EXP_LUT_BITS]), port.en.eq(pipe.advance)]
        shifts = [pipe.reg(y[EXP_LUT_BITS:], f"{name}_shift") for y in ys]
        return [pipe.reg(Mux(s >= EXP_MAX_SHIFT, 0, p.data >> s)[:EXP_BITS], f"{name}_exp")
                for p, s in zip(ports, shifts, strict=True)]

    def _beat_exp_sum(self, m, pipe, rec):
        """``softmax_topk``: the sum of a beat's exps relative to the token's maximum."""
        diffs = [(rec["max"] - logit)[:self.logit_width] for logit in rec["logits"]]
        keeps = [self._lane_valid(rec["last"], j) for j in range(self.lanes)]
        exps = self._exp_units(m, pipe, diffs, "lane", keeps)
        total = _reduce(pipe, exps, lambda a, b: a + b, "sum")
        return pipe.delay(total, self.sum_pad, "sum_pad")

    # -- normalization -----------------------------------------------------------------------

    def _normalize(self, m, pipe, token):
        k, pw, iw, kw = self.k_max, self.payload_width, self.index_width, self.key_width
        wf = self.weight_width - 1
        kb = k.bit_length()
        elements = token["elements"]
        indices = [~el[pw:pw + iw] for el in elements]
        valid = token["valid"]
        token_info = info = token["info"]

        if self.sigmoid:
            values = [el[:pw] for el in elements]
            value_stages = 0
        else:
            logits = [Cat(el[pw + iw:pw + iw + kw - 1], ~el[pw + iw + kw - 1]).as_signed() for el in elements]
            diffs = [(logits[0] - logit)[:self.logit_width] for logit in logits[1:]]
            values = [Const(1 << EXP_ONE_BITS, EXP_BITS), *self._exp_units(m, pipe, diffs, "top")]
            value_stages = 3
        valid = pipe.valid_delay(valid, value_stages, "val_valid")
        info = pipe.delay(info, value_stages, "val_info")
        total = pipe.delay(token["sum"], value_stages, "val_sum") if self.two_pass else None

        # S: all exps (softmax_topk) or the first k values (k is at least 1)
        kk = info[:kb] if k > 1 else Const(1)
        stages = 1 + self.divider_stages
        shift = RECIP_BITS - wf
        if total is None and k == 1 and not self.sigmoid:
            # the top-1 exp alone: S is the constant 2**16, and so is the weight (1.0), which
            # needs no divider; the valid bit keeps the latency
            recip = (1 << RECIP_BITS) // values[0].value
            weight = ((values[0].value * recip + (1 << (shift - 1))) >> shift) % (1 << self.weight_width)
            weights = [Const(weight, self.weight_width)]
            valid = pipe.valid_delay(valid, stages + 3, "const_valid")
        else:
            if total is None:
                total = sum(Mux(kk > i, v, 0) for i, v in enumerate(values))
            divisor = pipe.reg(total[:self.divisor_max.bit_length()], "divisor")
            valid = pipe.valid(valid, "sum_valid")

            recip = _reciprocal(pipe, divisor, self.quotient_bits, self.divisor_max.bit_length())
            valid = pipe.valid_delay(valid, self.divider_stages, "div_valid")
            fixed = [] if self.sigmoid else values[:1]  # the top-1 exp is a constant: nothing to carry
            width = pw if self.sigmoid else EXP_BITS
            carried = pipe.delay(Cat(*values[len(fixed):]), stages, "div_values")
            values = fixed + [carried[i * width:(i + 1) * width] for i in range(k - len(fixed))]

            products = [pipe.reg(v * recip, "product") for v in values]
            valid = pipe.valid(valid, "product_valid")
            weights = [pipe.reg(((p + (1 << (shift - 1))) >> shift)[:self.weight_width], "weight")
                       for p in products]
            valid = pipe.valid(valid, "weight_valid")
            cumulative = [pipe.reg(c, "cumulative") for c in _prefix_sums(pipe, weights)]
            valid = pipe.valid(valid, "cum_valid")
            weights = [pipe.reg(w, "weight_out") for w in weights]

        carried = pipe.delay(Cat(*indices, token_info), value_stages + stages + 3, "carry")
        indices = [carried[i * iw:(i + 1) * iw] for i in range(k)]
        info = carried[k * iw:]
        kk, top_p = (info[:kb], info[kb:]) if k > 1 else (Const(1), None)
        reached = Const(0)
        keep = []
        for i in range(k):
            keep.append(pipe.wire((kk > i) & ~reached, "keep"))
            if i + 1 < k:  # the cut: the weights so far reach top_p
                reached = pipe.wire(reached | (cumulative[i] >= top_p), "reached")
        count = sum(keep)
        with m.If(pipe.advance):
            m.d.sync += [
                self.o.valid.eq(valid),
                self.o.payload.count.eq(count),
                *[self.o.payload.index[i].eq(Mux(keep[i], indices[i], 0)) for i in range(k)],
                *[self.o.payload.weight[i].eq(Mux(keep[i], weights[i], 0)) for i in range(k)],
            ]
        pipe.valids.append(self.o.valid)


def _reduce(pipe, items, op, name):
    """Pairwise reduction tree with a register after every :data:`REDUCE_LEVELS_PER_STAGE` levels."""
    levels = 0
    while len(items) > 1:
        pairs = range(0, len(items) - 1, 2)
        reduced = [pipe.wire(op(items[i], items[i + 1]), name) for i in pairs]
        items = reduced + items[len(reduced) * 2:]
        levels += 1
        if levels % REDUCE_LEVELS_PER_STAGE == 0 or len(items) == 1:
            items = [pipe.reg(x, name) for x in items]
    return items[0]


def _reciprocal(pipe, divisor, quotient_bits, divisor_bits):
    """``floor(2**RECIP_BITS / divisor)`` by restoring division, registered every
    :data:`DIVIDER_BITS_PER_STAGE` quotient bits; ``divisor >= 2**(RECIP_BITS - quotient_bits)``."""
    remainder = Const(1 << (RECIP_BITS - quotient_bits), divisor_bits)
    quotient = None
    done = 0
    while done < quotient_bits:
        for _ in range(min(DIVIDER_BITS_PER_STAGE, quotient_bits - done)):
            doubled = Cat(Const(0, 1), remainder)
            fits = pipe.wire(doubled >= divisor, "div_fits")
            remainder = pipe.wire(Mux(fits, doubled - divisor, doubled)[:divisor_bits], "div_step")
            quotient = fits if quotient is None else Cat(fits, quotient)
            done += 1
        remainder = pipe.reg(remainder, "div_rem")
        quotient = pipe.reg(quotient, "div_quot")
        if done < quotient_bits:
            divisor = pipe.reg(divisor, "div_divisor")
    return quotient


def _prefix_sums(pipe, values):
    """Inclusive prefix sums in ``log2(len)`` adder levels (Sklansky)."""
    sums = list(values)
    span = 1
    while span < len(sums):
        sums = [pipe.wire(s + sums[(i // span) * span - 1], "prefix") if (i // span) % 2 else s
                for i, s in enumerate(sums)]
        span *= 2
    return sums

"""Analytic models of the device: cycles of its commands and FPGA resources of a config.

Cycle model (checked against the Verilator harness by :func:`cycle_errors`, in
``tests/hls/test_model.py`` and ``moegen bench codesign``):

* **Memory**: a burst of ``b`` port words issued at ``t`` delivers its first word ``latency``
  cycles later (at least ``MIN_LATENCY``, 4, ``SimulatedMemory``), then one word per cycle, in
  order; the memory queues ``outstanding`` requests, the command processor's requests pass a
  register slice first (one every other cycle where a burst is longer than a word,
  :func:`request_spacing`; a request waiting there enters the queue a cycle after a place
  frees) and the arbiters keep more bursts in flight than the memory queues, which the model
  bounds at one more (bounding them at two, as the RTL does, left tiny 3.8% off instead of
  2.6%: that edit of :func:`burst_schedule`, measured with ``python -m
  moegen.hls.calibrate``, not kept). :func:`burst_schedule` runs that recurrence.
* **RUN_EXPERT** (``rtl/top.py``): the table DMA, the loader's header check, on the first use
  of an image its *verify pass* (the whole payload, one burst at a time), then the stream
  pass: params and table words, then the tiles in engine order into a ring of ``banks``
  banks, packed as ``LoaderGeometry`` packs them (a bank is emitted only when full and freed
  after its tiles' replays). The engine takes one array step per cycle; a tile pass lasts
  ``max(groups, rows)`` cycles (drain-limited tiles), a down pass at least 3 cycles per
  token (the accumulator's read-modify-write); for each ffn tile gate and up run over all
  token tiles, then the down tiles; the down passes wait for the last ``h`` rows; the first
  pass waits for its tokens (the ``x`` DMA, one 32-bit word per cycle). Fill and drain are
  the constants below.
* **ROUTE**: ``ceil(E / P)`` cycles per token plus the router's latency and the DMA.

The constants (``_*_CYCLES``) are the fixed costs of states and pipelines, fitted to the
harness over the configs of the tests (tiny, default and the :data:`CYCLE_SWEEP` variants,
1..max_tokens tokens, cold and warm; ``python -m moegen.hls.calibrate`` measures the calls
and searches the constants): largest error 2.6% (sweep-r8c4-44's one-token call). Resource
model: :func:`resources`, its coefficients from yosys synthesis (see ``RESOURCE_FITS``).
"""

from dataclasses import dataclass

from ..golden.formats import HEADER_SIZE
from ..rtl.loader import LoaderGeometry
from ..rtl.memory import MIN_LATENCY
from ..rtl.top import request_slice_depth

__all__ = [
    "CYCLE_SWEEP",
    "ExpertCycles",
    "burst_schedule",
    "call_cycles",
    "cycle_errors",
    "expert_cycles",
    "layer_cycles",
    "point_config",
    "request_spacing",
    "resources",
    "route_cycles",
    "simulated_calls",
    "sweep_config",
    "synthesize_points",
    "tokens_per_second",
]

# -- fixed costs in cycles, fitted to the harness (tests/hls/test_model.py) ---------------------
#: request register, the request slice, the device's request FIFO and the memory's queue
#: between the loader's request and the memory's latency count, as fitted
_MEM_ISSUE_CYCLES = 2
#: a burst leaves the memory's queue this many cycles before its last word is delivered (the
#: address register, the registered read and the word register), so the next request may
#: enter then (a cycle later for the request slice before it); the burst arbiters keep more
#: bursts in flight than the memory queues (the model bounds them at one more)
_QUEUE_FREE_LEAD = MIN_LATENCY - 1
#: a command's DECODE, CHECK and DONE states, as fitted to the harness (FETCH is not busy)
_COMMAND_CYCLES = 2
#: header burst to checked command: CRC of the header, field checks, hand-over to the streamer
_HEADER_CHECK_CYCLES = 8
#: the verify pass streams at one port word per cycle; this is its start and CRC check
_VERIFY_CYCLES = 10
#: first params word to the engine's run beat and the x DMA's first word
_RUN_START_CYCLES = 2
#: last array step to the last ``y`` beat: array drain (rows), epilogue pipeline, accumulator
_ENGINE_DRAIN_CYCLES = 9
#: last up step to the first down step: the epilogue writes the last h rows
_H_WAIT_CYCLES = 8
#: with ``device.pipeline``: the result and output slices (both paths), the activation register
#: (the h path)
_PIPELINE_DRAIN_CYCLES = 2
_PIPELINE_H_WAIT_CYCLES = 2
#: ACC_STORE: the first read and the writer's drain
_STORE_DRAIN_CYCLES = 3


def _ceil(a, b):
    return -(-a // b)


def request_spacing(memory):
    """Fewest cycles between two of the loader's requests: the command processor's request
    slice (:func:`~moegen.rtl.top.request_slice_depth`) passes one every other cycle with one
    entry, every cycle with two."""
    return 2 if request_slice_depth(memory) == 1 else 1


def burst_schedule(jobs, *, latency, outstanding, start=0, ready=None, spacing=1):
    """Word-arrival times of a sequence of read jobs on one memory port.

    ``jobs`` is a list of burst-length lists (one per job); ``ready[j]`` is the earliest cycle
    job ``j``'s first burst may be issued (a bank that must be free first); ``spacing`` the
    fewest cycles between two requests (:func:`request_spacing`). Returns the cycle each job's
    last word arrives and the cycle its first word arrives.
    """
    latency = max(MIN_LATENCY, latency)
    ends, firsts = [], []
    done = []  # end cycle of every burst so far
    issue = start - spacing
    data_end = start
    for j, bursts in enumerate(jobs):
        first = None
        for length in bursts:
            issue = max(issue + spacing, (ready[j] if ready else start))
            if len(done) >= outstanding:
                # the request waits in the slice before the memory's queue: one cycle more
                issue = max(issue, done[-outstanding] - _QUEUE_FREE_LEAD - 1)
            if len(done) > outstanding:
                issue = max(issue, done[-outstanding - 1])
            begin = max(issue + latency + _MEM_ISSUE_CYCLES - 1, data_end)
            data_end = begin + length
            done.append(data_end)
            first = begin if first is None else first
        ends.append(data_end)
        firsts.append(first if first is not None else data_end)
    return ends, firsts


def _bursts(beats, burst_len):
    return [burst_len] * (beats // burst_len) + ([beats % burst_len] if beats % burst_len else [])


@dataclass(frozen=True)
class ExpertCycles:
    """Modeled cycles of one RUN_EXPERT.

    Members
    -------
    command : int
        Cycles the command keeps the processor busy (what ``BUSY_CYCLES`` adds).
    engine : int
        Engine busy cycles (``ENGINE_BUSY``), run beat to last output.
    steps : int
        Array steps (``ENGINE_STEPS``).
    load_bytes : int
        Bytes the loader reads (``LOAD_BYTES``).
    roofline : int
        ``max(bytes / port bytes, steps)``: the bound the design's performance model names.
    """

    command: int
    engine: int
    steps: int
    load_bytes: int
    roofline: int


def _tile_list(g, rows, tokens):
    """(beats, bank words, cycles per replay, replays) of each tile in engine order."""
    token_tiles = _ceil(tokens, rows)
    gate_tiles, down_tiles = g.tile_counts
    out = []
    for _ in range(gate_tiles):
        for _ in range(2):  # gate, then up
            out.append((g.tile_beats[0], g.tile_words[0], max(g.groups[0], rows), token_tiles, False))
    for _ in range(down_tiles):
        out.append((g.tile_beats[1], g.tile_words[1], max(g.groups[1], rows), token_tiles, True))
    return out


def expert_cycles(config, tokens, *, verified=True):
    """Model of one ``RUN_EXPERT`` of ``tokens`` tokens; ``verified=False`` adds the verify
    pass of an image's first use. Returns :class:`ExpertCycles`."""
    if not 1 <= tokens <= config.model.max_tokens:
        raise ValueError(f"tokens must lie in 1..{config.model.max_tokens}, not {tokens!r}")
    g = LoaderGeometry.from_config(config)
    mem, rows = config.memory, config.array.rows
    P, burst = g.port_bytes, mem.burst_len
    spacing = request_spacing(mem)
    words_per_token = 1 + _ceil(config.model.hidden, 4)
    pipelined = config.device.pipeline
    h_wait = _H_WAIT_CYCLES + pipelined * _PIPELINE_H_WAIT_CYCLES

    # table DMA (one 32-bit word per token), then the loader command
    table_words = max(1, _ceil(4 * tokens, P))
    table_end, _ = burst_schedule([_bursts(table_words, burst)], latency=mem.latency, outstanding=1, start=2,
                                  spacing=spacing)
    t = table_end[0] + 1
    header_end, _ = burst_schedule([_bursts(g.header_beats, burst)], latency=mem.latency, outstanding=1, start=t,
                                   spacing=spacing)
    t = header_end[0] + _HEADER_CHECK_CYCLES
    load_bytes = HEADER_SIZE + g.stream_bytes(tokens)
    if not verified:
        ends, _ = burst_schedule([_bursts(g.verify_beats, burst)], latency=mem.latency,
                                 outstanding=mem.outstanding, start=t, spacing=spacing)
        t = ends[0] + _VERIFY_CYCLES
        load_bytes += g.verify_beats * P

    # stream pass: params and table segments, then tiles into the bank ring
    tiles = _tile_list(g, rows, tokens)
    banks = []  # tiles of each bank
    used = g.bank_words
    for tile in tiles:
        if used + tile[1] > g.bank_words:
            banks.append([])
            used = 0
        banks[-1].append(tile)
        used += tile[1]
    segments = [_bursts(beats, burst) for beats in g.segment_beats]
    seg_end, seg_first = burst_schedule(segments, latency=mem.latency, outstanding=mem.outstanding, start=t,
                                        spacing=spacing)
    run = seg_first[0] + _RUN_START_CYCLES  # the engine's run beat
    lead = max(MIN_LATENCY, mem.latency)
    fills = []  # cycle each bank's last word arrives
    free = []  # cycle each bank is freed

    def fill(b, ready):
        start = fills[-1] - lead if fills else seg_end[-1] - lead
        ends, _ = burst_schedule([_bursts(tile[0], burst) for tile in banks[b]], latency=mem.latency,
                                 outstanding=mem.outstanding, start=max(start, ready), spacing=spacing)
        fills.append(ends[-1])

    ring = min(config.loader.banks, len(banks))
    for b in range(ring):
        fill(b, 0)
    # the loader's reads go first: the x DMA gets the port once the ring is full
    x_start = max(run, fills[ring - 1]) + lead + _MEM_ISSUE_CYCLES
    emit_end = run
    steps = 0
    first_down = True
    last_up_end = run
    pass_index = 0
    for b, bank in enumerate(banks):
        if b >= ring:
            fill(b, free[b - config.loader.banks])
        clock = max(fills[b] + 1, emit_end)
        for _, _, cycles, replays, down in bank:
            if down and first_down:
                clock = max(clock, last_up_end + h_wait)
                first_down = False
            for r in range(replays):
                in_pass = min(rows, tokens - r * rows)
                if pass_index < replays:  # first pass over token tile r waits for its tokens
                    clock = max(clock, x_start + (r * rows + in_pass) * words_per_token)
                pass_index += 1
                clock += max(cycles, 3 * in_pass) if down else cycles
                steps += g.groups[1] if down else g.groups[0]
            if not down:
                last_up_end = clock
        emit_end = clock
        free.append(emit_end)
    engine_end = emit_end + _ENGINE_DRAIN_CYCLES + pipelined * _PIPELINE_DRAIN_CYCLES
    command = engine_end + _COMMAND_CYCLES
    roofline = max(_ceil(load_bytes, P), steps)
    return ExpertCycles(command=command, engine=engine_end - run, steps=steps, load_bytes=load_bytes,
                        roofline=roofline)


def _acc_cycles(config, rows):
    hidden_tiles = _ceil(config.model.hidden, config.array.cols)
    cols, port_bytes = config.array.cols, config.memory.port_width // 8
    clear = rows * hidden_tiles + _COMMAND_CYCLES
    # the writer takes a 32-bit word per cycle and spends one more cycle on each port word it writes
    store = rows * hidden_tiles * (cols + _ceil(4 * cols, port_bytes)) + _STORE_DRAIN_CYCLES + _COMMAND_CYCLES
    return clear, store


def call_cycles(config, tokens, *, verified=True):
    """Busy cycles of one host expert call (``Device.run_expert``): ``ACC_CLEAR``,
    ``RUN_EXPERT``, ``ACC_STORE`` and ``FENCE``."""
    clear, store = _acc_cycles(config, tokens)
    return clear + expert_cycles(config, tokens, verified=verified).command + store + _COMMAND_CYCLES


def _router(router):
    """The router component, for its ``beats`` and ``LATENCY`` (never elaborated)."""
    from ..rtl.router import TopKRouter

    component = TopKRouter.from_config(router)
    component._MustUse__silence = True  # planned only: Amaranth would warn that it was never elaborated
    return component


def route_cycles(config, tokens):
    """Busy cycles of one ``ROUTE`` of ``tokens`` tokens: ``ceil(E / P)`` per token, the
    router's latency, the logits DMA (``E`` words per token, one per cycle) and the results'
    ``k_max + 1`` words per token."""
    r = config.router
    router = _router(r)
    beats = router.beats
    per_token = max(beats, r.experts, r.k_max + 1)  # one 32-bit logit word per cycle feeds the lanes
    return per_token * tokens + router.LATENCY + max(MIN_LATENCY, config.memory.latency) + _MEM_ISSUE_CYCLES \
        + r.k_max + 1 + _COMMAND_CYCLES


def layer_cycles(config, k, batch=1):
    """Device cycles of one MoE layer's step for ``batch`` tokens with ``k`` experts per
    token, every image verified and the ``batch * k`` expert calls spread over distinct
    experts (decode, the worst case for weight reuse): a ROUTE, then one expert run per call
    with its tokens, accumulated on the device."""
    calls = min(batch * k, config.router.experts)
    per_call = max(1, round(batch * k / calls))
    clear, store = _acc_cycles(config, batch)
    return route_cycles(config, batch) + clear + store + calls * expert_cycles(config, per_call).command


def tokens_per_second(config, ks, batch=1):
    """Modeled decode tokens per second at the config's clock: ``ks`` is the k of each layer."""
    cycles = sum(layer_cycles(config, k, batch) for k in ks)
    return batch * config.target.clock_mhz * 1e6 / cycles


# -- resources --------------------------------------------------------------------------------

#: Whole-accelerator synthesis on ECP5 (``Accelerator(config, memory="bram")`` in the board top,
#: ``moegen bitstream --board ulx3s-85f --stop-after synthesize``, yosys 0.69 ``synth_ecp5``;
#: counted as ``moegen.boards.synth`` counts): the points :func:`resources` is fitted to. Each is
#: ``(overrides of the default config, {luts, ffs, dsps, brams})``, all re-measured at commit
#: 1a04a7c (2026-11-25: after the area work that fit the accelerator into the iCE40UP5K) by
#: :func:`synthesize_points` (``python -c "from moegen.hls.model import synthesize_points;
#: print(synthesize_points())"``, about 6 minutes for the five in two processes on 2 cores).
ECP5_POINTS = (
    # configs/tiny.yaml
    ({"router": {"experts": 4, "lanes": 4}, "array": {"rows": 2, "cols": 2},
      "loader": {"bank_bytes": 256}, "memory": {"port_width": 32, "burst_len": 4, "size_bytes": 65536},
      "model": {"hidden": 16, "ffn": 32, "max_tokens": 4, "layers": 2}},
     {"luts": 11303, "ffs": 5499, "dsps": 25, "brams": 43}),
    # the first ulx3s-85f preset with a 4x8 array and 32 tokens
    ({"router": {"experts": 16, "lanes": 16}, "array": {"rows": 4}, "loader": {"bank_bytes": 4096},
      "memory": {"size_bytes": 262144}, "model": {"hidden": 256, "ffn": 512, "max_tokens": 32}},
     {"luts": 21099, "ffs": 11093, "dsps": 139, "brams": 203}),
    # the same with an 8x8 array and 64 tokens
    ({"router": {"experts": 16, "lanes": 16}, "loader": {"bank_bytes": 4096},
      "memory": {"size_bytes": 262144}, "model": {"hidden": 256, "ffn": 512, "max_tokens": 64}},
     {"luts": 24438, "ffs": 14283, "dsps": 203, "brams": 232}),
    # demo shapes, 4x4 2:4
    ({"array": {"rows": 4, "cols": 4}, "loader": {"bank_bytes": 4096},
      "memory": {"size_bytes": 131072}, "model": {"max_tokens": 32}},
     {"luts": 14542, "ffs": 7624, "dsps": 71, "brams": 111}),
    # demo shapes, 8x8 dense, 4 banks, 4 router lanes; when it first joined the fit, the four points
    # above predicted it within -16.8% (LUTs), -2.6% (FFs), 0 (DSPs), +8.3% (BRAM)
    ({"router": {"lanes": 4}, "array": {"m": 4, "n": 4}, "loader": {"banks": 4},
      "memory": {"size_bytes": 262144}},
     {"luts": 25665, "ffs": 16695, "dsps": 331, "brams": 256}),
)


def synthesize_points(points=ECP5_POINTS):
    """What yosys maps each point's config to today, as :data:`ECP5_POINTS` records it:
    ``[{luts, ffs, dsps, brams}]`` (``moegen bitstream --board ulx3s-85f --stop-after
    synthesize`` of each; a point over the part's resources is counted all the same)."""
    import tempfile

    from ..boards.build import BuildFailed, build_bitstream

    used = []
    for overrides, _ in points:
        with tempfile.TemporaryDirectory() as work:
            try:
                report = build_bitstream(point_config(overrides), "ulx3s-85f", out=work,
                                         stop_after="synthesize", progress=lambda line: None)
            except BuildFailed as failed:  # does not fit: the counts are in its report
                report = failed.report
        used.append({kind: report.resources[kind]["used"] for kind in ("luts", "ffs", "dsps", "brams")})
    return used


#: DP16KD blocks hold 2 KiB of data (16 Kbit without parity)
_BRAM_BYTES = 2048


def simulated_calls(config):
    """``(tokens, verified, BUSY_CYCLES, ENGINE_BUSY)`` of host expert calls on the config's
    Verilator harness (built when not cached): a cold call, then warm calls on 1, 2,
    ``rows - 1``, ``rows``, ``rows + 1`` and ``max_tokens`` tokens."""
    from ..golden.image import write_image
    from ..host.device import open_device, require_counters
    from ..host.sim import build, launch
    from ..rtl.testbench.device import random_tokens
    from ..rtl.testbench.loader import make_expert

    require_counters(config, "the cycle model's calibration")
    rows, most = config.array.rows, config.model.max_tokens
    sizes = sorted({t for t in (1, 2, rows - 1, rows, rows + 1, most) if 1 <= t <= most})
    results = []
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        qe = make_expert(config.image_layout, 1)
        handle = device.upload_expert(write_image(qe, config_hash=config.device_hash, expert_id=0), expert=0)
        for verified, tokens in [(False, 1)] + [(True, t) for t in sizes]:
            x_q, mult, shift = random_tokens(config, tokens, tokens)
            start = device.counters()
            device.run_expert(handle, x_q, mult, shift)
            end = device.counters()
            results.append((tokens, verified, end["BUSY_CYCLES"] - start["BUSY_CYCLES"],
                            end["ENGINE_BUSY"] - start["ENGINE_BUSY"]))
    return results


def cycle_errors(config, calls=None):
    """The cycle model against the harness: per call of ``calls`` (:func:`simulated_calls`'s
    records; measured when ``None``) ``(tokens, verified, relative error of the call's busy
    cycles, of the engine's)``."""
    return [(tokens, verified, call_cycles(config, tokens, verified=verified) / busy - 1,
             expert_cycles(config, tokens, verified=verified).engine / engine - 1)
            for tokens, verified, busy, engine in (simulated_calls(config) if calls is None else calls)]


def _features(config):
    """Regressors of the LUT, FF and block-RAM fits (see :func:`resources`)."""
    a, r, mdl, ld = config.array, config.router, config.model, config.loader
    buffers = mdl.max_tokens * (mdl.hidden + mdl.ffn + 4 * mdl.hidden)  # x, h, int32 accumulator
    return {
        "logic": [1.0, a.rows * a.cols * a.m, a.cols * mdl.hidden / 64, r.lanes],
        "brams": [1.0, buffers / _BRAM_BYTES, ld.banks * ld.bank_bytes / _BRAM_BYTES],
    }


def point_config(overrides, name=None):
    """The default config with ``overrides`` (``{section: {field: value}}``), as :data:`ECP5_POINTS`
    and :data:`CYCLE_SWEEP` give them; ``name`` replaces its name."""
    from ..config import AccelConfig, load_config

    data = load_config("default").to_dict()
    for section, values in overrides.items():
        data[section].update(values)
    if name is not None:
        data["name"] = name
    return AccelConfig.from_dict(data)


#: Sweep variants of the default config the cycle model is checked and fitted on, besides the
#: tiny and default presets (``tests/hls/test_model.py``, :mod:`moegen.hls.calibrate`): another
#: array shape and sparsity, port width, memory latency, bank count and size, the engine
#: without its register slices (a Verilator harness build each, about 150 s).
CYCLE_SWEEP = {
    "sweep-r4c16-14": {"array": {"rows": 4, "cols": 16, "m": 1, "n": 4}, "memory": {"port_width": 32, "latency": 8},
                       "loader": {"banks": 3, "bank_bytes": 4096}},
    "sweep-r8c4-44": {"array": {"rows": 8, "cols": 4, "m": 4, "n": 4}, "memory": {"port_width": 128, "latency": 24},
                      "loader": {"banks": 2, "bank_bytes": 2048}, "router": {"experts": 16, "lanes": 4},
                      "device": {"pipeline": False}},
}


def sweep_config(name):
    """The :data:`CYCLE_SWEEP` variant ``name``."""
    return point_config(CYCLE_SWEEP[name], name=name)


def _fit():
    import numpy as np

    configs = [point_config(o) for o, _ in ECP5_POINTS]
    fits = {}
    for kind, group in (("luts", "logic"), ("ffs", "logic"), ("brams", "brams")):
        x = np.array([_features(c)[group] for c in configs])
        y = np.array([used[kind] - (_memory_brams(c) if kind == "brams" else 0)
                      for c, (_, used) in zip(configs, ECP5_POINTS, strict=True)])
        fits[kind] = np.linalg.lstsq(x, y, rcond=None)[0].tolist()
    return fits


def _memory_brams(config):
    return _ceil(config.memory.size_bytes, _BRAM_BYTES)


_FITS = None


def _narrow_results(config):
    """The engine's results fit the requantizer's multiplier tiles and logic rows (half its
    multipliers)."""
    from ..rtl.expert import result_width
    from ..rtl.requant import DSP_WIDTH, LOGIC_ROWS

    a, model = config.array, config.model
    products = max(-(-model.hidden // a.n), -(-model.ffn // a.n)) * a.m
    return result_width(a.act_width, a.weight_width, products, a.acc_width) <= DSP_WIDTH + LOGIC_ROWS


def resources(config, family="ecp5"):
    """Modeled resources of ``Accelerator(config, memory="bram")`` on ``family``:
    ``{"luts", "ffs", "dsps", "brams"}``.

    * DSPs: one 18x18 multiplier per array multiplier (``rows * cols * m``) plus ``9 * cols + 3``
      (epilogue requantizers, the accumulator's weight multipliers, the router's exps), two fewer
      per column where the engine's results are narrow enough for the requantizer's logic rows
      (:data:`~moegen.rtl.requant.LOGIC_ROWS`): exact on every point of :data:`ECP5_POINTS`.
    * Block RAM: the device memory (``size_bytes / 2 KiB``) plus a least-squares fit on the
      engine and accumulator buffers and the loader banks.
    * LUTs and FFs: least squares over :data:`ECP5_POINTS` on a constant (link, loader, command
      processor), the array's multipliers, the epilogue and buffer width (``cols * hidden``)
      and the router lanes.
    """
    global _FITS
    if family != "ecp5":
        raise ValueError(f"no resource model for FPGA family {family!r}; modeled: ecp5")
    if _FITS is None:
        _FITS = _fit()
    a = config.array
    f = _features(config)
    def fitted(kind, group):
        return max(0, round(sum(c * x for c, x in zip(_FITS[kind], f[group], strict=True))))

    return {"luts": fitted("luts", "logic"), "ffs": fitted("ffs", "logic"),
            "dsps": a.rows * a.cols * a.m + (9 - 2 * _narrow_results(config)) * a.cols + 3,
            "brams": _memory_brams(config) + fitted("brams", "brams")}

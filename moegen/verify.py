"""``moegen verify BLOCK``: run a block's Verilog on Verilator against golden.

Each block registers a :class:`VerifyTarget`: how to add its CLI options, how to build the
component and testbench parameters from them (or from a config), and how to summarize the
testbench reports. Tests call :func:`run_block` with the same parameters.
"""

from dataclasses import dataclass

from .config import load_config
from .simulation import run_cocotb

__all__ = ["DEFAULT_PATTERNS", "TARGETS", "VerifyTarget", "run_block"]

#: (idle, stall) probabilities swept by default: happy path, idle source, backpressure, both.
DEFAULT_PATTERNS = ((0.0, 0.0), (0.4, 0.0), (0.0, 0.5), (0.5, 0.5))


@dataclass(frozen=True)
class VerifyTarget:
    """A block ``moegen verify`` knows.

    Members
    -------
    name : str
        CLI name.
    add_arguments : callable(parser)
        Adds the block's options (all optional; unset ones come from the config).
    elaborate : callable(args, config) -> (component, module name, testbench module, params)
    summarize : callable(params, reports) -> list of str
        Human-readable lines from the testbench reports.
    """

    name: str
    add_arguments: object
    elaborate: object
    summarize: object


def _requant_arguments(parser):
    parser.add_argument("--acc-width", type=int, help="accumulator bits (default: the config's array.acc_width)")
    parser.add_argument("--out-width", type=int, help="result bits (default: array.act_width)")
    parser.add_argument("--lanes", type=int, help="lanes per beat (default: array.cols)")
    parser.add_argument("--vectors", type=int, default=512, help="random beats on top of the adversarial set")


def _given(value, default):
    return default if value is None else value


def _requant_elaborate(args, config):
    from .rtl.requant import Requantizer

    params = {
        "acc_width": _given(args.acc_width, config.array.acc_width),
        "out_width": _given(args.out_width, config.array.act_width),
        "lanes": _given(args.lanes, config.array.cols),
        "vectors": args.vectors,
        "seed": args.seed,
        "patterns": [list(p) for p in DEFAULT_PATTERNS],
    }
    component = Requantizer(acc_width=params["acc_width"], out_width=params["out_width"], lanes=params["lanes"])
    return component, "requantizer", "moegen.rtl.testbench.requant", params


def _requant_summary(params, reports):
    head = (f"requantizer acc_width={params['acc_width']} out_width={params['out_width']} "
            f"lanes={params['lanes']}")
    lines = [head]
    for r in reports:
        if "idle" in r:
            lines.append(f"  idle {r['idle']:.1f} stall {r['stall']:.1f}: {r['received']}/{r['beats']} beats, "
                         f"{r['mismatches']} mismatches, {r['cycles']} cycles")
            lines += [f"    mismatch: {m}" for m in r["first_mismatches"]]
            lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
        else:
            lines.append(f"  latency {r['latency_cycles']} cycles, {r['beats']} beats in {r['span_cycles']} cycles")
    return lines


def _router_arguments(parser):
    parser.add_argument("--experts", type=int, help="routed experts E (default: the config's router.experts)")
    parser.add_argument("--k", type=int, help="the router's k_max; tokens route with runtime k in 1..K "
                        "(default: router.k_max, at most E)")
    parser.add_argument("--lanes", type=int, help="logits per beat P (default: router.lanes, at most E)")
    parser.add_argument("--mode", help="normalization mode (default: router.mode)")
    parser.add_argument("--logit-width", type=int, help="logit bits (default: router.logit_width)")
    parser.add_argument("--logit-frac", type=int, help="logit fractional bits (default: router.logit_frac)")
    parser.add_argument("--weight-width", type=int, help="weight bits (default: router.weight_width)")
    parser.add_argument("--tokens", type=int, default=200, help="random tokens on top of the adversarial set")


def _router_elaborate(args, config):
    from .rtl.router import TopKRouter
    from .rtl.testbench.router import router_params

    r = config.router
    if type(args.tokens) is not int or not 1 <= args.tokens <= 100_000:
        raise ValueError(f"tokens must be an integer in 1..100000, not {args.tokens!r}")
    experts = _given(args.experts, r.experts)
    component = TopKRouter(  # k and lanes from the config never exceed a given E
        experts=experts, k_max=_given(args.k, min(r.k_max, experts)), lanes=_given(args.lanes, min(r.lanes, experts)),
        logit_width=_given(args.logit_width, r.logit_width), logit_frac=_given(args.logit_frac, r.logit_frac),
        weight_width=_given(args.weight_width, r.weight_width), mode=_given(args.mode, r.mode),
    )
    params = router_params(component, tokens=args.tokens, seed=args.seed, patterns=DEFAULT_PATTERNS)
    return component, "topk_router", "moegen.rtl.testbench.router", params


def _router_summary(params, reports):
    p = params
    lines = [f"router E={p['experts']} k_max={p['k_max']} lanes={p['lanes']} mode={p['mode']} "
             f"logits {p['logit_width']}.{p['logit_frac']} weights {p['weight_width']}: "
             f"{p['beats']} cycles per token, latency {p['latency']} cycles"]
    for r in reports:
        if "idle" in r:
            lines.append(f"  idle {r['idle']:.1f} stall {r['stall']:.1f}: {r['received']}/{r['tokens']} tokens, "
                         f"{r['mismatches']} mismatches, {r['cycles']} cycles, flags {r['flags']}")
            lines += [f"    mismatch: {m}" for m in r["first_mismatches"]]
            lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
        elif "latency_cycles" in r:
            lines.append(f"  measured: latency {r['latency_cycles']} cycles, {r['cycles_per_token']} cycles per token "
                         f"(output gaps {r['output_gaps']}), {r['input_beats']} beats entered in "
                         f"{r['input_span_cycles']} cycles, {r['mismatches']} mismatches")
        else:
            checks = ", ".join(f"{name} {'ok' if ok else 'WRONG'} (k_error {ke}, framing_error {fe})"
                               for name, (ok, ke, fe) in r["error_checks"].items())
            lines.append(f"  errors: {checks}; busy when drained {r['busy_idle']}")
    return lines


def _array_arguments(parser):
    parser.add_argument("--rows", type=int, help="token lanes R (default: the config's array.rows)")
    parser.add_argument("--cols", type=int, help="output-channel lanes C (default: array.cols)")
    parser.add_argument("--m", type=int, help="weights kept per group (default: array.m)")
    parser.add_argument("--n", type=int, help="group size, a power of two (default: array.n)")
    parser.add_argument("--act-width", type=int, help="activation bits (default: array.act_width)")
    parser.add_argument("--weight-width", type=int, help="weight bits (default: array.weight_width)")
    parser.add_argument("--acc-width", type=int, help="accumulator bits (default: array.acc_width)")
    parser.add_argument("--k-dim", type=int, help="reduction length K (default: model.hidden)")
    parser.add_argument("--out-dim", type=int, help="output channels O (default: model.ffn)")
    parser.add_argument("--tokens", type=int, help="tokens T (default: rows + 1)")
    parser.add_argument("--shape", action="append", default=[], metavar="K,O,T",
                        help="one more GEMM on the same build (repeatable)")


def _gemm_shape(k_dim, out_dim, tokens):
    for name, value in (("k-dim", k_dim), ("out-dim", out_dim), ("tokens", tokens)):
        if type(value) is not int or not 1 <= value <= 65535:
            raise ValueError(f"{name} must be an integer in 1..65535, not {value!r}")
    return {"k_dim": k_dim, "out_dim": out_dim, "tokens": tokens}


def _array_elaborate(args, config):
    from .golden.formats import check_mn
    from .rtl.array import SparseSystolicArray, required_acc_bits

    a = config.array
    params = {name: _given(getattr(args, name), getattr(a, name))
              for name in ("rows", "cols", "m", "n", "act_width", "weight_width", "acc_width")}
    shapes = [_gemm_shape(_given(args.k_dim, config.model.hidden), _given(args.out_dim, config.model.ffn),
                          _given(args.tokens, params["rows"] + 1))]
    for text in args.shape:
        try:
            k_dim, out_dim, tokens = (int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"shape must be K,O,T (three integers), not {text!r}") from None
        shapes.append(_gemm_shape(k_dim, out_dim, tokens))
    check_mn(params["m"], params["n"])
    if all(type(params[name]) is int for name in ("act_width", "weight_width", "acc_width")):
        longest = max(shape["k_dim"] for shape in shapes)
        need = required_acc_bits(params["act_width"], params["weight_width"], -(-longest // params["n"]) * params["m"])
        if params["acc_width"] < need:
            raise ValueError(f"acc_width {params['acc_width']} cannot hold a reduction of k-dim {longest} at "
                             f"{params['m']}:{params['n']}; allowed {need}..32")
    component = SparseSystolicArray(**params)
    cases = []
    for shape in shapes:
        for idle, stall in DEFAULT_PATTERNS:
            cases.append({**shape, "seed": args.seed + len(cases), "idle_a": idle, "idle_w": idle * 0.5,
                          "stall": stall, "weights": "random"})
        cases.append({**shape, "seed": args.seed + len(cases), "idle_a": 0.2, "idle_w": 0.3, "stall": 0.3,
                      "weights": "extreme"})
    params.update(step_bits=component.step_bits, fifo_depth=component.fifo_depth, latency=component.latency,
                  cases=cases, timing={**shapes[0], "seed": args.seed})
    return component, "sparse_systolic_array", "moegen.rtl.testbench.array", params


def _array_summary(params, reports):
    p = params
    lines = [f"array {p['rows']}x{p['cols']} {p['m']}:{p['n']} act {p['act_width']} weight {p['weight_width']} "
             f"acc {p['acc_width']}: step record {p['step_bits']} bits, result FIFO {p['fifo_depth']} rows, "
             f"latency {p['latency']} cycles"]
    for r in reports:
        if "timing" in r:
            lines.append(f"  throughput K={r['timing']['k_dim']} O={r['timing']['out_dim']} T={r['timing']['tokens']}: "
                         f"{r['steps']} steps ({r['tiles']} tiles of {r['groups']}) accepted in {r['fire_span']} "
                         f"cycles, results after {r['cycles']} cycles, {'correct' if r['correct'] else 'WRONG'}")
        else:
            lines.append(f"  K={r['k_dim']} O={r['out_dim']} T={r['tokens']} {r['weights']} weights, idle "
                         f"{r['idle_a']:.2f}/{r['idle_w']:.2f} stall {r['stall']:.1f}: {r['received']}/{r['beats']} "
                         f"rows, {r['mismatches']} mismatches{', TIMED OUT' if r['timed_out'] else ''}")
            lines += [f"    mismatch: {m}" for m in r["first_mismatches"]]
            lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
    return lines


def _expert_arguments(parser):
    parser.add_argument("--tokens", type=int, action="append",
                        help="tokens of one run (repeatable; default: 1, rows - 1, rows, rows + 1 and max_tokens)")


def _expert_elaborate(args, config):
    from .rtl.expert import ExpertEngine

    rows, most = config.array.rows, config.model.max_tokens
    tokens = args.tokens or sorted({t for t in (1, rows - 1, rows, rows + 1, most) if 1 <= t <= most})
    for t in tokens:
        if type(t) is not int or not 1 <= t <= most:
            raise ValueError(f"tokens must be an integer in 1..{most} (the config's model.max_tokens), not {t!r}")
    component = ExpertEngine.from_config(config)
    runs = []
    for i, t in enumerate(tokens):
        idle, stall = DEFAULT_PATTERNS[i % len(DEFAULT_PATTERNS)]
        runs.append({"tokens": t, "seed": args.seed + i, "idle_params": idle, "idle_weights": idle * 0.5,
                     "idle_x": idle, "stall": stall})
    params = {name: getattr(component, name) for name in ("rows", "cols", "m", "n", "act_width", "weight_width",
                                                         "acc_width", "hidden", "ffn", "max_tokens")}
    params.update(config=config.name, runs=runs)
    return component, "expert_engine", "moegen.rtl.testbench.expert", params


def _expert_summary(params, reports):
    p = params
    lines = [f"expert engine ({p['config']}): array {p['rows']}x{p['cols']} {p['m']}:{p['n']}, hidden {p['hidden']}, "
             f"ffn {p['ffn']}, up to {p['max_tokens']} tokens"]
    for r in reports:
        c = r["counters"]
        lines.append(f"  T={r['tokens']} idle {r['idle_params']:.1f}/{r['idle_weights']:.2f}/{r['idle_x']:.1f} "
                     f"stall {r['stall']:.1f}: {r['received']}/{r['beats']} output beats, "
                     f"{r['mismatches']} mismatches, "
                     f"{c['busy']} cycles ({c['steps']} steps of {r['weight_records']}; stalled on weights "
                     f"{c['stall_weights']}, activations {c['stall_activations']}, output {c['stall_output']})"
                     f"{'' if r['finished'] else ', DID NOT FINISH'}")
        lines += [f"    mismatch: {m}" for m in r["first_mismatches"]]
        lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
    return lines


def _loader_arguments(parser):
    parser.add_argument("--banks", type=int, help="weight banks (default: the config's loader.banks)")
    parser.add_argument("--bank-bytes", type=int, help="bytes per bank (default: loader.bank_bytes)")
    parser.add_argument("--port-width", type=int, help="memory port bits (default: memory.port_width)")
    parser.add_argument("--burst-len", type=int, help="words per burst (default: memory.burst_len)")
    parser.add_argument("--outstanding", type=int, help="bursts in flight (default: memory.outstanding)")
    parser.add_argument("--size-bytes", type=int, help="device memory bytes (default: memory.size_bytes)")
    parser.add_argument("--latency", type=int, help="memory latency in cycles (default: memory.latency)")
    parser.add_argument("--jitter", type=int, default=8, help="random extra latency per burst, 0..JITTER cycles")
    parser.add_argument("--bandwidth", type=float, default=1.0, help="memory words per cycle, in (0, 1]")
    parser.add_argument("--rows", type=int, help="token lanes the tiles are replayed for (default: array.rows)")
    parser.add_argument("--verified-images", type=int, help="verified-image table entries (default: images "
                        "the memory holds, at most 64)")
    parser.add_argument("--commands", type=int, default=24, help="random actions per pattern, on top of one run "
                        "of every corruption")


def _loader_elaborate(args, config):
    from fractions import Fraction

    from .rtl.testbench.loader import build_harness, harness_params

    if type(args.commands) is not int or not 0 <= args.commands <= 10_000:
        raise ValueError(f"commands must be an integer in 0..10000, not {args.commands!r}")
    if not isinstance(args.bandwidth, (int, float)) or not 0 < args.bandwidth <= 1:
        raise ValueError(f"bandwidth must be a number in (0, 1], not {args.bandwidth!r}")
    names = {"banks": "banks", "bank_bytes": "bank_bytes", "rows": "rows", "verified_images": "verified_images"}
    overrides = {key: getattr(args, attr) for key, attr in names.items() if getattr(args, attr) is not None}
    memory = {key: getattr(args, key) for key in ("port_width", "burst_len", "outstanding", "size_bytes", "latency")
              if getattr(args, key) is not None}
    rate = Fraction(args.bandwidth).limit_denominator(256)
    memory.update(jitter=args.jitter, bandwidth=[rate.numerator, rate.denominator], seed=args.seed % (1 << 32) or 1)
    params = harness_params(config, overrides=overrides, memory=memory, seed=args.seed)
    rows, most = params["rows"], config.model.max_tokens
    params.update(commands=args.commands, patterns=[list(p) for p in DEFAULT_PATTERNS],
                  tokens=sorted({0, 1, rows, rows + 1, most}))
    return build_harness(params), "loader_harness", "moegen.rtl.testbench.loader", params


def _loader_summary(params, reports):
    mem, lay = params["memory"], params["layout"]
    lines = [f"loader hidden={lay[0]} ffn={lay[1]} cols={lay[2]} {lay[3]}:{lay[4]} rows={params['rows']} "
             f"banks={params['loader']['banks']}x{params['loader']['bank_bytes']}B port={mem['port_width']}b "
             f"burst={mem['burst_len']}x{mem['outstanding']} latency={mem['latency']}+0..{mem['jitter']} "
             f"bandwidth={mem['bandwidth'][0]}/{mem['bandwidth'][1]}"]
    for r in reports:
        refused = ", ".join(f"{name.lower()} {count}" for name, count in r["refused"].items()) or "none"
        lines.append(f"  idle {r['idle']:.1f} stall {r['stall']:.1f}: {r['commands']} commands, {r['ok']} ran "
                     f"({r['params_words']} params words, {r['records']} records), refused: {refused}; "
                     f"{len(r['mismatches'])} mismatching streams, {r['cycles']} cycles, "
                     f"{r['status']['bytes_loaded']} bytes, {r['status']['verify_passes']} verify passes")
        lines += [f"    mismatch: {m}" for m in r["mismatches"]]
        lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
        lines += [f"    counter {k}: got {v['got']}, expected {v['want']}" for k, v in r["counter_errors"].items()]
        if not r["finished"]:
            lines.append("    timed out before every command completed")
    return lines


def _link_arguments(parser):
    parser.add_argument("--faults", type=int, default=250, help="injected faults per idle/backpressure pattern")
    parser.add_argument("--port-width", type=int, help="memory word bits (default: the config's memory.port_width)")
    parser.add_argument("--max-payload", type=int, help="largest payload (default: link.max_payload)")
    parser.add_argument("--burst-len", type=int, help="words per read burst (default: memory.burst_len)")
    parser.add_argument("--mem-bytes", type=int, help="device memory bytes (default: four payloads)")
    parser.add_argument("--idle-timeout", type=int, help="cycles of silence that drop a frame (default: 64)")
    parser.add_argument("--queue-words", type=int, help="command FIFO depth in words (default: 16)")


def _link_elaborate(args, config):
    from .rtl.testbench.link import build_harness, harness_params

    if type(args.faults) is not int or not 1 <= args.faults <= 100_000:
        raise ValueError(f"faults must be an integer in 1..100000, not {args.faults!r}")
    overrides = {key: getattr(args, key) for key in ("port_width", "max_payload", "burst_len", "mem_bytes",
                                                      "idle_timeout", "queue_words")
                 if getattr(args, key, None) is not None}
    params = harness_params(args.config, seed=args.seed, faults=args.faults, patterns=DEFAULT_PATTERNS, **overrides)
    return build_harness(params), "link_harness", "moegen.rtl.testbench.link", params


def _link_summary(params, reports):
    p = params
    lines = [f"link ({p['config']}) max_payload={p['max_payload']} port={p['port_width']}b burst={p['burst_len']} "
             f"memory={p['mem_bytes']}B idle_timeout={p['idle_timeout']} queue={p['queue_words']} words"]
    for r in reports:
        faults = ", ".join(f"{name} {count}" for name, count in r["faults"].items())
        lines.append(f"  idle {r['idle']:.1f} stall {r['stall']:.1f}: {r['sent_bytes']} bytes in, "
                     f"{r['response_bytes']} out, {r['frames']} frames, {r['dropped']} dropped, {r['cycles']} cycles; "
                     f"faults: {faults}")
        if r["first_mismatch"]:
            lines.append(f"    first mismatch: {r['first_mismatch']}")
        lines += [f"    error: {e}" for e in r["errors"]]
        lines += [f"    stream rule: {v}" for v in r["stream_violations"]]
    return lines


TARGETS = {
    target.name: target
    for target in (VerifyTarget("requant", _requant_arguments, _requant_elaborate, _requant_summary),
                   VerifyTarget("router", _router_arguments, _router_elaborate, _router_summary),
                   VerifyTarget("array", _array_arguments, _array_elaborate, _array_summary),
                   VerifyTarget("expert", _expert_arguments, _expert_elaborate, _expert_summary),
                   VerifyTarget("loader", _loader_arguments, _loader_elaborate, _loader_summary),
                   VerifyTarget("link", _link_arguments, _link_elaborate, _link_summary),)
}


def run_block(name, args):
    """Elaborate and simulate block ``name``; returns ``(SimResult, params, summary lines)``.

    ``args`` carries the block's options plus ``config`` (file or preset) and ``seed``;
    invalid parameters raise ``ValueError`` naming the parameter.
    """
    target = TARGETS[name]
    config = load_config(args.config)
    component, module, testbench, params = target.elaborate(args, config)
    result = run_cocotb(component, name=module, test_module=testbench, params=params, seed=args.seed)
    return result, params, target.summarize(params, result.reports)

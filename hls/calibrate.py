"""Refit the cycle model's fixed costs (:mod:`moegen.hls.model`'s ``_*_CYCLES``) to the
Verilator harness, after an RTL change moved them.

``python -m moegen.hls.calibrate [CONFIG ...]`` measures the calls of
:func:`~moegen.hls.model.simulated_calls` on each config (default: :data:`CALIBRATION_CONFIGS`,
the configs ``tests/hls/test_model.py`` checks; a harness not built yet takes a few
minutes), then searches the constants by steepest descent (one constant moved at a time,
each within ``--span`` of its value, until no move improves) for the smallest largest
relative error over the calls' busy cycles and the engine's. It prints the error of the constants as they
are, the best set found and its error per config; the model's source is left to the
engineer to edit (the constants carry comments on what each stands for).
"""

import argparse
import sys
from contextlib import contextmanager

from . import model

#: The constants the search moves (each a ``_NAME`` global of :mod:`moegen.hls.model`).
CONSTANTS = ("MEM_ISSUE_CYCLES", "COMMAND_CYCLES", "HEADER_CHECK_CYCLES", "VERIFY_CYCLES", "RUN_START_CYCLES",
             "ENGINE_DRAIN_CYCLES", "H_WAIT_CYCLES", "PIPELINE_DRAIN_CYCLES", "PIPELINE_H_WAIT_CYCLES",
             "STORE_DRAIN_CYCLES")

#: The presets and sweep variants (:data:`~moegen.hls.model.CYCLE_SWEEP`) the model is fitted to.
CALIBRATION_CONFIGS = ("tiny", "default", *model.CYCLE_SWEEP)


def calibration_config(name):
    """A preset or file by ``name``, or a sweep variant of :data:`~moegen.hls.model.CYCLE_SWEEP`;
    an unknown name or a config without the counter registers the calls read is a
    :class:`~moegen.errors.UserError`."""
    from ..config import load_config
    from ..errors import UserError
    from ..host.device import require_counters

    if name in model.CYCLE_SWEEP:
        return model.sweep_config(name)
    try:
        config = load_config(name)
    except UserError as error:
        raise UserError(f"{error}; or a sweep variant: {', '.join(model.CYCLE_SWEEP)}") from None
    require_counters(config, "the cycle model's calibration")
    return config


def current_constants():
    return {name: getattr(model, f"_{name}") for name in CONSTANTS}


@contextmanager
def constants(values):
    """:mod:`moegen.hls.model` with ``values`` (``{name: cycles}``) in place of its constants."""
    saved = current_constants()
    try:
        for name, value in values.items():
            setattr(model, f"_{name}", value)
        yield
    finally:
        for name, value in saved.items():
            setattr(model, f"_{name}", value)


def errors(measured, values):
    """Per config, the largest relative error of the model with ``values`` against ``measured``
    (``{name: (config, simulated_calls(config))}``)."""
    with constants(values):
        return {name: max(max(abs(call), abs(engine)) for *_, call, engine in model.cycle_errors(config, calls))
                for name, (config, calls) in measured.items()}


def search(measured, start, *, span=3):
    """Steepest descent from ``start``: of every single constant moved within ``span`` of its
    start, take the move that lowers the largest error most, until none does. Returns the
    best constants and their largest error."""
    best = dict(start)
    best_error = max(errors(measured, best).values())
    while True:
        moves = [{**best, name: value} for name in CONSTANTS
                 for value in range(max(0, start[name] - span), start[name] + span + 1) if value != best[name]]
        scored = [(max(errors(measured, trial).values()), trial) for trial in moves]
        error, trial = min(scored, key=lambda pair: pair[0], default=(best_error, best))
        if error >= best_error - 1e-12:
            return best, best_error
        best, best_error = trial, error


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moegen.hls.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=list(CALIBRATION_CONFIGS), metavar="CONFIG",
                        help=f"presets, files or sweep variants (default: {' '.join(CALIBRATION_CONFIGS)})")
    parser.add_argument("--span", type=int, default=3, help="cycles each constant may move (default: 3)")
    args = parser.parse_args(argv)
    if args.span < 0:
        parser.error(f"--span must be at least 0, not {args.span}")
    from ..errors import UserError

    try:
        configs = {name: calibration_config(name) for name in args.configs}  # every name, before any build
    except UserError as error:
        parser.error(str(error))
    measured = {}
    for name, config in configs.items():
        print(f"harness calls of {name}", file=sys.stderr, flush=True)
        measured[name] = (config, model.simulated_calls(config))
    now = current_constants()
    best, best_error = search(measured, now, span=args.span)
    as_is, fitted = errors(measured, now), errors(measured, best)
    print(f"largest error: {max(as_is.values()):.2%} as the model stands, {best_error:.2%} with the best constants")
    print(f"{'config':<20} {'as is':>8} {'best':>8}")
    for name in measured:
        print(f"{name:<20} {as_is[name]:>8.2%} {fitted[name]:>8.2%}")
    print("best constants:")
    for name, value in best.items():
        print(f"  _{name} = {value}" + ("" if value == now[name] else f"  (now {now[name]})"))


if __name__ == "__main__":
    main()

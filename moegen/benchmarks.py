"""``moegen bench NAME``: benchmarks live in ``bench/`` (package ``moegen.bench``).

A benchmark module defines ``DESCRIPTION`` (one line), ``add_arguments(parser)`` and
``run(args) -> dict``: the figures, JSON-serializable, ratios side by side. The CLI prints
them as an indented table, or with ``--json`` as one JSON object.
"""

import importlib
import pkgutil

from .errors import UserError

__all__ = ["available", "format_table", "load"]


def available():
    """Names of the benchmarks in ``moegen.bench``."""
    from . import bench

    return sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if not info.name.startswith("_"))


def load(name):
    """The benchmark module ``name``; an unknown name is an error listing the known ones."""
    if name not in available():
        raise UserError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(available())}")
    return importlib.import_module(f"moegen.bench.{name}")


def _shown(value):
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _rows_table(rows, indent):
    """A list of dicts with the same keys as a table with a header row."""
    keys = list(rows[0])
    cells = [keys] + [[_shown(row.get(key, "")) for key in keys] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    return [" " * indent + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]


def format_table(figures, indent=0):
    """Figures as aligned ``key  value`` lines; nested dicts indent under their key, lists of
    dicts become tables."""
    width = max((len(str(key)) for key in figures), default=0)
    lines = []
    for key, value in figures.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines += format_table(value, indent + 2)
        elif isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            lines.append(" " * indent + f"{key}:")
            lines += _rows_table(value, indent + 2)
        else:
            lines.append(" " * indent + f"{key:<{width}}  {_shown(value)}")
    return lines

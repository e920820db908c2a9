"""Benchmarks, run with ``moegen bench NAME [--json]``.

Each module registers one benchmark with :func:`moegen.benchmarks.benchmark`; it returns a
dict of figures that the CLI prints as a table or, with ``--json``, as one JSON object.
"""

"""cocotb testbenches of the RTL blocks, shared by the tests and by ``moegen verify``.

Each module holds a ``TB`` class and its ``@cocotb.test``\\ s for one block; the runner is
:func:`moegen.simulation.run_cocotb`. :mod:`.streams` drives and checks Amaranth streams.
"""

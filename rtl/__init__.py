"""Amaranth components of the accelerator, generated from an :class:`~moegen.AccelConfig`.

* :class:`~moegen.rtl.requant.Requantizer`: int32 accumulators to int8 (the epilogue's core)
"""

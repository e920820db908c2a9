"""Amaranth components of the accelerator, generated from an :class:`~moegen.AccelConfig`.

* :class:`~moegen.rtl.requant.Requantizer`: int32 accumulators to int8 (the epilogue's core)
* :class:`~moegen.rtl.router.TopKRouter`: top-k expert selection and weights in every golden
  routing mode, one token per ``ceil(experts / lanes)`` cycles
* :class:`~moegen.rtl.array.SparseSystolicArray`: M:N structured-sparse output-stationary
  systolic array, weights streamed down the columns
* :class:`~moegen.rtl.epilogue.Epilogue`: requantization, activation table and gated multiply
  of a SwiGLU expert
* :class:`~moegen.rtl.expert.ExpertEngine`: a whole int8 SwiGLU expert on the array and the
  epilogue, fed by the loader's params and weight streams
* :class:`~moegen.rtl.loader.ExpertLoader`: expert images from device memory to those two
  streams: header and CRC-32 checks (a corrupt image never emits), double-buffered banks,
  prefetch of the next command
* :class:`~moegen.rtl.link.LinkEndpoint`: the device side of the framed CRC-32 host link,
  byte-exact with golden's ``LinkModel`` (one byte per cycle each way)
* :mod:`~moegen.rtl.memory`: the burst read port, :class:`~moegen.rtl.memory.SimulatedMemory`
  (latency, jitter, bandwidth), :class:`~moegen.rtl.memory.BlockRAMMemory` for boards and a
  :class:`~moegen.rtl.memory.BurstArbiter`
"""

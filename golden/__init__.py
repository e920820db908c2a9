"""The executable definition of moegen's arithmetic and data formats (PyTorch).

Every RTL block has its reference here; where the hardware is integer, the reference is
bit-exact and is the oracle of the block's tests.

* :mod:`~moegen.golden.formats`: shapes and sizes of the formats (torch-free)
* :mod:`~moegen.golden.quant`: symmetric quantization and integer requantization
* :mod:`~moegen.golden.pack`: M:N pruning, packing and sparse matmul
* :mod:`~moegen.golden.router`: integer top-k routing and its float reference
* :mod:`~moegen.golden.expert`: the integer SwiGLU expert and its float reference
* :mod:`~moegen.golden.image`: expert images (writer and checking reader)
* :mod:`~moegen.golden.moe`: a float MoE block matching Hugging Face's
"""

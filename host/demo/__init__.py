"""A small trained MoE language model shipped with moegen, for offload runs that need no download.

:func:`load_demo` returns a ``MixtralForCausalLM`` over bytes (4 layers of 8 experts, top-2,
hidden 128, expert ffn 256) trained on CPython's standard library sources; :func:`heldout` is
text it never saw, :func:`perplexity` measures it there and :func:`generate` continues a prompt.
``python -m moegen.host.demo.train`` (``make train-demo``) reproduces the checkpoint.
"""

from .corpus import heldout, training_text
from .model import (
    CONTEXT,
    VOCAB_SIZE,
    checkpoint_dir,
    decode,
    demo_config,
    encode,
    expert_usage,
    generate,
    load_demo,
    perplexity,
    unigram_perplexity,
)

__all__ = [
    "CONTEXT", "VOCAB_SIZE", "checkpoint_dir", "decode", "demo_config", "encode", "expert_usage", "generate",
    "heldout", "load_demo", "perplexity", "training_text", "unigram_perplexity",
]

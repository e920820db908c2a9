"""The demo model: a small Mixtral over bytes, its checkpoint, and how it is measured.

The tokenizer is the identity on bytes (vocabulary 256, nothing to download). The model is
transformers' ``MixtralForCausalLM`` with 4 layers of 8 SwiGLU experts (top-2), hidden 128 and
expert ffn 256, so every expert has the shape of the accelerator's experts and the whole model
trains on a laptop CPU in minutes. Its checkpoint (``checkpoint/``, written by ``save_pretrained``
in float16 to stay small) ships with moegen and loads with no network.
"""

import math
from importlib import resources
from itertools import pairwise
from pathlib import Path

import torch
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM
from transformers.utils import logging as hf_logging

__all__ = [
    "CONTEXT", "VOCAB_SIZE", "calibration_ids", "checkpoint_dir", "decode", "demo_config", "encode", "expert_usage",
    "generate", "load_demo", "perplexity", "teacher_forced", "unigram_perplexity",
]

VOCAB_SIZE = 256
CONTEXT = 256


def encode(text):
    """Token ids of ``text`` (``str``, UTF-8 encoded, or ``bytes``): its bytes."""
    return list(text.encode() if isinstance(text, str) else bytes(text))


def decode(ids):
    """The text of token ids, invalid UTF-8 replaced."""
    return bytes(ids).decode(errors="replace")


def demo_config():
    """The demo model's ``MixtralConfig``."""
    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # bytes have no special tokens: generation stops at a length, never at a token
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def calibration_ids(windows=4):
    """Token ids ``[windows, CONTEXT]`` from the start of the training text: what the offload
    plugin and the benches profile and calibrate on."""
    from .corpus import training_text

    return torch.tensor(encode(training_text()[:windows * CONTEXT])).view(windows, CONTEXT)


def checkpoint_dir():
    """The folder of the shipped checkpoint (``config.json``, ``model.safetensors``)."""
    return resources.files(__package__).joinpath("checkpoint")


def load_demo(path=None):
    """The trained demo model from ``path`` (default: the shipped checkpoint), float32, in eval mode."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a few MiB read from disk is only noise
    try:
        with resources.as_file(checkpoint_dir() if path is None else Path(path)) as folder:
            model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.eval()


def _windows(size, context, stride):
    """``(start, skip)`` for each window of ``context`` bytes over ``size`` bytes: the window
    scores its predictions after the first ``skip``, so every byte after the first is scored once."""
    if context < 2:
        raise ValueError(f"context must be at least 2, not {context!r}")
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in 1..{context - 1}, not {stride!r}")
    if size < context:
        raise ValueError(f"data must hold at least context={context} bytes, not {size}")
    starts = list(range(0, size - context + 1, stride))
    if starts[-1] + context < size:
        starts.append(size - context)
    return [(0, 0)] + [(start, previous + context - 1 - start) for previous, start in pairwise(starts)]


@torch.no_grad()
def perplexity(model, data, *, context=CONTEXT, stride=CONTEXT // 2, batch_size=16):
    """Per-byte perplexity of ``model`` on ``data`` (bytes; ``heldout(nbytes)`` for a subset).

    Windows of ``context`` bytes advance by ``stride``; each byte after the first is predicted
    once, with at least ``context - stride`` bytes before it except near the start. The result
    depends only on the model, the data and the arguments (batches run in a fixed order).
    """
    tokens = torch.tensor(encode(data))
    windows = _windows(len(tokens), context, stride)
    total = 0.0
    for index in range(0, len(windows), batch_size):
        batch = windows[index:index + batch_size]
        ids = torch.stack([tokens[start:start + context] for start, _ in batch])
        logprobs = model(input_ids=ids, use_cache=False).logits[:, :-1].log_softmax(-1)
        nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total += sum(nll[row, skip:].sum().item() for row, (_, skip) in enumerate(batch))
    return math.exp(total / (len(tokens) - 1))


def unigram_perplexity(train, data):
    """Per-byte perplexity on ``data`` of the byte frequencies of ``train`` (add-one smoothed):
    the baseline a model that ignores context reaches."""
    counts = torch.bincount(torch.tensor(encode(train)), minlength=VOCAB_SIZE).double() + 1
    logprobs = (counts / counts.sum()).log()
    return math.exp(-logprobs[torch.tensor(encode(data))].mean().item())


@torch.no_grad()
def expert_usage(model, data, *, context=CONTEXT):
    """Tokens routed to each expert on ``data``: a ``[layers, experts]`` tensor of counts
    (every token counts once for each of its top-k experts)."""
    config = model.config
    tokens = torch.tensor(encode(data))
    windows = tokens[:len(tokens) // context * context].view(-1, context)
    if not len(windows):
        raise ValueError(f"data must hold at least context={context} bytes, not {len(tokens)}")
    counts = torch.zeros(config.num_hidden_layers, config.num_local_experts, dtype=torch.long)
    for batch in windows.split(16):
        router_logits = model(input_ids=batch, use_cache=False, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            chosen = logits.topk(config.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(chosen.flatten(), minlength=config.num_local_experts)
    return counts


@torch.no_grad()
def teacher_forced(model, data, steps, *, prompt=64, after_prompt=None):
    """Decode ``steps`` bytes of ``data`` the way generation does (one forward pass a byte,
    with the KV cache) after its first ``prompt`` bytes (one pass), but feed each step the
    true byte: what later steps see does not depend on the model's mistakes. Calls
    ``after_prompt()`` between the prompt and the first step (to count only the steps);
    returns how many steps' greedy choice was the true byte."""
    ids = torch.tensor([encode(data[:prompt + steps + 1])])
    if ids.shape[1] < prompt + steps + 1:
        raise ValueError(f"data holds {ids.shape[1]} bytes; prompt {prompt} and {steps} steps need "
                         f"{prompt + steps + 1}")
    out = model(input_ids=ids[:, :prompt], use_cache=True)
    if after_prompt is not None:
        after_prompt()
    correct = 0
    for i in range(prompt, prompt + steps):
        out = model(input_ids=ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
        correct += int(out.logits[0, -1].argmax() == ids[0, i + 1])
    return correct


@torch.no_grad()
def generate(model, prompt, n):
    """``prompt`` continued by ``n`` greedily chosen bytes, as text."""
    ids = torch.tensor([encode(prompt)])
    config = GenerationConfig(max_new_tokens=n, do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return decode(out[0].tolist())

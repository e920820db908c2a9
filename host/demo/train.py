"""Train the demo model; ``python -m moegen.host.demo.train`` reproduces the shipped checkpoint.

The recipe is fixed and seeded: AdamW over random windows of the training text, linear warm-up
then cosine decay, the language-model loss plus Mixtral's load-balancing loss on the router
logits (``output_router_logits``, weight ``router_aux_loss_coef``), which keeps every expert in
use without forcing them to equal shares. The load-balancing loss is taken per layer and
averaged: transformers' own ``aux_loss`` adds up the tokens of expert ``i`` over all layers,
which lets an expert die in one layer while its namesakes elsewhere make up for it (it did in
every trial run). The same machine gives the same checkpoint to the bit; the run logs its
progress, then the held-out perplexity, how the tokens spread over the experts and a sample.
"""

import argparse
import contextlib
import functools
import math
import time
from pathlib import Path

import torch
from transformers import MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from .corpus import heldout, training_text
from .model import CONTEXT, demo_config, expert_usage, generate, load_demo, perplexity, unigram_perplexity

__all__ = ["STEPS", "train"]

STEPS = 960
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
WARMUP = 30
SEED = 0
# one thread: on a shared 2-core machine an OpenMP barrier waits for whichever of two threads is
# descheduled; under load, 3 steps took 34 s with two threads and 7 s with one (the result
# depends on the thread count, so it is part of the recipe)
THREADS = 1
LOG_EVERY = 10
# the held-out bytes the final report measures perplexity and expert usage on
REPORT_BYTES = 64 * 1024


def _batches(text, *, batch_size, context, seed):
    """Endless batches of ``batch_size`` windows of ``context`` bytes at seeded random offsets."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(data) - context + 1, (batch_size,), generator=generator)
        yield torch.stack([data[start:start + context] for start in starts.tolist()]).long()


def _schedule(step, *, steps, warmup):
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def _deterministic(threads):
    """A fixed thread count and deterministic kernels for the duration, restored afterwards."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def train(out=None, *, steps=STEPS, batch_size=BATCH_SIZE, context=CONTEXT, learning_rate=LEARNING_RATE,
          seed=SEED, threads=THREADS, log=print):
    """Train the demo model for ``steps`` steps and return the loss of each step.

    With ``out``, save the model there in float16 (``save_pretrained``). ``log`` receives a
    progress line every few steps.
    """
    with _deterministic(threads):
        torch.manual_seed(seed)
        config = demo_config()
        model = MixtralForCausalLM(config).train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}],
                                      lr=learning_rate, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _schedule(step, steps=steps, warmup=min(WARMUP, steps)))
        batches = _batches(training_text(), batch_size=batch_size, context=context, seed=seed)
        losses, aux_losses = [], []
        start = mark = time.monotonic()
        for step in range(1, steps + 1):
            ids = next(batches)
            output = model(input_ids=ids, use_cache=False, output_router_logits=True)
            aux_loss = sum(load_balancing_loss_func((logits,), config.num_local_experts, config.num_experts_per_tok)
                           for logits in output.router_logits) / len(output.router_logits)
            loss = model.loss_function(output.logits, ids, config.vocab_size) + config.router_aux_loss_coef * aux_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(loss.item())
            aux_losses.append(aux_loss.item())
            if step % LOG_EVERY == 0 or step == steps:
                now = time.monotonic()
                count = (step - 1) % LOG_EVERY + 1
                rate = count * batch_size * context / (now - mark)
                eta = (now - start) / step * (steps - step)
                log(f"step {step:4d}/{steps}  loss {sum(losses[-count:]) / count:.4f}  "
                    f"aux {sum(aux_losses[-count:]) / count:.3f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                    f"{rate:6.0f} tok/s  eta {eta // 60:.0f}:{eta % 60:02.0f}")
                mark = now
        log(f"trained {steps} steps ({steps * batch_size * context} tokens) in {time.monotonic() - start:.0f} s")
        if out is not None:
            model.to(torch.float16).save_pretrained(out)
    return losses


def report(model, log=print):
    """Log the held-out perplexity against the unigram baseline, the expert usage and a sample."""
    data = heldout(REPORT_BYTES)
    log(f"held-out perplexity {perplexity(model, data):.3f} per byte on {len(data)} bytes "
        f"(unigram baseline {unigram_perplexity(training_text(), data):.2f})")
    usage = expert_usage(model, data)
    log("expert usage (share of routed tokens, %):")
    for layer, counts in enumerate(usage):
        log(f"  layer {layer}: " + " ".join(f"{100 * c / counts.sum():5.1f}" for c in counts.tolist()))
    log("sample: " + repr(generate(model, "def ", 120)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moegen.host.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint",
                        help="folder for config.json and model.safetensors (default: the shipped checkpoint)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    log = functools.partial(print, flush=True)
    started = time.monotonic()
    train(args.out, steps=args.steps, log=log)
    size = sum(path.stat().st_size for path in args.out.iterdir())
    log(f"checkpoint {args.out}: {size / 2**20:.2f} MiB")
    with _deterministic(THREADS):
        report(load_demo(args.out), log)
    log(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

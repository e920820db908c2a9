"""M:N pruning of SwiGLU experts from calibration data, and a short recovery fine-tune.

Three methods, each returning golden :class:`~moegen.golden.expert.ExpertWeights` that satisfy
``m:n`` along every matrix's reduction axis (what ``quantize_expert`` and ``pack_mn`` take):

* ``magnitude``: the ``m`` largest ``|w|`` of every group (golden's ``prune_expert``);
* ``wanda``: the ``m`` largest ``|w| * rms(input channel)`` over the calibration inputs;
* ``sparsegpt``: SparseGPT's one-shot OBS pruning (Frantar and Alistarh, 2023) with the
  calibration Hessian ``H = X^T X / N``: columns are visited left to right; at the first column
  of a group the ``n - m`` weights of least ``w**2 / [H^-1]_jj**2`` are dropped, and each
  dropped weight's error is spread over the columns not yet visited. The gate and up rows use
  the expert's inputs, the down rows the gated activations of the *pruned* gate and up.

The gate and up rows of ``wanda`` and ``sparsegpt`` see the expert's inputs, the down rows its
gated activations. An expert without calibration inputs falls back to ``magnitude``.

:func:`recover` is the optional fine-tune after pruning: the surviving expert weights (the masks
held fixed, pruned weights stay exactly zero) learn to match the unpruned model's next-token
distribution (KL divergence, the teacher's logits) on seeded random windows of training text;
nothing but the experts changes, so the expert images carry the whole result. AdamW, cosine
decay to 0, gradients clipped to 1; deterministic kernels, so a run repeats to the bit on the
same machine and thread count.
"""

import contextlib
import copy
import math

import torch

__all__ = [
    "PRUNE_METHODS", "activation_aware_prune", "obs_prune", "prune", "pruned_copy", "recover", "sparsegpt_prune",
]

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
#: SparseGPT's dampening: this fraction of the mean Hessian diagonal is added to the diagonal.
DAMPENING = 0.01
#: Columns updated together before the lazy update of the columns to the right.
OBS_BLOCK = 128
#: Recovery fine-tune: windows per step and peak learning rate.
RECOVER_BATCH = 8
RECOVER_LEARNING_RATE = 1e-3


def _rms(x, width):
    return x.pow(2).mean(0).sqrt() if len(x) else torch.ones(width)


def _gated(x, gate, up):
    return torch.nn.functional.silu(x @ gate.double().T) * (x @ up.double().T)


def activation_aware_prune(weights, inputs, m, n):
    """Prune a float expert to ``m:n`` keeping, in every group, the weights of largest
    ``|w| * rms(input channel)`` over the calibration ``inputs [N, hidden]`` (Wanda)."""
    from ..golden.expert import ExpertWeights
    from ..golden.pack import prune_mn

    x = inputs.double()
    rx, rh = _rms(x, weights.hidden).float(), _rms(_gated(x, weights.gate, weights.up), weights.ffn).float()
    return ExpertWeights(
        prune_mn(weights.gate, m, n, scores=weights.gate.abs() * rx),
        prune_mn(weights.up, m, n, scores=weights.up.abs() * rx),
        prune_mn(weights.down, m, n, scores=weights.down.abs() * rh),
    )


def _keep_mask(scores, m, n):
    """The ``m`` highest scores of every ``n`` columns of ``scores [rows, n]`` (ties: lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[:, :m], True)


def obs_prune(weight, hessian, m, n, *, dampening=DAMPENING, block=OBS_BLOCK):
    """SparseGPT: ``weight [rows, cols]`` pruned to ``m:n`` along ``cols`` with the layer-wise
    OBS update for the input Hessian ``hessian [cols, cols]`` (float64 inside, the weight's dtype
    out). ``cols`` must be a multiple of ``n``; inputs that are never nonzero drop their weights."""
    from ..golden.formats import check_mn

    check_mn(m, n)
    rows, cols = weight.shape
    if cols % n:
        raise ValueError(f"obs_prune needs the reduction axis ({cols}) to be a multiple of n={n}")
    if block < 1 or block % n:
        raise ValueError(f"obs_prune's block ({block}) must be a positive multiple of n={n}: a group may not "
                         f"straddle two blocks")
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += dampening * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    # the upper Cholesky factor of H^-1: row i holds the OBS update of the columns after i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1, h1 = w[:, start:stop].clone(), hinv[start:stop, start:stop]
        errors = torch.zeros(rows, stop - start, dtype=w.dtype)
        for i in range(stop - start):
            if i % n == 0:
                keep = _keep_mask(w1[:, i:i + n] ** 2 / torch.diag(h1)[i:i + n] ** 2, m, n)
            column = w1[:, i]
            error = torch.where(keep[:, i % n], 0.0, column) / h1[i, i]
            w1[:, i:] -= error[:, None] * h1[i, i:][None, :]
            w1[:, i] = torch.where(keep[:, i % n], w1[:, i], 0.0)
            errors[:, i] = error
        w[:, start:stop] = w1
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return w.to(weight.dtype)


def sparsegpt_prune(weights, inputs, m, n, *, dampening=DAMPENING):
    """Prune a float expert to ``m:n`` with :func:`obs_prune`: gate and up against the Hessian
    of ``inputs [N, hidden]``, down against that of the pruned expert's gated activations."""
    from ..golden.expert import ExpertWeights

    x = inputs.double()
    hessian = x.T @ x / len(x)
    gate, up = (obs_prune(w, hessian, m, n, dampening=dampening) for w in (weights.gate, weights.up))
    h = _gated(x, gate, up)
    return ExpertWeights(gate, up, obs_prune(weights.down, h.T @ h / len(h), m, n, dampening=dampening))


def prune(method, weights, inputs, m, n):
    """``weights`` pruned to ``m:n`` by ``method`` (one of :data:`PRUNE_METHODS`) with the
    calibration ``inputs [N, hidden]``; magnitude where ``inputs`` is empty."""
    from ..golden.expert import prune_expert

    if method not in PRUNE_METHODS:
        raise ValueError(f"prune method must be one of {', '.join(PRUNE_METHODS)}, not {method!r}")
    if method == "magnitude" or not len(inputs):
        return prune_expert(weights, m, n)
    return (activation_aware_prune if method == "wanda" else sparsegpt_prune)(weights, inputs, m, n)


@contextlib.contextmanager
def _deterministic():
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved)


def _windows(ids, *, batch_size, context, generator):
    starts = torch.randint(len(ids) - context + 1, (batch_size,), generator=generator)
    return torch.stack([ids[start:start + context] for start in starts.tolist()])


def recover(student, teacher, ids, *, steps, context, batch_size=RECOVER_BATCH, learning_rate=RECOVER_LEARNING_RATE,
            seed=0):
    """Fine-tune the experts of ``student`` in place for ``steps`` steps toward ``teacher``'s
    next-token distribution on random ``context``-token windows of the 1-D token ids ``ids``
    (seeded by ``seed``); weights that are zero stay zero. Returns the loss of each step."""
    from ..host.offload import experts_modules

    if steps < 1:
        raise ValueError(f"recovery steps must be at least 1, not {steps!r}")
    if len(ids) < context:
        raise ValueError(f"recovery needs at least context={context} token ids, not {len(ids)}")
    params = [p for module in experts_modules(student) for p in (module.gate_up_proj, module.down_proj)]
    if not params:
        raise ValueError(f"{type(student).__name__}: no fused experts modules to fine-tune")
    masks = [p.detach() != 0 for p in params]
    saved = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    try:
        with _deterministic():
            for _ in range(steps):
                batch = _windows(ids, batch_size=batch_size, context=context, generator=generator)
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits.float().log_softmax(-1).flatten(0, 1)
                logprobs = student(input_ids=batch, use_cache=False).logits.float().log_softmax(-1).flatten(0, 1)
                loss = torch.nn.functional.kl_div(logprobs, target, log_target=True, reduction="batchmean")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                with torch.no_grad():
                    for p, mask in zip(params, masks, strict=True):
                        p.mul_(mask)
                losses.append(loss.item())
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    return losses


def pruned_copy(model, experts):
    """A deep copy of ``model`` with the float experts ``experts[layer][e]`` (ExpertWeights)."""
    from ..host.offload import experts_modules

    copied = copy.deepcopy(model)
    with torch.no_grad():
        for module, layer in zip(experts_modules(copied), experts, strict=True):
            for e, weights in enumerate(layer):
                module.gate_up_proj[e] = torch.cat([weights.gate, weights.up]).to(module.gate_up_proj.dtype)
                module.down_proj[e] = weights.down.to(module.down_proj.dtype)
    return copied

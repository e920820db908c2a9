"""Workloads for the whole device: memory contents and commands, with golden's expectations.

A :class:`Workload` lays out expert images, activation buffers, routing tables and logits in
device memory, lists commands that use them, and runs them on
:class:`~moegen.golden.device.DeviceModel` for the expected memory, ``ERROR`` and ``FENCE``.
Tests of the command processor, of the top on Verilator and of the host driver share it.
"""

import random

import torch

from ...golden.device import (
    ALIGN,
    WEIGHT_ONE,
    Command,
    DeviceModel,
    activation_bytes,
    encode_command,
    pack_table,
    route_words,
    words_bytes,
    x_words,
)
from ...golden.expert import expert_int, quantize_activations
from ...golden.formats import align_up
from ...golden.image import write_image
from ...golden.router import route
from .loader import make_expert


class Workload:
    """Expert runs and routing on ``config``'s device, laid out from address 0.

    Members
    -------
    writes : list of (addr, bytes)
        What the host writes into device memory first.
    commands : list of list of int
        Command words, in order.
    outputs : list of (addr, nbytes)
        Buffers the commands write (route results, stored accumulators).
    model : DeviceModel
        After running everything: the expected device state.
    """

    def __init__(self, config, *, seed=0, experts=2, runs=3, route_tokens=3, errors=False):
        rng = random.Random(seed)
        model = config.model
        self.config = config
        self.writes, self.commands, self.outputs = [], [], []
        cursor = 0

        def place(data):
            nonlocal cursor
            addr = cursor
            self.writes.append((addr, bytes(data)))
            cursor = align_up(cursor + len(data), ALIGN)
            return addr

        def reserve(nbytes):
            nonlocal cursor
            addr = cursor
            cursor = align_up(cursor + nbytes, ALIGN)
            self.outputs.append((addr, nbytes))
            return addr

        images = []
        for e in range(experts):
            qe = make_expert(config.image_layout, seed * 100 + e)
            images.append(place(write_image(qe, config_hash=config.device_hash, expert_id=e)))
        rows_used = min(model.max_tokens, 4)
        self.commands.append(encode_command(Command.ACC_CLEAR, rows_used))
        for run in range(runs):
            tokens = rng.randrange(1, min(model.max_tokens, rows_used) + 1)
            gen = torch.Generator().manual_seed(seed * 1000 + run)
            x = torch.randn(tokens, model.hidden, generator=gen) * (1 + torch.rand(tokens, 1, generator=gen))
            x_q, mult, shift, _ = quantize_activations(x, config.array.act_width)
            x_addr = place(activation_bytes(x_q, mult, shift))
            rows = rng.sample(range(rows_used), tokens)
            weights = [rng.randrange(1 << 15) for _ in range(tokens)]
            table_addr = place(pack_table(rows, weights))
            expert = rng.randrange(experts)
            self.commands.append(encode_command(Command.RUN_EXPERT, images[expert], expert | tokens << 16, x_addr,
                                                table_addr))
        r = config.router
        logits = [rng.randrange(-(1 << (r.logit_width - 1)), 1 << (r.logit_width - 1)) & 0xFFFFFFFF
                  for _ in range(route_tokens * r.experts)]
        logits_addr = place(words_bytes(logits))
        for layer in range(min(2, model.layers)):
            out = reserve(4 * route_tokens * route_words(r.k_max))
            self.commands.append(encode_command(Command.ROUTE, layer, route_tokens, logits_addr, out))
        store = reserve(4 * rows_used * model.hidden)
        self.commands.append(encode_command(Command.ACC_STORE, store, rows_used))
        self.commands.append(encode_command(Command.FENCE, 0xC0FFEE00 | seed & 0xFF))
        if errors:
            self.commands.append(encode_command(Command.RUN_EXPERT, images[0] + 8, 0 | 1 << 16, 0, 0))
            self.commands.append(encode_command(Command.FENCE, 1))  # discarded
        self.x_words = x_words(model.hidden)
        self.end = cursor
        if cursor > config.memory.size_bytes:
            raise ValueError(f"workload needs {cursor} bytes, the device has {config.memory.size_bytes}")
        self.model = DeviceModel(config)
        for addr, data in self.writes:
            self.model.mem[addr:addr + len(data)] = data
        self.model.submit([w for command in self.commands for w in command])

    def expected(self, addr, nbytes):
        return bytes(self.model.mem[addr:addr + nbytes])

    def run_on(self, device):
        """Run the workload through a connected :class:`moegen.host.Device`; returns the
        addresses of output buffers that differ from golden (empty when all match)."""
        from ...host.device import DeviceError

        for addr, data in self.writes:
            device.write_mem(addr, data)
        try:
            device.execute(self.commands)
        except DeviceError:
            if not self.model.error:
                raise
        return [addr for addr, nbytes in self.outputs if device.read_mem(addr, nbytes) != self.expected(addr, nbytes)]


def random_tokens(config, tokens, seed):
    """``tokens`` random activations quantized for ``config``: ``(x_q, tok_mult, tok_shift)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, config.model.hidden, generator=gen)
    return quantize_activations(x, config.array.act_width)[:3]


def check_device_matches_golden(device, config, seed=0):
    """Upload two experts, run one alone and both accumulated, route: all bit-exact with
    golden (raises AssertionError naming what differs)."""
    experts = [make_expert(config.image_layout, seed + e) for e in range(2)]
    handles = [device.upload_expert(write_image(qe, config_hash=config.device_hash, expert_id=e), expert=e)
               for e, qe in enumerate(experts)]
    tokens = min(3, config.model.max_tokens)
    x_q, mult, shift = random_tokens(config, tokens, seed)
    y = device.run_expert(handles[1], x_q, mult, shift)
    assert torch.equal(y, expert_int(x_q, mult, shift, experts[1])), "run_expert differs from expert_int"

    weights = [[WEIGHT_ONE // 3, WEIGHT_ONE, 7][:tokens], [WEIGHT_ONE - 1, 0, 12345][:tokens]]
    rows = [list(range(tokens)), list(reversed(range(tokens)))]
    acc = device.run_experts([(h, x_q, mult, shift, r, w) for h, r, w in zip(handles, rows, weights, strict=True)],
                             tokens)
    expected = torch.zeros(tokens, config.model.hidden, dtype=torch.int64)
    for qe, r, w in zip(experts, rows, weights, strict=True):
        expected[r] += torch.tensor(w)[:, None] * expert_int(x_q, mult, shift, qe)
    assert torch.equal(acc, expected), "run_experts accumulator differs from golden"

    r = config.router
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-(1 << (r.logit_width - 1)), 1 << (r.logit_width - 1), (5, r.experts), generator=gen)
    device.set_k(0, 1)
    got = device.route(logits, layer=0)
    want = route(logits, k=1, mode=r.mode, logit_frac=r.logit_frac, weight_width=r.weight_width)
    assert torch.equal(got.indices[:, :1], want.indices) and torch.equal(got.weights[:, :1], want.weights)
    assert (got.indices[:, 1:] == -1).all()
    device.set_k(0, r.k_max)

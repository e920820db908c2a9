import random

import pytest
import torch
from amaranth.sim import Simulator

from moegen.golden.quant import requantize
from moegen.rtl.epilogue import Epilogue, Projection


def _signed(value, bits):
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


class Case:
    """Random parameters and result rows for an epilogue with ``cols`` lanes, and golden's
    answers: ``h`` for up rows (after their gate row) and ``y`` for down rows."""

    def __init__(self, *, cols, hidden, ffn, tokens, act_width, seed):
        rng = random.Random(seed)
        self.cols, self.act_width = cols, act_width
        self.ffn_tiles, self.hidden_tiles = -(-ffn // cols), -(-hidden // cols)

        def factors(count):
            return [(rng.randrange(1 << 15), rng.randrange(12, 32)) for _ in range(count)]

        self.gate, self.up, self.down = factors(ffn), factors(ffn), factors(hidden)
        self.gated = (rng.randrange(1 << 31), rng.randrange(20, 40))
        qmax = (1 << (act_width - 1)) - 1
        self.table = [rng.randrange(-qmax, qmax + 1) for _ in range(1 << act_width)]
        self.tokens = factors(tokens)
        self.params = [m | s << 16 for m, s in self.gate + self.up + self.down] + list(self.gated)
        self.params += [sum((self.table[4 * w + b] & 0xFF) << (8 * b) for b in range(4))
                        for w in range(len(self.table) // 4)]
        self.rows, self.h, self.y = [], [], []
        activations = {}
        for tag, (kind, token, tile) in enumerate(self._schedule(rng, tokens)):
            acc = [rng.randrange(-(1 << 20), 1 << 20) for _ in range(cols)]
            self.rows.append((acc, kind, token, tile, tag))
            if kind == Projection.DOWN:
                self.y.append((self._requant(acc, self.down, None, tile), token, tile * cols, tag))
            elif kind == Projection.GATE:
                gate = self._requant(acc, self.gate, token, tile)
                activations[token, tile] = [self.table[g & ((1 << act_width) - 1)] for g in gate]
            else:
                up = self._requant(acc, self.up, token, tile)
                h = requantize(torch.tensor(activations[token, tile]) * torch.tensor(up), *self.gated, act_width)
                self.h.append((tuple(h.tolist()), tag))

    def _schedule(self, rng, tokens):
        """Gate rows of a tile for every token, then its up rows, then down rows; sometimes
        an up row right behind its own gate row."""
        for tile in range(self.ffn_tiles):
            later = []
            for token in range(tokens):
                yield Projection.GATE, token, tile
                if rng.random() < 0.3:
                    yield Projection.UP, token, tile
                else:
                    later.append(token)
            yield from ((Projection.UP, token, tile) for token in later)
        for tile in range(self.hidden_tiles):
            yield from ((Projection.DOWN, token, tile) for token in range(tokens))

    def _requant(self, acc, channel, token, tile):
        out = []
        for lane, value in enumerate(acc):
            channel_index = tile * self.cols + lane
            mult, shift = channel[channel_index] if channel_index < len(channel) else (0, 0)
            if token is not None:
                tok_mult, tok_shift = self.tokens[token]
                mult, shift = mult * tok_mult, shift + tok_shift
            out.append(int(requantize(value, mult, shift, self.act_width)))
        return tuple(out)


def simulate(dut, case, *, idle, stall, seed):
    rng = random.Random(seed)
    h, y = [], []
    aw, cols = case.act_width, case.cols

    async def feed(ctx):
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        for token, (mult, shift) in enumerate(case.tokens):
            ctx.set(dut.factors.payload.token, token)
            ctx.set(dut.factors.payload.factor, {"mult": mult, "shift": shift})
            ctx.set(dut.factors.valid, 1)
            await ctx.tick()
        ctx.set(dut.factors.valid, 0)
        for word in case.params:
            ctx.set(dut.params.payload, word)
            ctx.set(dut.params.valid, 1)
            await ctx.tick().until(dut.params.ready)
        ctx.set(dut.params.valid, 0)
        for acc, kind, token, tile, tag in case.rows:
            while rng.random() < idle:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
            for lane, value in enumerate(acc):
                ctx.set(dut.i.payload.acc[lane], value)
            ctx.set(dut.i.payload.kind, kind)
            ctx.set(dut.i.payload.token, token)
            ctx.set(dut.i.payload.tile, tile)
            ctx.set(dut.i.payload.tag, tag)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def collect(ctx):
        while len(h) < len(case.h) or len(y) < len(case.y):
            ctx.set(dut.h.ready, rng.random() >= stall)
            ctx.set(dut.y.ready, rng.random() >= stall)
            _, _, hv, hr, hp, yv, yr, yp = await ctx.tick().sample(
                dut.h.valid, dut.h.ready, dut.h.payload.as_value(), dut.y.valid, dut.y.ready, dut.y.payload.as_value())
            if hv and hr:
                h.append((tuple(_signed(hp >> (aw * lane), aw) for lane in range(cols)),
                          hp >> (aw * cols)))
            if yv and yr:
                lay = dut.y.payload.shape()
                y.append((tuple(_signed(yp >> (lay["values"].offset + aw * lane), aw) for lane in range(cols)),
                          (yp >> lay["token"].offset) & ((1 << lay["token"].shape.width) - 1),
                          (yp >> lay["channel"].offset) & ((1 << lay["channel"].shape.width) - 1),
                          yp >> lay["tag"].offset))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feed)
    sim.add_testbench(collect)
    sim.run()
    return h, y


@pytest.mark.parametrize(("cols", "hidden", "ffn", "tokens", "act_width", "pipeline"), [
    (2, 4, 6, 3, 8, True),
    (2, 4, 6, 3, 8, False),   # no register after the activation read
    (3, 7, 5, 4, 8, True),    # tiles past hidden and ffn: padded lanes have factor 0
    (1, 2, 3, 2, 4, False),   # narrow activations: a 16-entry table in 4 words
])
def test_matches_golden_requant_table_and_gated_multiply(cols, hidden, ffn, tokens, act_width, pipeline):
    case = Case(cols=cols, hidden=hidden, ffn=ffn, tokens=tokens, act_width=act_width, seed=cols + hidden)
    dut = Epilogue(cols=cols, hidden=hidden, ffn=ffn, max_tokens=tokens, acc_width=24, act_width=act_width,
                   tag_width=8, pipeline=pipeline)
    h, y = simulate(dut, case, idle=0.3, stall=0.4, seed=ffn)
    assert h == case.h
    assert y == case.y


def test_single_token_factor_in_a_register():
    """max_tokens 1 keeps the token factor in a register, not a memory."""
    case = Case(cols=2, hidden=4, ffn=6, tokens=1, act_width=8, seed=11)
    dut = Epilogue(cols=2, hidden=4, ffn=6, max_tokens=1, acc_width=24, act_width=8, tag_width=8)
    h, y = simulate(dut, case, idle=0.3, stall=0.4, seed=12)
    assert h == case.h
    assert y == case.y


def test_waits_for_all_parameters():
    case = Case(cols=2, hidden=2, ffn=2, tokens=1, act_width=8, seed=5)
    dut = Epilogue(cols=2, hidden=2, ffn=2, max_tokens=1, acc_width=24, act_width=8)
    seen = []

    async def bench(ctx):
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload.kind, Projection.DOWN)
        for word in case.params:
            seen.append((ctx.get(dut.i.ready), ctx.get(dut.loaded)))
            ctx.set(dut.params.payload, word)
            ctx.set(dut.params.valid, 1)
            await ctx.tick()
        seen.append((ctx.get(dut.i.ready), ctx.get(dut.loaded)))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen[:-1] == [(0, 0)] * len(case.params) and seen[-1] == (1, 1)
    assert dut.param_words == len(case.params) == 2 * 2 + 2 + 2 + 64

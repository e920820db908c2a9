import pytest
import torch

from moegen.config import load_config
from moegen.golden.device import (
    WEIGHT_ONE,
    Command,
    CommandError,
    DeviceModel,
    ErrorSource,
    activation_bytes,
    encode_command,
    pack_table,
    route_words,
    words_bytes,
)
from moegen.golden.expert import expert_int, quantize_activations
from moegen.golden.image import ImageErrorCode, write_image
from moegen.golden.router import route
from moegen.rtl.testbench.loader import make_expert


def test_encode_command_pads_and_checks_words():
    assert encode_command(Command.FENCE, 7) == [5, 7, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"command word 1 must lie in 0\.\.2\*\*32-1, not -1"):
        encode_command(Command.FENCE, -1)
    with pytest.raises(ValueError, match="at most 7 arguments"):
        encode_command(Command.NOP, *range(8))


def test_route_writes_counts_and_slots_with_the_layer_k():
    config = load_config("tiny")
    r = config.router
    device = DeviceModel(config)
    logits = torch.randint(-3000, 3000, (3, r.experts), generator=torch.Generator().manual_seed(1))
    device.mem[0:4 * logits.numel()] = words_bytes(logits.reshape(-1))
    device.k[1] = 1
    device.submit(encode_command(Command.ROUTE, 1, 3, 0, 256))
    indices, weights, counts = DeviceModel.unpack_routes(device.mem[256:], 3, r.k_max)
    want = route(logits, k=1, mode=r.mode, logit_frac=r.logit_frac, weight_width=r.weight_width)
    assert counts.tolist() == [1, 1, 1]
    assert indices[:, 0].tolist() == want.indices[:, 0].tolist()
    assert weights[:, 0].tolist() == want.weights[:, 0].tolist()
    assert (indices[:, 1:] == 0).all() and (weights[:, 1:] == 0).all()
    assert route_words(r.k_max) == 1 + r.k_max and device.routed_tokens == 3


def test_run_expert_accumulates_weighted_outputs_and_wraps_int32():
    config = load_config("tiny")
    qe = make_expert(config.image_layout, 4)
    device = DeviceModel(config)
    image = write_image(qe, config_hash=config.device_hash, expert_id=3)
    device.mem[0:len(image)] = image
    x = torch.randn(2, config.model.hidden, generator=torch.Generator().manual_seed(2))
    x_q, mult, shift, _ = quantize_activations(x)
    x_addr, table_addr = 4096, 8192
    x_bytes = activation_bytes(x_q, mult, shift)
    device.mem[x_addr:x_addr + len(x_bytes)] = x_bytes
    device.mem[table_addr:table_addr + 8] = pack_table([2, 0], [WEIGHT_ONE, 3])
    device.acc[2] = 2**31 - 1
    run = encode_command(Command.RUN_EXPERT, 0, 3 | 2 << 16, x_addr, table_addr)
    device.submit(run)
    y = expert_int(x_q, mult, shift, qe).numpy()
    total = (2**31 - 1) + WEIGHT_ONE * y[0]
    assert (device.acc[2] == (total + 2**31) % 2**32 - 2**31).all()
    assert (device.acc[0] == 3 * y[1]).all() and device.error == 0
    device.submit(encode_command(Command.RUN_EXPERT, 0, 4 | 2 << 16, x_addr, table_addr))
    assert device.error == ErrorSource.LOADER << 8 | ImageErrorCode.EXPERT_MISMATCH


@pytest.mark.parametrize(("words", "code"), [
    (encode_command(200), CommandError.BAD_OPCODE),
    (encode_command(Command.ROUTE, 2, 1, 0, 0), CommandError.BAD_LAYER),
    (encode_command(Command.ROUTE, 0, 0x10000, 0, 0), CommandError.BAD_COUNT),
    (encode_command(Command.ROUTE, 0, 1, 0, 65536 - 32), CommandError.BAD_ADDRESS),
    (encode_command(Command.RUN_EXPERT, 0, 5 << 16, 0, 0), CommandError.BAD_COUNT),
    (encode_command(Command.RUN_EXPERT, 0, 1 << 16, 64, 128), None),
    (encode_command(Command.ACC_CLEAR, 0), CommandError.BAD_COUNT),
    (encode_command(Command.ACC_STORE, 65536, 1), CommandError.BAD_ADDRESS),
])
def test_errors_stop_the_queue_until_cleared(words, code):
    config = load_config("tiny")
    device = DeviceModel(config)
    device.mem[128:132] = pack_table([9], [1])  # a row past max_tokens (4)
    device.submit(words + encode_command(Command.FENCE, 9))
    expected = ErrorSource.COMMAND << 8 | (code or CommandError.BAD_ROW)
    assert (device.error, device.fence, device.commands) == (expected, 0, 0)
    device.clear_error()
    device.submit(encode_command(Command.FENCE, 9))
    assert (device.error, device.fence) == (0, 9)

"""The C device driver with the generated header: one expert through the link, against golden."""

import dataclasses
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from moegen.config import load_config
from moegen.generate import firmware_files
from moegen.golden.device import WEIGHT_ONE, Command, DeviceModel, activation_bytes, encode_command, pack_table
from moegen.golden.expert import quantize_activations
from moegen.golden.image import write_image
from moegen.host.device import model_link
from moegen.host.link import serve_model
from moegen.rtl.testbench.loader import make_expert

FIRMWARE = Path(__file__).parents[2] / "firmware"
CFLAGS = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O2"]


def build_device_check(config, folder):
    """Generate ``moegen_regs.h`` for ``config`` and compile the check program against it."""
    for name, text in firmware_files(config).items():
        (folder / name).write_text(text)
    exe = folder / "device_check"
    subprocess.run(["cc", *CFLAGS, f"-I{FIRMWARE}", f"-I{folder}", str(FIRMWARE / "moegen_link.c"),
                    str(FIRMWARE / "moegen_device.c"), str(Path(__file__).parent / "device_check.c"), "-o", str(exe)],
                   check=True)
    return exe


def expert_job(config, seed, *, expert=2, tokens=3):
    """The job file of device_check and golden's accumulator bytes."""
    tokens = min(tokens, config.model.max_tokens)
    qe = make_expert(config.image_layout, seed)
    image = write_image(qe, config_hash=config.device_hash, expert_id=expert)
    x = torch.randn(tokens, config.model.hidden, generator=torch.Generator().manual_seed(seed))
    x_q, mult, shift, _ = quantize_activations(x)
    x_bytes = activation_bytes(x_q, mult, shift)
    table = pack_table(reversed(range(tokens)), [WEIGHT_ONE - 7 * t for t in range(tokens)])
    port = config.memory.port_width // 8
    placed, cursor = [], 0
    for data in (image, x_bytes, table):
        data += bytes(-len(data) % port)
        placed.append((cursor, data))
        cursor += -(-len(data) // 64) * 64
    out = cursor
    model = DeviceModel(config)
    for addr, data in placed:
        model.mem[addr:addr + len(data)] = data
    (image_addr, _), (x_addr, _), (table_addr, _) = placed
    model.submit(encode_command(Command.ACC_CLEAR, tokens)
                 + encode_command(Command.RUN_EXPERT, image_addr, expert | tokens << 16, x_addr, table_addr)
                 + encode_command(Command.ACC_STORE, out, tokens))
    assert model.error == 0
    expected = bytes(model.mem[out:out + 4 * tokens * config.model.hidden])
    job = struct.pack("<I", len(placed))
    job += b"".join(struct.pack("<II", addr, len(data)) + data for addr, data in placed)
    job += struct.pack("<7I", image_addr, expert, tokens, x_addr, table_addr, out, len(expected)) + expected
    return job


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_c_driver_runs_an_expert_on_the_model_device(tmp_path, name):
    config = load_config(name)
    exe = build_device_check(config, tmp_path)
    (tmp_path / "job").write_bytes(expert_job(config, seed=7))
    transport, _ = model_link(config)
    thread = serve_model(tmp_path / "dev.sock", transport.model)
    proc = subprocess.run([str(exe), str(tmp_path / "dev.sock"), str(tmp_path / "job")], capture_output=True,
                          text=True, timeout=120, check=False)
    thread.join(timeout=5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: 3 tokens")


def test_c_driver_refuses_a_device_of_another_config(tmp_path):
    config = load_config("tiny")
    exe = build_device_check(config, tmp_path)
    (tmp_path / "job").write_bytes(expert_job(config, seed=7))
    other = dataclasses.replace(config, array=dataclasses.replace(config.array, m=1))
    transport, _ = model_link(other)
    thread = serve_model(tmp_path / "dev.sock", transport.model)
    proc = subprocess.run([str(exe), str(tmp_path / "dev.sock"), str(tmp_path / "job")], capture_output=True,
                          text=True, timeout=60, check=False)
    thread.join(timeout=5)
    assert proc.returncode == 2
    assert "register 0x008 differs" in proc.stderr and "built from another config" in proc.stderr


@pytest.mark.verilator
def test_c_driver_runs_an_expert_on_the_harness(tmp_path):
    from moegen.host.sim import build, launch

    config = load_config("tiny")
    exe = build_device_check(config, tmp_path)
    (tmp_path / "job").write_bytes(expert_job(config, seed=8))
    with launch(build(config)) as harness:
        proc = subprocess.run([str(exe), harness.socket, str(tmp_path / "job")], capture_output=True, text=True,
                              timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: 3 tokens")

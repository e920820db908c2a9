"""The host driver on the Verilator harness: bit-exact against golden, faults, identity."""

import dataclasses
import os
import pty
import select
import socket
import threading
import time
import tty

import pytest

from moegen.config import load_config
from moegen.host.device import DeviceMismatch, open_device
from moegen.host.link import ByteFaults, FaultyTransport, LinkTimeout
from moegen.host.sim import build, launch
from moegen.rtl.testbench.device import Workload, check_device_matches_golden

pytestmark = pytest.mark.verilator


@pytest.fixture(scope="module")
def tiny_harness():
    config = load_config("tiny")
    with launch(build(config)) as harness:
        yield config, harness


def test_driver_on_the_harness_matches_golden_on_tiny(tiny_harness):
    config, harness = tiny_harness
    with open_device(config, "sim", address=harness.socket) as device:
        check_device_matches_golden(device, config, seed=3)
        work = Workload(config, seed=4, errors=True)
        assert work.run_on(device) == []
        counters = device.counters()
        assert counters["CYCLES"] > 0 and counters["ENGINE_STEPS"] > 0 and counters["LINK_DROPPED"] == 0


def test_a_device_of_another_config_is_refused_by_name(tiny_harness):
    config, harness = tiny_harness
    other = dataclasses.replace(config, name="other", array=dataclasses.replace(config.array, m=1))
    with pytest.raises(DeviceMismatch, match=r"CONFIG_HASH register reads 0x[0-9a-f]{8}, config 'other'"):
        open_device(other, "sim", address=harness.socket)


def test_a_thousand_link_faults_never_corrupt_silently_or_hang(tiny_harness):
    config, harness = tiny_harness
    faults = ByteFaults(0.25, seed=9)
    with open_device(config, "sim", address=harness.socket, timeout=0.05, retries=40) as device:
        device.link.transport = FaultyTransport(device.link.transport, faults)
        start = time.monotonic()
        rounds = 0
        while faults.total < 1000:
            work = Workload(config, seed=rounds % 3, experts=1, runs=1, route_tokens=1)
            assert work.run_on(device) == [], f"silent corruption in round {rounds}"
            rounds += 1
        assert time.monotonic() - start < 600
        assert device.link.stats["retries"] > 0 and min(faults.injected.values()) > 0


@pytest.mark.slow
def test_driver_on_the_harness_matches_golden_on_default():
    config = load_config("default")
    with launch(build(config)) as harness, open_device(config, "sim", address=harness.socket) as device:
        check_device_matches_golden(device, config, seed=5)


def test_a_harness_that_dies_mid_session_times_out_in_bounded_time():
    config = load_config("tiny")
    harness = launch(build(config))
    device = open_device(config, "sim", address=harness.socket, timeout=0.05, retries=3)
    harness.stop()
    start = time.monotonic()
    with pytest.raises((LinkTimeout, OSError)):
        device.counters()
    assert time.monotonic() - start < 5
    device.close()


def _bridge(master, sock, stop):
    """Copy bytes between a pty's master side and the harness socket until ``stop`` is set."""
    while not stop.is_set():
        ready, _, _ = select.select([master, sock], [], [], 0.05)
        if master in ready:
            sock.sendall(os.read(master, 4096))
        if sock in ready:
            data = sock.recv(4096)
            if not data:
                return
            os.write(master, data)


def test_the_serial_transport_over_a_pty_bridged_to_the_harness(tiny_harness):
    config, harness = tiny_harness
    master, slave = pty.openpty()
    tty.setraw(slave)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(harness.socket)
    stop = threading.Event()
    bridge = threading.Thread(target=_bridge, args=(master, sock, stop), daemon=True)
    bridge.start()
    try:
        with open_device(config, "serial", address=os.ttyname(slave), timeout=0.5) as device:
            check_device_matches_golden(device, config, seed=6)
    finally:
        stop.set()
        bridge.join(timeout=5)
        sock.close()
        os.close(master)
        os.close(slave)


def test_block_mode_on_the_harness_equals_golden_block(tiny_harness):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from moegen.host.offload import offload

    config, harness = tiny_harness
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                             num_local_experts=4, num_experts_per_tok=2)).eval()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    calibration = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    golden = offload(model, None, block=True, calibration=calibration, config=config)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    golden.remove()
    with open_device(config, "sim", address=harness.socket) as device:
        device.reset()
        handle = offload(model, device, block=True, calibration=calibration)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        handle.remove()
        assert device.counters()["ROUTED_TOKENS"] == 2 * 10  # every token of both layers routed there
    assert torch.equal(got, expected)
    assert handle.telemetry.totals().fallbacks == 0 and sum(handle.telemetry.routed_tokens) == 20

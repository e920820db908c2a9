import dataclasses

import pytest

from moegen.config import DeviceConfig, load_config
from moegen.errors import UserError
from moegen.golden.image import write_image
from moegen.host.device import Device, DeviceError, DeviceMismatch, open_device, require_counters
from moegen.host.link import LinkClient
from moegen.rtl.testbench.device import check_device_matches_golden, random_tokens
from moegen.rtl.testbench.loader import make_expert


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_driver_on_the_model_matches_golden(name):
    config = load_config(name)
    with open_device(config, "model") as device:
        check_device_matches_golden(device, config)
        assert device.counters()["COMMANDS"] > 0


def test_driver_on_a_config_without_counters_runs_and_says_why_it_has_no_counters():
    config = dataclasses.replace(load_config("tiny"), device=DeviceConfig(counters=False))
    with open_device(config, "model") as device:
        check_device_matches_golden(device, config)
        with pytest.raises(UserError, match=r"config 'tiny' has no counter registers \(device.counters: false\)"):
            device.counters()
        with pytest.raises(UserError, match="unknown register 'CYCLES'"):
            device.read_reg("CYCLES")
    with pytest.raises(UserError, match=r"config 'tiny' has no counter registers .* which moegen bench sim reads"):
        require_counters(config, "moegen bench sim")


def test_driver_refuses_a_device_built_from_another_config():
    config = load_config("tiny")
    other = dataclasses.replace(config, array=dataclasses.replace(config.array, m=1))
    with open_device(config, "model") as device:
        stranger = Device(other, LinkClient(device.link.transport, max_payload=config.link.max_payload))
        with pytest.raises(DeviceMismatch, match=r"CONFIG_HASH register reads 0x[0-9a-f]{8}, config 'tiny' is"):
            stranger.connect()


def test_driver_rejects_bad_images_and_arguments_by_name():
    config = load_config("tiny")
    qe = make_expert(config.image_layout, 1)
    with open_device(config, "model") as device:
        wrong_hash = write_image(qe, config_hash=config.device_hash ^ 1, expert_id=0)
        with pytest.raises(DeviceError, match="expert 0 refused: hash_mismatch"):
            device.upload_expert(wrong_hash, expert=0)
        good = write_image(qe, config_hash=config.device_hash, expert_id=0)
        with pytest.raises(DeviceError, match="expert_mismatch"):
            device.upload_expert(good, expert=1)
        handle = device.upload_expert(good, expert=0)
        x_q, mult, shift = random_tokens(config, 2, 0)
        with pytest.raises(UserError, match=r"table rows must be 2 distinct values in 0\.\.1"):
            device.run_experts([(handle, x_q, mult, shift, [0, 0], [1, 1])], 2)
        with pytest.raises(UserError, match=r"rows must lie in 1\.\.4"):
            device.run_experts([], 9)
        with pytest.raises(UserError, match="unknown register 'NOPE'"):
            device.read_reg("NOPE")
        # the image changed in device memory behind the driver's back: the device refuses it
        device.write_mem(handle.addr + 128, bytes(64))
        with pytest.raises(DeviceError, match="expert image refused: BAD_PAYLOAD_CRC"):
            device.run_expert(handle, x_q, mult, shift)
        assert device.read_reg("ERROR") == 0  # the driver cleared it
        while True:
            try:
                device.upload_expert(good, expert=0)
            except DeviceError as error:
                assert "device memory is full" in str(error)
                break

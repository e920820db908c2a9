"""``make sim``'s job end to end on the default config, shortened (held-out text and
generation): the harness, the demo, the policy split and block mode."""

import json

import pytest

from moegen.cli import main

pytestmark = [pytest.mark.verilator, pytest.mark.slow]


def test_the_main_job_is_bit_identical_to_its_host_references(capsys, tmp_path):
    plot = tmp_path / "sim.png"
    assert main(["sim", "demo", "--heldout", "256", "--generate", "8", "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["offloaded_equals_reference"] is True
    assert report["experts_on_device"] == 4 * 6  # 2 of 8 experts per layer hot, 4 layers
    p = report["perplexity"]
    assert p["offloaded"] == p["int8_reference"]
    block = report["block"]
    assert block["equals_reference"] is True and block["experts_on_device"] == 32
    assert block["routed_tokens"] == 4 * 256  # one window of 256 bytes, in each layer
    assert block["routing_agreement"] >= 0.98  # fixed-point logits flip only near-ties
    assert report["device_cycles"] > 0 and report["modeled"]["uart-3m"]["device_calls"] > 0
    assert plot.stat().st_size > 1000

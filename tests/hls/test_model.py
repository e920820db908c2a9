"""The analytic models of hls/model.py against the Verilator harness (cycles, within 5%) and
yosys synthesis (resources, within 15%)."""

import pytest

from moegen.config import load_config
from moegen.hls.model import (
    CYCLE_SWEEP,
    ECP5_POINTS,
    burst_schedule,
    cycle_errors,
    expert_cycles,
    point_config,
    request_spacing,
    resources,
    route_cycles,
    sweep_config,
)

CYCLE_TOLERANCE = 0.05
RESOURCE_TOLERANCE = 0.15

def _check_cycles(config):
    for tokens, verified, call_error, engine_error in cycle_errors(config):
        where = f"{config.name}, {tokens} tokens, {'warm' if verified else 'cold'}"
        assert abs(call_error) <= CYCLE_TOLERANCE, f"call cycles, {where}: {call_error:+.3f}"
        assert abs(engine_error) <= CYCLE_TOLERANCE, f"engine cycles, {where}: {engine_error:+.3f}"


def test_steps_and_bytes_are_exact():
    config = load_config("default")
    # 2:4, 8x8: gate/up tiles of 32 steps, down tiles of 64, one token tile per 8 tokens
    assert expert_cycles(config, 8).steps == 2 * 32 * 32 + 16 * 64
    assert expert_cycles(config, 9).steps == 2 * (2 * 32 * 32 + 16 * 64)
    warm, cold = expert_cycles(config, 1), expert_cycles(config, 1, verified=False)
    assert cold.load_bytes - warm.load_bytes == config.image_layout.nbytes - 64
    assert cold.command > warm.command >= warm.roofline


def test_request_spacing_delays_each_burst_of_a_job():
    """Bursts a request every ``spacing`` cycles: four one-word bursts on an idle port arrive a
    word a cycle with spacing 1, a word every other cycle with spacing 2."""
    jobs = [[1, 1, 1, 1]]
    (one,), (first_one,) = burst_schedule(jobs, latency=4, outstanding=16, spacing=1)
    (two,), (first_two,) = burst_schedule(jobs, latency=4, outstanding=16, spacing=2)
    assert first_one == first_two and one - first_one == 4 and two - first_two == 7
    assert request_spacing(load_config("default").memory) == 2  # bursts of 16 words
    assert request_spacing(point_config({"memory": {"burst_len": 1}}).memory) == 1


def test_route_cycles_grow_by_beats_per_token():
    config = load_config("default")
    assert route_cycles(config, 9) - route_cycles(config, 1) == 8 * config.router.experts


@pytest.mark.verilator
@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_cycle_model_matches_harness(preset):
    _check_cycles(load_config(preset))


@pytest.mark.verilator
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CYCLE_SWEEP))
def test_cycle_model_matches_harness_sweep(name):
    _check_cycles(sweep_config(name))


def test_resource_model_reproduces_its_points():
    for overrides, used in ECP5_POINTS:
        modeled = resources(point_config(overrides, name="point"))
        for kind, count in used.items():
            assert modeled[kind] == pytest.approx(count, rel=RESOURCE_TOLERANCE), kind


def test_resource_model_refuses_unmodeled_family():
    with pytest.raises(ValueError, match="ice40"):
        resources(load_config("default"), family="ice40")

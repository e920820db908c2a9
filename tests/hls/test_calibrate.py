"""The cycle model's calibration search (hls/calibrate.py) on calls the model itself made with
other constants: it must find constants that reproduce them exactly."""

import re

import pytest

from moegen.config import load_config
from moegen.hls import calibrate, model


def _calls(config, values):
    """``simulated_calls``-shaped records of the model with ``values`` as its constants."""
    with calibrate.constants(values):
        return [(tokens, verified, model.call_cycles(config, tokens, verified=verified),
                 model.expert_cycles(config, tokens, verified=verified).engine)
                for tokens, verified in [(1, False), (1, True), (2, True), (config.model.max_tokens, True)]]


def test_search_recovers_constants_that_made_the_calls():
    config = load_config("tiny")
    now = calibrate.current_constants()
    moved = {**now, "HEADER_CHECK_CYCLES": now["HEADER_CHECK_CYCLES"] + 2,
             "ENGINE_DRAIN_CYCLES": now["ENGINE_DRAIN_CYCLES"] - 1}
    measured = {"tiny": (config, _calls(config, moved))}
    assert max(calibrate.errors(measured, now).values()) > 0
    best, error = calibrate.search(measured, now, span=2)
    assert error == 0
    assert _calls(config, best) == measured["tiny"][1]
    assert calibrate.current_constants() == now  # the model's own constants are restored


def test_constants_are_restored_after_an_error():
    now = calibrate.current_constants()
    with pytest.raises(RuntimeError), calibrate.constants({"VERIFY_CYCLES": 99}):
        assert model._VERIFY_CYCLES == 99
        raise RuntimeError
    assert calibrate.current_constants() == now


def test_cli_rejects_a_negative_span(capsys):
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["tiny", "--span", "-1"])
    assert exit_info.value.code == 2
    assert "--span must be at least 0, not -1" in capsys.readouterr().err


def test_cli_prints_the_errors_as_is_and_fitted(monkeypatch, capsys):
    now = calibrate.current_constants()
    moved = {**now, "VERIFY_CYCLES": now["VERIFY_CYCLES"] + 3}
    monkeypatch.setattr(model, "simulated_calls", lambda config: _calls(config, moved))
    calibrate.main(["tiny", "--span", "3"])
    out = capsys.readouterr().out
    assert "with the best constants" in out and ", 0.00% with the best constants" in out
    assert f"_VERIFY_CYCLES = {now['VERIFY_CYCLES'] + 3}  (now {now['VERIFY_CYCLES']})" in out
    assert out.splitlines()[2].split()[0] == "tiny"


@pytest.mark.parametrize(("name", "match"), [
    ("no-such-config", r"no such config file \(presets: .*\); or a sweep variant: sweep-r4c16-14, sweep-r8c4-44"),
    ("icebreaker", r"config 'icebreaker' has no counter registers \(device.counters: false\)"),
])
def test_cli_refuses_a_config_it_cannot_measure_before_building_any(monkeypatch, capsys, name, match):
    monkeypatch.setattr(model, "simulated_calls", lambda config: pytest.fail("measured before every name was checked"))
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["tiny", name])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)

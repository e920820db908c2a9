import dataclasses
import hashlib
import json

import pytest

from moegen.config import PRESETS, SCHEMA, AccelConfig, ArrayConfig, load_config
from moegen.errors import ConfigError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_name_themselves(name):
    config = load_config(name)
    assert config.name == name
    assert len(config.hash) == 64 and config.device_hash == int(config.hash[:8], 16)


def test_default_preset_is_the_dataclass_defaults():
    assert load_config("default") == AccelConfig()
    assert load_config("configs/default.yaml") == AccelConfig()


def test_hash_is_sha256_of_the_canonical_json_without_the_name():
    config = load_config("tiny")
    canonical = config.to_dict()
    del canonical["name"]
    canonical["schema"] = SCHEMA
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    assert config.hash == hashlib.sha256(text.encode()).hexdigest()
    assert dataclasses.replace(config, name="renamed").hash == config.hash


def _neighbours(field, value):
    """Other valid-looking values of a field: the next choices, or value +/- one step."""
    if field.metadata["choices"]:
        return [c for c in field.metadata["choices"] if c != value]
    step = field.metadata["multiple_of"] or 1
    return [value + step, value - step]


def test_every_field_changes_the_hash():
    base = AccelConfig()
    seen = {base.hash}
    for section in [f.name for f in dataclasses.fields(base) if dataclasses.is_dataclass(f.type)]:
        sec = getattr(base, section)
        for field in dataclasses.fields(sec):
            for new in _neighbours(field, getattr(sec, field.name)):
                try:
                    changed = dataclasses.replace(base, **{section: dataclasses.replace(sec, **{field.name: new})})
                except ConfigError:
                    continue
                break
            assert changed.hash not in seen, f"{section}.{field.name}"
            seen.add(changed.hash)


def test_partial_files_take_defaults_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\narray: {rows: 4}\n")
    config = load_config(path)
    assert config.array.rows == 4 and config.array.cols == AccelConfig().array.cols
    assert AccelConfig.from_dict(config.to_dict()) == config
    assert isinstance(load_config("default").target.clock_mhz, float)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"^m: 5 exceeds array.n \(4\)"):
        ArrayConfig(m=5, n=4)
    with pytest.raises(ConfigError, match=r"^array: expected a array section, got \{'rows': 2\} \(dict\)"):
        AccelConfig(array={"rows": 2})


BAD = [
    # (file text or None for a missing file, key path in the message, what the message says)
    (None, "", "no such config file"),
    ("", "", "file is empty"),
    ("router: [unclosed\n", "", "not valid YAML at line 2"),
    ("- 1\n- 2\n", "", "expected a mapping of keys, got [1, 2] (list)"),
    ("routerr: {}\n", "routerr", "unknown key 'routerr'; did you mean 'router'?"),
    ("array: {colls: 8}\n", "array.colls", "did you mean 'cols'?"),
    ("array: {rows: eight}\n", "array.rows", "expected int, got 'eight' (str); allowed 1..64"),
    ("array: {rows: true}\n", "array.rows", "expected int, got True (bool)"),
    ("array: {rows: 8.5}\n", "array.rows", "expected int, got 8.5 (float)"),
    ("array: {rows: null}\n", "array.rows", "expected int, got None (NoneType)"),
    ("array: {rows: [8]}\n", "array.rows", "expected int, got [8] (list)"),
    ("array: {rows: 0}\n", "array.rows", "0 is not allowed; allowed 1..64"),
    ("router: {experts: 300}\n", "router.experts", "300 is not allowed; allowed 2..256"),
    ("array: {m: 4, n: 2}\n", "array.m", "4 exceeds array.n (2); allowed 1..2"),
    ("array: {n: 3}\n", "array.n", "3 is not allowed; allowed one of 1, 2, 4, 8, 16"),
    ("router: {experts: 4, lanes: 4, k_max: 6}\n", "router.k_max", "6 exceeds router.experts (4)"),
    ("router: {lanes: 32}\n", "router.lanes", "32 exceeds router.experts (8)"),
    ("router: {mode: softmax}\n", "router.mode", "allowed one of softmax_topk, softmax_topk_renorm"),
    ("router: {logit_width: 8, logit_frac: 8}\n", "router.logit_frac", "must be below logit_width (8)"),
    ("target: {board: de10-nano}\n", "target.board", "'de10-nano' is not allowed; allowed one of ulx3s-85f"),
    ("target: {clock_mhz: fast}\n", "target.clock_mhz", "expected float, got 'fast' (str)"),
    ("device: {counters: 0}\n", "device.counters", "expected bool, got 0 (int); allowed one of true, false"),
    ("array: 8\n", "array", "expected a mapping of keys, got 8 (int)"),
    ("array: {rows: 2}\narray: {rows: 4}\n", "", "duplicate key 'array'"),
    ("loader: {bank_bytes: 64}\n", "loader.bank_bytes", "cannot hold one weight tile of 1280 bytes"),
    ("loader: {bank_bytes: 1000}\n", "loader.bank_bytes", "a multiple of 64"),
    ("memory: {size_bytes: 4096}\n", "memory.size_bytes", "cannot hold one expert image"),
    ("memory: {port_width: 48}\n", "memory.port_width", "allowed one of 8, 16, 32, 64, 128, 256, 512"),
    ("link: {max_payload: 100}\n", "link.max_payload", "a multiple of 64"),
    ("link: {max_payload: 8192}\n", "link.max_payload", "allowed 64..4096"),
    ("link: {idle_timeout: 10}\n", "link.idle_timeout", "allowed 1024..1073741824"),
    ("array: {acc_width: 16}\n", "array.acc_width", "16 bits can overflow"),
    ("name: my config!\n", "name", "allowed text matching"),
    (b"name: \xff\xfe\n", "", "cannot read"),
]


@pytest.mark.parametrize(("text", "path", "message"), BAD, ids=[f"{i:02d}-{b[2][:24]}" for i, b in enumerate(BAD)])
def test_bad_configs_name_file_key_and_problem(tmp_path, text, path, message):
    file = tmp_path / "bad.yaml"
    if text is not None:
        file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(file)
    error = info.value
    assert error.source == str(file)
    assert ".".join(error.path) == path
    assert message in str(error)
    assert "\n" not in str(error)
    assert str(error).startswith(f"{file}: {path + ': ' if path else ''}")

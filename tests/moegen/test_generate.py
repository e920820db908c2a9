from moegen.config import SCHEMA, load_config
from moegen.generate import stamp


def test_stamp_names_version_config_and_hash():
    config = load_config("default")
    text = stamp(config, "block x", comment="#")
    lines = text.splitlines()
    assert len(lines) == 3 and all(line.startswith("# ") for line in lines)
    assert "block x" in lines[0] and config.hash in lines[1] and f"0x{config.device_hash:08x}" in lines[1]
    assert '"rows":8' in lines[2] and f'"schema":{SCHEMA}' in lines[2]

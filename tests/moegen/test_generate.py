from moegen.config import SCHEMA, load_config
from moegen.generate import generate, stamp


def test_stamp_names_version_config_and_hash():
    config = load_config("default")
    text = stamp(config, "block x", comment="#")
    lines = text.splitlines()
    assert len(lines) == 3 and all(line.startswith("# ") for line in lines)
    assert "block x" in lines[0] and config.hash in lines[1] and f"0x{config.device_hash:08x}" in lines[1]
    assert '"rows":8' in lines[2] and f'"schema":{SCHEMA}' in lines[2]


def test_accelerator_comes_with_its_register_map_and_c_header(tmp_path):
    config = load_config("tiny")
    written = {path.name for path in generate(config, tmp_path, blocks=["accelerator"])}
    assert {"accelerator.v", "regmap.json", "moegen_regs.h", "manifest.json"} <= written
    header = (tmp_path / "moegen_regs.h").read_text()
    assert config.hash in header and f"#define MOEGEN_CONFIG_HASH 0x{config.device_hash:08X}u" in header
    assert "#define MOEGEN_CMD_RUN_EXPERT 2" in header and "#define MOEGEN_IMGERR_BAD_PAYLOAD_CRC 8" in header
    assert "module accelerator" in (tmp_path / "accelerator.v").read_text()

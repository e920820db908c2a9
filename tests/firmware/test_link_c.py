"""The C link library against the golden device model served on a Unix socket."""

import subprocess
from pathlib import Path

import pytest

from moegen.golden.link import LinkModel
from moegen.host.link import ByteFaults, serve_model

FIRMWARE = Path(__file__).parents[2] / "firmware"
CFLAGS = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O2"]


@pytest.fixture(scope="module")
def link_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("c") / "link_check"
    subprocess.run(["cc", *CFLAGS, f"-I{FIRMWARE}", str(FIRMWARE / "moegen_link.c"),
                    str(Path(__file__).parent / "link_check.c"), "-o", str(exe)], check=True)
    return exe


def make_model(max_payload):
    csrs, queue = {}, []
    model = LinkModel(csr_read=lambda a: csrs.get(a, 0), csr_write=csrs.__setitem__, mem=bytearray(8192),
                      submit=lambda words: queue.append(words) or True, max_payload=max_payload)
    return model, queue


@pytest.mark.parametrize(("fault_rate", "max_payload"), [(0.0, 256), (0.2, 128)])
def test_c_library_round_trips_through_the_model(tmp_path, link_check, fault_rate, max_payload):
    model, queue = make_model(max_payload)
    sock = tmp_path / "dev.sock"
    faults = ByteFaults(fault_rate, seed=4)
    thread = serve_model(sock, model, faults=faults)
    proc = subprocess.run([str(link_check), str(sock), str(max_payload)], capture_output=True, text=True,
                          timeout=120, check=False)
    thread.join(timeout=5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")
    assert queue == [[i] for i in range(20)]  # every submit executed exactly once
    if fault_rate:
        assert faults.total > 50 and " resent=0 " not in proc.stdout

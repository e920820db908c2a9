"""The C link library against the golden device model served on a Unix socket."""

import random
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from moegen.golden.link import LinkModel

FIRMWARE = Path(__file__).parents[2] / "firmware"
CFLAGS = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O2"]


@pytest.fixture(scope="module")
def link_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("c") / "link_check"
    subprocess.run(["cc", *CFLAGS, f"-I{FIRMWARE}", str(FIRMWARE / "moegen_link.c"),
                    str(Path(__file__).parent / "link_check.c"), "-o", str(exe)], check=True)
    return exe


def serve(path, model, *, fault_rate=0.0, seed=0):
    """Serve one connection: bytes to the model, its answers back, optionally corrupting
    bytes in both directions; an idle gap tells the model the line went quiet."""
    rng = random.Random(seed)
    faults = [0]

    def mangle(data):
        if not data or rng.random() >= fault_rate:
            return data
        faults[0] += 1
        data = bytearray(data)
        i = rng.randrange(len(data))
        [lambda: data.__setitem__(i, data[i] ^ 0x20), lambda: data.__delitem__(i),
         lambda: data.insert(i, data[i]), lambda: data.__delitem__(slice(i, None))][rng.randrange(4)]()
        return bytes(data)

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run():
        with server:
            conn, _ = server.accept()
        conn.settimeout(0.005)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    model.timeout()
                    continue
                if not data:
                    return
                reply = mangle(model.receive(mangle(data)))
                if reply:
                    conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, faults


def make_model(max_payload):
    csrs, queue = {}, []
    model = LinkModel(csr_read=lambda a: csrs.get(a, 0), csr_write=csrs.__setitem__, mem=bytearray(8192),
                      submit=lambda words: queue.append(words) or True, max_payload=max_payload)
    return model, queue


@pytest.mark.parametrize(("fault_rate", "max_payload"), [(0.0, 256), (0.2, 128)])
def test_c_library_round_trips_through_the_model(tmp_path, link_check, fault_rate, max_payload):
    model, queue = make_model(max_payload)
    sock = tmp_path / "dev.sock"
    thread, faults = serve(sock, model, fault_rate=fault_rate, seed=4)
    proc = subprocess.run([str(link_check), str(sock), str(max_payload)], capture_output=True, text=True,
                          timeout=120, check=False)
    thread.join(timeout=5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")
    assert queue == [[i] for i in range(20)]  # every submit executed exactly once
    if fault_rate:
        assert faults[0] > 50 and " resent=0 " not in proc.stdout

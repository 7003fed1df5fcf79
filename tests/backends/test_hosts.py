"""The hosts harness: private files, one L2 network, a client outside every host."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ctlive.testing.hosts import Network

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SERVER = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
          "socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 9000)); s.listen(4)\n"
          "while True:\n c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()")


def test_two_hosts_on_a_bridge() -> None:
    with Network(index=250) as net:
        a, b = net.host("src-host"), net.host("dst-host")
        # Private /tmp, /var/tmp and /run: a file of one is not in the other.
        assert a.run(["sh", "-c", "echo a > /tmp/x && echo a > /run/y"]).returncode == 0
        assert b.run(["test", "-e", "/tmp/x"]).returncode != 0
        assert b.run(["test", "-e", "/run/y"]).returncode != 0
        assert not os.path.exists("/run/y")
        assert (a.path("/tmp/x")).read_text() == "a\n"
        assert a.run(["hostname"]).stdout.strip() == "src-host"
        # Own PID namespace: the host sees only its own processes.
        assert int(b.run(["sh", "-c", "ls /proc | grep -c '^[0-9]'"]).stdout) < 8
        # One L2 network: host to host, and a client outside every host.
        server = b.popen([sys.executable, "-c", SERVER])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection((b.ip, 9000), timeout=1) as c:
                        assert c.recv(64) == b"dst-host"
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            got = a.run([sys.executable, "-c", "import socket; c = socket.create_connection("
                         f"('{b.ip}', 9000), timeout=5); print(c.recv(64).decode())"])
            assert got.stdout.strip() == "dst-host", got.stderr
        finally:
            server.kill()
    # Torn down: no bridge, no veth left.
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "ctbr250" not in links

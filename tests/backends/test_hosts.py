"""The hosts harness: private files, one L2 network, a client outside every host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ctlive.testing.hosts import HOST_BRIDGE, Network

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


def test_containers_bridge_through_their_hosts_br0() -> None:
    """Each host's eth0 is a port of its own br0 (the same name on every host), which holds
    the host's address; a namespace whose veth's outer end is on a host's br0 is on the
    shared network: reachable from this machine, outside every host."""
    with Network(index=249) as net:
        hosts = [net.host("h1"), net.host("h2")]
        for h in hosts:
            (eth0,) = json.loads(h.run(["ip", "-j", "link", "show", "eth0"]).stdout)
            assert eth0["master"] == h.bridge == HOST_BRIDGE
            addrs = json.loads(h.run(["ip", "-j", "addr", "show", HOST_BRIDGE]).stdout)
            assert f"{h.ip}/24" in {f"{a['local']}/{a['prefixlen']}"
                                    for a in addrs[0]["addr_info"]}
        a = hosts[0]
        addr = f"{net.prefix}.100"
        mac = a.container_netns("c1", addr)
        (vc1,) = json.loads(a.run(["ip", "-j", "link", "show", "vc1"]).stdout)
        assert vc1["master"] == HOST_BRIDGE
        inner = json.loads(a.run(["ip", "-n", "c1", "-j", "link", "show", "eth0"]).stdout)
        assert inner[0]["address"] == mac
        # The named namespace is host a's own (its /run).
        assert a.path("/run/netns/c1").exists() and not hosts[1].path("/run/netns/c1").exists()
        # Reachable: a port nobody listens on answers with a reset (not a timeout).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, 9), timeout=5)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "ctbr249" not in links

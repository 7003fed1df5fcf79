"""The named network namespace a runc container moves with: the description a source
sends (untrusted at the receiver), the gratuitous ARP frame, and a real rebuild."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ctlive.backends import RestorePolicy, netns
from ctlive.backends.runc import runc_restore_config
from ctlive.errors import ConfigError, RestoreError, RestoreSpecError

GOOD: dict[str, Any] = {
    "name": "web-1",
    "interfaces": [{"name": "eth0", "mac": "02:42:0a:59:00:64", "mtu": 1500,
                    "addresses": ["10.89.0.100/24", "fd00::64/64"], "outer": "vweb1",
                    "bridge": "br0"}],
    "routes": [{"dst": "default", "dev": "eth0", "via": "10.89.0.1"},
               {"dst": "10.1.0.0/16", "dev": "eth0"}],
}


def test_a_good_description_round_trips() -> None:
    ns = netns.parse(GOOD)
    assert ns.interfaces[0].mac == "02:42:0a:59:00:64"
    assert ns.routes[0] == netns.Route("default", "eth0", "10.89.0.1")
    assert netns.parse(ns.as_dict()) == ns
    assert ns.as_dict() == GOOD


def test_what_reaches_ip_is_normalized() -> None:
    ns = netns.parse(_with("routes", [{"dst": "10.0.0.0/255.0.0.0", "dev": "eth0",
                                       "via": "10.89.0.1"},
                                      {"dst": "fd00:0::/16", "dev": "eth0"}]))
    assert [r.dst for r in ns.routes] == ["10.0.0.0/8", "fd00::/16"]


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the field at dotted ``path`` set (``None``: removed)."""
    spec = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = spec
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    key: Any = int(last) if last.isdigit() else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return spec


@pytest.mark.parametrize(("path", "value", "field"), [
    ("name", "../etc", "network.name"),
    ("name", "-n", "network.name"),
    ("interfaces", [], "network.interfaces"),
    ("interfaces", [GOOD["interfaces"][0]] * 9, "network.interfaces"),
    ("interfaces.0.name", "eth0; reboot", "network.interfaces[0].name"),
    ("interfaces.0.name", "a" * 16, "network.interfaces[0].name"),
    ("interfaces.0.name", "lo", "network.interfaces[0].name"),
    ("interfaces.0.outer", "x y", "network.interfaces[0].outer"),
    ("interfaces.0.bridge", "br0\nlink del eth0", "network.interfaces[0].bridge"),
    ("interfaces.0.mac", "ff:ff:ff:ff:ff:ff", "network.interfaces[0].mac"),
    ("interfaces.0.mac", "03:00:00:00:00:01", "network.interfaces[0].mac"),
    ("interfaces.0.mac", "02:42:0a:59:00", "network.interfaces[0].mac"),
    ("interfaces.0.mtu", 40, "network.interfaces[0].mtu"),
    ("interfaces.0.mtu", "1500", "network.interfaces[0].mtu"),
    ("interfaces.0.addresses", ["10.89.0.100"], "network.interfaces[0].addresses[0]"),
    ("interfaces.0.addresses", ["10.89.0.100/33"], "network.interfaces[0].addresses[0]"),
    ("interfaces.0.addresses", ["224.0.0.1/4"], "network.interfaces[0].addresses[0]"),
    ("interfaces.0.addresses", ["127.0.0.1/8"], "network.interfaces[0].addresses[0]"),
    ("interfaces.0.addresses", ["10.0.0.1/8 dev lo"], "network.interfaces[0].addresses[0]"),
    ("interfaces.0.addresses", ["10.0.0.1/8"] * 2, "network.interfaces[0].addresses"),
    ("interfaces.0.addresses", ["10.0.0.1/8"] * 17, "network.interfaces[0].addresses"),
    ("interfaces.0.extra", 1, "network.interfaces[0].extra"),
    ("routes", [{"dst": "default", "dev": "eth1"}], "network.routes[0].dev"),
    ("routes", [{"dst": "10.0.0.1/8", "dev": "eth0"}], "network.routes[0].dst"),
    ("routes", [{"dst": "default", "dev": "eth0", "via": "fd00::1 x"}], "network.routes[0].via"),
    ("routes", [{"dst": "10.0.0.0/8", "dev": "eth0", "via": "fd00::1"}],
     "network.routes[0].via"),
    ("routes", [{"dst": "default", "dev": "eth0"}] * 33, "network.routes"),
    ("hooks", [], "network.hooks"),
])
def test_a_bad_description_is_refused_naming_the_field(path: str, value: Any,
                                                       field: str) -> None:
    with pytest.raises(RestoreSpecError) as info:
        netns.parse(_with(path, value))
    assert info.value.field == field


def test_two_interfaces_may_not_share_a_name_outer_end_or_mac() -> None:
    two = copy.deepcopy(GOOD)
    two["interfaces"].append(dict(GOOD["interfaces"][0], name="eth1", mac="02:00:00:00:00:02"))
    with pytest.raises(RestoreSpecError, match="same outer"):
        netns.parse(two)


def test_the_gratuitous_arp_frame() -> None:
    frame = netns.garp_frame("02:42:0a:59:00:64", "10.89.0.100")
    mac, ip = bytes.fromhex("02420a590064"), bytes([10, 89, 0, 100])
    assert frame == (b"\xff" * 6 + mac + b"\x08\x06"            # to everyone, ARP
                     + b"\x00\x01\x08\x00\x06\x04\x00\x01"      # Ethernet/IPv4, request
                     + mac + ip + bytes(6) + ip                 # sender = target = ip
                     + bytes(18))                               # padded to 60 bytes
    with pytest.raises(ValueError):
        netns.garp_frame("02:42", "10.89.0.100")


def test_netns_name_takes_only_named_namespaces() -> None:
    assert netns.netns_name("/run/netns/web-1") == "web-1"
    assert netns.netns_name("/run/netns/../netns/web-1") == "web-1"
    assert netns.netns_name("/proc/1/ns/net") is None
    assert netns.netns_name("/run/netns/a/b") is None


def test_bridge_map() -> None:
    policy = RestorePolicy(bridge_map={"br0": "br-guest"})
    assert policy.bridge_for("br0") == "br-guest" and policy.bridge_for("br1") == "br1"
    assert RestorePolicy(bridge_map=["br0=br2"]).bridge_map == (("br0", "br2"),)
    with pytest.raises(ConfigError, match="bridge_map"):
        RestorePolicy(bridge_map=["br0"])
    with pytest.raises(ConfigError, match="bridge_map"):
        RestorePolicy(bridge_map={"br0": "br 1"})


def _runc_spec(tmp_path: pathlib.Path, network: Any) -> dict[str, Any]:
    (tmp_path / "bundles" / "rootfs").mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "id": "web-1", "rootfs": "rootfs", "tcp_established": True,
        "config": {"process": {"args": ["sh"]}, "linux": {"namespaces": [
            {"type": t} for t in ("pid", "mount", "ipc", "uts")] + [
            {"type": "network", "path": "/run/netns/web-1"}]}}}
    if network is not None:
        spec["network"] = network
    return spec


def test_runc_joins_the_rebuilt_namespace_only(tmp_path: pathlib.Path) -> None:
    kw = {"store": tmp_path / "bundles", "bundles": tmp_path / "bundles", "migration": "m1"}
    _, config = runc_restore_config(_runc_spec(tmp_path, GOOD), RestorePolicy(), **kw)
    assert {"type": "network", "path": "/run/netns/web-1"} in config["linux"]["namespaces"]
    # Without a description, the path names a namespace the receiver did not make.
    with pytest.raises(RestoreSpecError) as info:
        runc_restore_config(_runc_spec(tmp_path, None), RestorePolicy(), **kw)
    assert info.value.field == "config.linux.namespaces[4].path"
    # The path must be the described namespace's own.
    other = _runc_spec(tmp_path, dict(GOOD, name="other"))
    with pytest.raises(RestoreSpecError):
        runc_restore_config(other, RestorePolicy(), **kw)
    bad = _runc_spec(tmp_path, GOOD) | {"tcp_established": "yes"}
    with pytest.raises(RestoreSpecError, match="tcp_established"):
        runc_restore_config(bad, RestorePolicy(), **kw)


# --- a real rebuild, in this machine's network -------------------------------------------

def _ip(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


@pytest.fixture
def bridge() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"ctnb{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.mark.anyio
async def test_rebuild_announce_remove(bridge: str) -> None:
    tag = bridge[4:]
    desc = {"name": f"ctnt{tag}", "interfaces": [
        {"name": "eth0", "mac": "02:42:0a:59:00:64", "mtu": 1400,
         "addresses": ["10.253.0.100/24", "fd53::100/64"], "outer": f"vctnt{tag}",
         "bridge": "brX"}],
        "routes": [{"dst": "default", "dev": "eth0", "via": "10.253.0.1"}]}
    ns = netns.parse(desc)
    with pytest.raises(RestoreSpecError, match="no bridge brX") as info:
        await netns.rebuild(ns, RestorePolicy().bridge_for)
    assert info.value.field == "network.interfaces[0].bridge"
    assert not os.path.exists(f"/run/netns/{ns.name}")
    policy = RestorePolicy(bridge_map={"brX": bridge})
    try:
        await netns.rebuild(ns, policy.bridge_for)
        with pytest.raises(RestoreError, match="exists"):
            await netns.rebuild(ns, policy.bridge_for)
        # Another namespace whose outer end's name is taken here: refused, and the link
        # that was there (not its to remove) is left alone.
        clash = netns.parse(dict(desc, name=f"ctnu{tag}"))
        with pytest.raises(RestoreError, match=f"{ns.interfaces[0].outer}.*exists"):
            await netns.rebuild(clash, policy.bridge_for)
        assert _ip("link", "show", ns.interfaces[0].outer)
        assert not os.path.exists(f"/run/netns/{clash.name}")
        (link,) = [x for x in _ip("-n", ns.name, "addr", "show") if x["ifname"] == "eth0"]
        assert link["address"] == "02:42:0a:59:00:64" and link["mtu"] == 1400
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet"] == [("10.253.0.100", 24)]
        routes = _ip("-n", ns.name, "route", "show", "default")
        assert routes[0]["gateway"] == "10.253.0.1"
        (outer,) = _ip("link", "show", ns.interfaces[0].outer)
        assert outer["master"] == bridge and outer["operstate"] == "DOWN"
        # The namespace describes itself as it was described.
        assert netns.describe(ns.name) == netns.parse(dict(desc, interfaces=[
            dict(desc["interfaces"][0], bridge=bridge)]))
        # Announce: the outer end comes up; the ARP and the NA reach the bridge.
        want = {netns.garp_frame("02:42:0a:59:00:64", "10.253.0.100"),
                netns.unsolicited_na_frame("02:42:0a:59:00:64", "fd53::100")}
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)) as cap:
            cap.bind((bridge, 0))
            cap.settimeout(5)
            await netns.announce(ns)
            seen = set()
            while not want <= seen:  # (the kernel's own IPv6 chatter comes too)
                seen.add(cap.recv(256))
        assert _ip("link", "show", ns.interfaces[0].outer)[0]["operstate"] != "DOWN"
    finally:
        await netns.remove(ns)
    assert not os.path.exists(f"/run/netns/{ns.name}")
    gone = subprocess.run(["ip", "link", "show", ns.interfaces[0].outer], capture_output=True)
    assert gone.returncode != 0


def test_a_restarted_receiver_keeps_the_namespace_of_a_ready_copy() -> None:
    """The journal's handle of a restored runc copy names its rebuilt namespace, so a
    restarted receiver that adopts the copy still announces it at COMMIT (and removes it
    on a discard)."""
    from ctlive.backends.runc import _RuncRestored
    from ctlive.migration.destination import _adopt, _handle

    restored = _RuncRestored(os.getpid(), "/run/ctlive/runc", "web-1", GOOD)
    handle = json.loads(json.dumps(_handle(restored)))  # as the journal stores it
    adopted = _adopt("runc", handle)
    assert isinstance(adopted, _RuncRestored)
    assert adopted.network == GOOD and adopted._netns == netns.parse(GOOD)
    assert _RuncRestored(os.getpid(), "/r", "web-2").network is None


def test_the_unsolicited_neighbour_advertisement_frame() -> None:
    frame = netns.unsolicited_na_frame("02:42:0a:59:00:64", "fd00::64")
    mac, ip = bytes.fromhex("02420a590064"), bytes.fromhex("fd00" + "0" * 26 + "64")
    all_nodes = bytes.fromhex("ff02" + "0" * 26 + "01")
    eth, ip6, icmp = frame[:14], frame[14:54], frame[54:]
    assert eth == bytes.fromhex("333300000001") + mac + b"\x86\xdd"
    # IPv6: version 6, payload 32 bytes, ICMPv6, hop limit 255 (RFC 4861 requires it).
    assert ip6 == b"\x60\0\0\0\x00\x20\x3a\xff" + ip + all_nodes
    # Neighbour advertisement, override flag, the target, its link-layer address.
    assert icmp[0:2] == b"\x88\x00" and icmp[4:8] == b"\x20\0\0\0"
    assert icmp[8:24] == ip and icmp[24:] == b"\x02\x01" + mac
    # The checksum verifies: the one's complement sum over the pseudo-header and the
    # message, checksum included, is all ones.
    data = ip + all_nodes + len(icmp).to_bytes(4, "big") + b"\0\0\0\x3a" + icmp
    total = sum(int.from_bytes(data[k:k + 2], "big") for k in range(0, len(data), 2))
    assert (total % 0xFFFF or 0xFFFF) == 0xFFFF and icmp[2:4] != b"\0\0"


def test_describe_refuses_a_veth_that_is_on_no_bridge() -> None:
    """Only a veth whose outer end is a bridge port can be rebuilt elsewhere: the source
    says so before anything travels."""
    from ctlive.errors import CheckpointError

    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"ctnd{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "link", "add", f"v{name}", "type", "veth", "peer", "name",
                        "eth0", "netns", name], check=True)
        with pytest.raises(CheckpointError, match="not a veth whose outer end is a port"):
            netns.describe(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"v{name}"], capture_output=True)

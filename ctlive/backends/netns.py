"""A container's named network namespace, described on the source and rebuilt on the
destination, so that its TCP connections survive a move to another host.

runc keeps a container's connections only when the container joins a network namespace
by path (``/run/netns/NAME``, made with ``ip netns add``): CRIU then treats it as
external and restores the sockets into whatever namespace that path names at the
destination, which must already have the same addresses and routes ("Can't connect inet
socket back: Network is unreachable" otherwise). So the source describes the namespace
(:func:`describe`: each veth's inner name, MAC, MTU and addresses, its outer end's name
and bridge, and the routes), the receiver checks that description as the untrusted
input it is (:func:`parse`), rebuilds it before the restore (:func:`rebuild`, the outer
ends on the bridge of the same name or the one ``RestorePolicy.bridge_map`` names, left
down), and after the resume brings the outer ends up and announces each address from
inside the namespace (:func:`announce`: a gratuitous ARP, or for IPv6 an unsolicited
neighbour advertisement), so that bridges and clients reach the new place at once
instead of after their caches expire.

On the source, :func:`set_links` takes the outer ends down before the final dump (runc
checkpoints with ``--leave-running``, after which CRIU lifts its own network lock, and
the frozen container's kernel sockets would otherwise acknowledge data that the
destination never sees) and up again if the migration is aborted; :func:`remove`
deletes the namespace once the source copy is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import attrs

from ctlive.backends.restore import integer, obj, only_keys, refuse, string
from ctlive.errors import CheckpointError, Phase, RestoreError

__all__ = [
    "NETNS_DIR",
    "Interface",
    "Namespace",
    "Route",
    "announce",
    "check_bridges",
    "describe",
    "garp_frame",
    "netns_name",
    "parse",
    "rebuild",
    "remove",
    "set_links",
    "unsolicited_na_frame",
]

NETNS_DIR = "/run/netns"
"""Where ``ip netns`` keeps named namespaces (per host: ``/run`` is a host's own)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_MAX_IFACES, _MAX_ADDRS, _MAX_ROUTES = 8, 16, 32
_CLONE_NEWNET = 0x40000000
_ETH_P_ARP = 0x0806


@attrs.frozen
class Interface:
    """One veth of the namespace."""

    name: str
    """The inner end's name (inside the namespace)."""
    mac: str
    """The inner end's MAC (lower case): it moves with the workload."""
    mtu: int
    addresses: tuple[str, ...]
    """Addresses with prefix length, e.g. ``10.0.0.5/24``."""
    outer: str
    """The outer end's name, on the host."""
    bridge: str
    """The host bridge the outer end is a port of."""


@attrs.frozen
class Route:
    """A route of the namespace's main table (not the kernel's own per-address ones)."""

    dst: str
    """``default`` or a network, e.g. ``10.1.0.0/16``."""
    dev: str
    via: str | None = None


@attrs.frozen
class Namespace:
    """A named network namespace: what the destination rebuilds."""

    name: str
    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (what :func:`parse` reads)."""
        return {"name": self.name,
                "interfaces": [attrs.asdict(i, recurse=False) | {"addresses": list(i.addresses)}
                               for i in self.interfaces],
                "routes": [{k: v for k, v in attrs.asdict(r).items() if v is not None}
                           for r in self.routes]}


def netns_name(path: str) -> str | None:
    """The name of the named namespace ``path`` is (``/run/netns/NAME``), else None."""
    head, _, name = os.path.normpath(path).rpartition("/")
    return name if head == NETNS_DIR and _NAME.match(name) else None


# --- the source: describe --------------------------------------------------------------

def _ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    cmd = ["ip", "-j", *(["-n", netns] if netns else []), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30)
        data = json.loads(out.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        err = getattr(exc, "stderr", "") or exc
        raise CheckpointError(f"`{' '.join(cmd)}` failed: {str(err).strip()[:300]}",
                              phase=Phase.ITERATE, cause=exc) from exc
    return data if isinstance(data, list) else []


def describe(name: str) -> Namespace:
    """Describe named namespace ``name`` (run in the netns its veths' outer ends are in):
    every veth's inner name, MAC, MTU and global addresses, the outer end's name and
    bridge, and the routes that are not the kernel's own. A :class:`CheckpointError` if
    an interface is not a veth with its outer end on a bridge here."""
    host = {link["ifindex"]: link for link in _ip_json("link", "show")}
    ifaces = []
    for link in _ip_json("addr", "show", netns=name):
        if link.get("ifname") == "lo":
            continue
        outer = host.get(link.get("link_index", -1))
        if outer is None or "link_netnsid" not in link or not outer.get("master"):
            raise CheckpointError(
                f"interface {link.get('ifname')} of network namespace {name} is not a veth "
                "whose outer end is a port of a bridge on this host: ctlive cannot rebuild "
                "it at the destination", phase=Phase.ITERATE)
        addrs = tuple(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                      if a.get("scope") == "global")
        ifaces.append(Interface(link["ifname"], link["address"].lower(), int(link["mtu"]),
                                addrs, outer["ifname"], outer["master"]))
    routes = []
    for family in ("-4", "-6"):
        for r in _ip_json(family, "route", "show", "table", "main", netns=name):
            if r.get("protocol") in ("kernel", "ra") or r.get("type", "unicast") != "unicast":
                continue
            dst = r.get("dst", "default")
            if family == "-6" and dst.startswith("fe80:"):
                continue
            routes.append(Route(dst, r["dev"], r.get("gateway")))
    return Namespace(name, tuple(ifaces), tuple(routes))


# --- the destination: parse (untrusted), rebuild, announce, remove -----------------------

def _address(value: Any, field: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    text = string(value, field, max_len=64)
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        refuse(field, f"{field} {text!r} is not an address with a prefix length")
    if "/" not in text or iface.ip.is_multicast or iface.ip.is_loopback or \
            iface.ip.is_unspecified or iface.ip.is_link_local:
        refuse(field, f"{field} {text!r} is not a unicast address with a prefix length")
    return iface


def _interface(value: Any, field: str) -> Interface:
    i = obj(value, field)
    only_keys(i, ("name", "mac", "mtu", "addresses", "outer", "bridge"), field)
    name = string(i.get("name"), f"{field}.name", pattern=_IFNAME)
    if name == "lo":
        refuse(f"{field}.name", f"{field}.name may not be lo")
    mac = string(i.get("mac"), f"{field}.mac", pattern=_MAC)
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        refuse(f"{field}.mac", f"{field}.mac {mac} is not a unicast MAC address")
    addrs = i.get("addresses", [])
    if not isinstance(addrs, list) or len(addrs) > _MAX_ADDRS:
        refuse(f"{field}.addresses", f"{field}.addresses must be a list of at most "
                                     f"{_MAX_ADDRS} addresses")
    parsed = [str(_address(a, f"{field}.addresses[{k}]")) for k, a in enumerate(addrs)]
    if len(set(parsed)) != len(parsed):
        refuse(f"{field}.addresses", f"{field}.addresses lists an address twice")
    return Interface(name, mac, integer(i.get("mtu"), f"{field}.mtu", 68, 65535),
                     tuple(parsed), string(i.get("outer"), f"{field}.outer", pattern=_IFNAME),
                     string(i.get("bridge"), f"{field}.bridge", pattern=_IFNAME))


def _route(value: Any, field: str, devs: dict[str, Interface]) -> Route:
    r = obj(value, field)
    only_keys(r, ("dst", "dev", "via"), field)
    dst = string(r.get("dst"), f"{field}.dst", max_len=64)
    version = None
    if dst != "default":  # normalized: what reaches `ip` is ipaddress's own spelling
        try:
            net = ipaddress.ip_network(dst)
        except ValueError:
            refuse(f"{field}.dst", f"{field}.dst {dst!r} is neither default nor a network")
        dst, version = str(net), net.version
    dev = string(r.get("dev"), f"{field}.dev", pattern=_IFNAME)
    if dev not in devs:
        refuse(f"{field}.dev", f"{field}.dev {dev!r} is not an interface of the namespace")
    via = None
    if r.get("via") is not None:
        via = string(r["via"], f"{field}.via", max_len=64)
        try:
            gw = ipaddress.ip_address(via)
        except ValueError:
            refuse(f"{field}.via", f"{field}.via {via!r} is not an address")
        if (version is not None and gw.version != version) or gw.is_multicast \
                or gw.is_unspecified:
            refuse(f"{field}.via", f"{field}.via {via!r} cannot be a gateway for {dst}")
        via = str(gw)
    return Route(dst, dev, via)


def parse(value: Any, field: str = "network") -> Namespace:
    """The :class:`Namespace` that ``value`` (a source's description, untrusted)
    describes, or a :class:`~ctlive.errors.RestoreSpecError` naming the field: names of
    the namespace and interfaces, MACs, MTUs, addresses and prefixes, gateways, each
    interface and outer end once, at most 8 interfaces, 16 addresses each, 32 routes."""
    n = obj(value, field)
    only_keys(n, ("name", "interfaces", "routes"), field)
    name = string(n.get("name"), f"{field}.name", pattern=_NAME)
    items = n.get("interfaces")
    if not isinstance(items, list) or not 1 <= len(items) <= _MAX_IFACES:
        refuse(f"{field}.interfaces", f"{field}.interfaces must be a list of 1 to "
                                      f"{_MAX_IFACES} interfaces")
    ifaces = [_interface(v, f"{field}.interfaces[{k}]") for k, v in enumerate(items)]
    for key in ("name", "outer", "mac"):
        seen = [getattr(i, key) for i in ifaces]
        if len(set(seen)) != len(seen):
            refuse(f"{field}.interfaces", f"two interfaces of {field} have the same {key}")
    routes = n.get("routes", [])
    if not isinstance(routes, list) or len(routes) > _MAX_ROUTES:
        refuse(f"{field}.routes", f"{field}.routes must be a list of at most "
                                  f"{_MAX_ROUTES} routes")
    devs = {i.name: i for i in ifaces}
    return Namespace(name, tuple(ifaces),
                     tuple(_route(v, f"{field}.routes[{k}]", devs) for k, v in enumerate(routes)))


async def _ip(args: Sequence[str], *, batch: str | None = None, netns: str | None = None,
              phase: Phase = Phase.RESTORE) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *(["-batch", "-"] if batch else []), *args]
    try:
        proc = await anyio.run_process(cmd, input=batch.encode() if batch else None,
                                       check=False)
    except OSError as exc:
        raise RestoreError(f"cannot run ip: {exc}", phase=phase, cause=exc) from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-300:]
        cls = RestoreError if phase in (Phase.RESTORE, Phase.COMMIT) else CheckpointError
        raise cls(f"`{' '.join(cmd)}` failed: {err}", phase=phase)


async def _is_bridge(name: str) -> bool:
    proc = await anyio.run_process(["ip", "-j", "-d", "link", "show", "dev", name],
                                   check=False)
    with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
        kind = json.loads(proc.stdout)[0]["linkinfo"]["info_kind"]
        return proc.returncode == 0 and kind == "bridge"
    return False


async def check_bridges(ns: Namespace, bridge_for: Callable[[str], str],
                        field: str = "network") -> None:
    """Refuse (:class:`~ctlive.errors.RestoreSpecError`) an interface whose bridge,
    mapped by ``bridge_for``, is not a bridge on this host."""
    for k, i in enumerate(ns.interfaces):
        if not await _is_bridge(bridge_for(i.bridge)):
            refuse(f"{field}.interfaces[{k}].bridge",
                   f"the container's veth {i.name} was a port of bridge {i.bridge} on the "
                   f"source, and this host has no bridge {bridge_for(i.bridge)} (map it to "
                   "one with RestorePolicy.bridge_map, ctlive serve --bridge-map)")


async def rebuild(ns: Namespace, bridge_for: Callable[[str], str]) -> None:
    """Make named namespace ``ns`` here, with the same interfaces (names, MACs, MTUs),
    addresses and routes, each outer end a port of ``bridge_for(bridge)`` and left down
    until :func:`announce`. A bridge that does not exist is refused
    (:func:`check_bridges`); a namespace or outer end of the same name, or a failing
    step, is a :class:`RestoreError` (what was made is removed again)."""
    await check_bridges(ns, bridge_for)
    if os.path.lexists(f"{NETNS_DIR}/{ns.name}"):
        raise RestoreError(f"a network namespace {ns.name} exists on this host already",
                           phase=Phase.RESTORE)
    for i in ns.interfaces:  # (so that cleaning up below removes only what it made)
        taken = await anyio.run_process(["ip", "link", "show", "dev", i.outer], check=False)
        if taken.returncode == 0:
            raise RestoreError(f"a link named {i.outer} (the container's outer veth end) "
                               "exists on this host already", phase=Phase.RESTORE)
    await _ip(["netns", "add", ns.name])
    try:
        outer = "".join(f"link add {i.outer} mtu {i.mtu} type veth peer name {i.name} "
                        f"netns {ns.name}\nlink set {i.outer} master {bridge_for(i.bridge)}\n"
                        for i in ns.interfaces)
        await _ip([], batch=outer)
        inner = "link set lo up\n"
        for i in ns.interfaces:
            inner += f"link set {i.name} address {i.mac} mtu {i.mtu}\n"
            inner += "".join(f"addr add {a} dev {i.name}"
                             f"{' nodad' if ':' in a else ''}\n" for a in i.addresses)
            inner += f"link set {i.name} up\n"
        inner += "".join(f"route add {r.dst}{f' via {r.via}' if r.via else ''} dev {r.dev}\n"
                         for r in ns.routes)
        await _ip([], batch=inner, netns=ns.name)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await remove(ns)
        raise


def garp_frame(mac: str, ip: str) -> bytes:
    """A gratuitous ARP (an ARP request for ``ip`` from ``ip``, to everyone) as an
    Ethernet frame of the minimum 60 bytes: what bridges learn ``mac``'s new port
    from, and what updates clients' ARP caches."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = ipaddress.IPv4Address(ip).packed
    if len(hw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    eth = b"\xff" * 6 + hw + struct.pack("!H", _ETH_P_ARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op 1 (request); target MAC unknown.
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + bytes(6) + addr
    return (eth + arp).ljust(60, b"\0")


def unsolicited_na_frame(mac: str, ip: str) -> bytes:
    """IPv6's gratuitous ARP: an unsolicited neighbour advertisement (RFC 4861 7.2.6)
    for ``ip`` at ``mac``, override flag set, to all nodes (ff02::1), as an Ethernet
    frame."""
    hw = bytes.fromhex(mac.replace(":", ""))
    if len(hw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    src, dst = ipaddress.IPv6Address(ip).packed, ipaddress.IPv6Address("ff02::1").packed
    # type 136, code 0, checksum (below), flags O; the target; option 2 (target MAC).
    body = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + src + bytes([2, 1]) + hw
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    total = sum(struct.unpack(f"!{(len(pseudo) + len(body)) // 2}H", pseudo + body))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
    return b"\x33\x33\x00\x00\x00\x01" + hw + struct.pack("!H", 0x86DD) + ip6 + body


def _packet_socket(netns: str) -> socket.socket:
    """An AF_PACKET socket in named namespace ``netns`` (in a thread of its own: setns
    moves only the calling thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with open("/proc/thread-self/ns/net", "rb") as mine, \
                    open(f"{NETNS_DIR}/{netns}", "rb") as target:
                if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
                try:
                    out.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                             socket.htons(_ETH_P_ARP)))
                finally:
                    libc.setns(mine.fileno(), _CLONE_NEWNET)
        except BaseException as exc:  # handed to the caller's thread
            out.append(exc)

    t = threading.Thread(target=make, name=f"ctlive-netns-{netns}")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _send_garps(ns: Namespace) -> None:
    with _packet_socket(ns.name) as s:
        for i in ns.interfaces:
            for a in i.addresses:
                ip = a.split("/")[0]
                v4 = ipaddress.ip_address(ip).version == 4
                frame = garp_frame(i.mac, ip) if v4 else unsolicited_na_frame(i.mac, ip)
                s.sendto(frame, (i.name, socket.htons(_ETH_P_ARP if v4 else 0x86DD)))


async def announce(ns: Namespace) -> None:
    """After the resume: bring the outer ends up and, from inside the namespace, send a
    gratuitous ARP for every IPv4 address and an unsolicited neighbour advertisement
    for every IPv6 one."""
    await set_links(ns, up=True, phase=Phase.COMMIT)
    # A veth drops what is sent before the kernel's link watch has seen its carrier
    # (operstate UP); a second copy covers bridge ports that were not forwarding yet.
    with anyio.move_on_after(1):
        while not await _all_up(ns):
            await anyio.sleep(0.01)
    try:
        await anyio.to_thread.run_sync(_send_garps, ns)
        await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(_send_garps, ns)
    except OSError as exc:
        raise RestoreError(f"cannot announce the addresses of {ns.name}: {exc}",
                           phase=Phase.COMMIT, cause=exc) from exc


async def _all_up(ns: Namespace) -> bool:
    proc = await anyio.run_process(["ip", "-n", ns.name, "-j", "link", "show"], check=False)
    with contextlib.suppress(ValueError, TypeError):
        state = {x.get("ifname"): x.get("operstate") for x in json.loads(proc.stdout)}
        return all(state.get(i.name) == "UP" for i in ns.interfaces)
    return False


async def set_links(ns: Namespace, *, up: bool, phase: Phase = Phase.FINAL_DUMP) -> None:
    """Take the outer ends of ``ns``'s veths down (no packet reaches or leaves the
    workload) or bring them up."""
    state = "up" if up else "down"
    await _ip([], batch="".join(f"link set {i.outer} {state}\n" for i in ns.interfaces),
              phase=phase)


async def remove(ns: Namespace) -> None:
    """Delete named namespace ``ns`` and its veths (best effort: what is gone is fine)."""
    with contextlib.suppress(RestoreError):
        await _ip(["netns", "del", ns.name])
    for i in ns.interfaces:
        with contextlib.suppress(RestoreError):
            await _ip(["link", "del", i.outer])

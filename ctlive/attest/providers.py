"""Getting a report inside the guest: configfs-tsm or the /dev/sev-guest ioctls.

Both providers are synchronous (they are single short kernel calls) and return
serialized :class:`~ctlive.attest.certs.Evidence`. Their kernel interfaces are
injectable so the code is tested against a fake configfs tree and a fake ioctl.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import struct
from collections.abc import Callable

from ctlive.attest.certs import Evidence
from ctlive.errors import ProviderError

__all__ = [
    "CONFIGFS_TSM_REPORT",
    "SEV_GUEST_DEVICE",
    "ConfigfsTsmProvider",
    "SevGuestProvider",
    "auto_provider",
]

CONFIGFS_TSM_REPORT = pathlib.Path("/sys/kernel/config/tsm/report")
SEV_GUEST_DEVICE = pathlib.Path("/dev/sev-guest")


class ConfigfsTsmProvider:
    """configfs-tsm (Linux 6.7+): write inblob, read outblob and auxblob.

    ``generation`` counts writes to the entry; if it moves between our write
    and our reads, another writer raced us and the report may not be ours.
    """

    def __init__(self, root: str | os.PathLike[str] = CONFIGFS_TSM_REPORT, *,
                 privlevel: int = 0, entry: str | None = None) -> None:
        self.root = pathlib.Path(root)
        self.privlevel = privlevel
        self.entry = entry
        """Use this existing entry instead of creating (and removing) a fresh one."""

    def get_evidence(self, report_data: bytes) -> bytes:
        """Report (with certificates from auxblob when the host provides them)."""
        if len(report_data) != 64:
            raise ProviderError("report_data must be 64 bytes")
        created = self.entry is None
        d = self.root / (self.entry or f"ctlive-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            if created:
                d.mkdir()
            provider = (d / "provider").read_text().strip()
            if provider != "sev_guest":
                raise ProviderError(f"configfs-tsm provider is {provider!r}, not sev_guest")
            if self.privlevel:
                (d / "privlevel").write_text(str(self.privlevel))
            (d / "inblob").write_bytes(report_data)
            gen = (d / "generation").read_text().strip()
            report = (d / "outblob").read_bytes()
            aux = d / "auxblob"
            table = aux.read_bytes() if aux.exists() else b""
            if (d / "generation").read_text().strip() != gen:
                raise ProviderError("configfs-tsm entry was written concurrently; retry")
        except OSError as exc:
            raise ProviderError(f"configfs-tsm at {d}: {exc}", cause=exc) from exc
        finally:
            if created:
                try:
                    d.rmdir()
                except OSError:
                    pass
        if table:
            return Evidence.from_cert_table(report, table).to_bytes()
        return Evidence(report=report).to_bytes()


# linux/include/uapi/linux/sev-guest.h
_MSG_REPORT_RSP_HDR = 32  # status u32, report_size u32, 24 reserved bytes
_REQ = struct.Struct("<64sI28x")  # snp_report_req: user_data, vmpl, reserved
_EXT_REQ = struct.Struct("<64sI28xQI4x")  # + certs_address, certs_len (padded to 8)
_IOCTL = struct.Struct("<B7xQQQ")  # msg_version, req_data, resp_data, exitinfo2


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("S") << 8) | nr


SNP_GET_REPORT = _iowr(0x0, _IOCTL.size)
SNP_GET_EXT_REPORT = _iowr(0x2, _IOCTL.size)
_VMM_ERR_INVALID_LEN = 1

IoctlFn = Callable[[int, int, bytearray], int]


class SevGuestProvider:
    """The /dev/sev-guest SNP_GET_EXT_REPORT (falling back to SNP_GET_REPORT) ioctls."""

    def __init__(self, device: str | os.PathLike[str] = SEV_GUEST_DEVICE, *, vmpl: int = 0,
                 ioctl: IoctlFn | None = None, opener: Callable[[str], int] | None = None
                 ) -> None:
        self.device = str(device)
        self.vmpl = vmpl
        self._ioctl = ioctl or _real_ioctl
        self._open = opener or (lambda p: os.open(p, os.O_RDWR))
        self._close = os.close if opener is None else (lambda fd: None)

    def get_evidence(self, report_data: bytes) -> bytes:
        """Report plus the host-provided certificate table, if any."""
        if len(report_data) != 64:
            raise ProviderError("report_data must be 64 bytes")
        try:
            fd = self._open(self.device)
        except OSError as exc:
            raise ProviderError(f"cannot open {self.device}: {exc}", cause=exc) from exc
        try:
            return self._ext_report(fd, report_data)
        finally:
            self._close(fd)

    def _call(self, fd: int, nr: int, req: ctypes.Array[ctypes.c_char]) -> tuple[int, bytes]:
        resp = ctypes.create_string_buffer(4000)
        arg = bytearray(_IOCTL.pack(1, ctypes.addressof(req), ctypes.addressof(resp), 0))
        rc = self._ioctl(fd, nr, arg)
        _, _, _, exitinfo2 = _IOCTL.unpack(bytes(arg))
        if rc != 0:
            return exitinfo2 or -1, b""
        return 0, resp.raw

    def _ext_report(self, fd: int, report_data: bytes) -> bytes:
        certs_len = 4 * 4096
        for _ in range(3):
            certs = ctypes.create_string_buffer(certs_len)
            req = ctypes.create_string_buffer(_EXT_REQ.pack(
                report_data, self.vmpl, ctypes.addressof(certs), certs_len), _EXT_REQ.size)
            err, resp = self._call(fd, SNP_GET_EXT_REPORT, req)
            if err == 0:
                report = _report_from_resp(resp)
                table = certs.raw
                if any(table[:24]):
                    return Evidence.from_cert_table(report, table).to_bytes()
                return Evidence(report=report).to_bytes()
            vmm_error = err >> 32
            if vmm_error == _VMM_ERR_INVALID_LEN:
                # The host needs a larger buffer and told us how large.
                certs_len = _EXT_REQ.unpack(req.raw)[3]
                continue
            break
        req = ctypes.create_string_buffer(_REQ.pack(report_data, self.vmpl), _REQ.size)
        err, resp = self._call(fd, SNP_GET_REPORT, req)
        if err:
            raise ProviderError(
                f"SNP_GET_REPORT failed: firmware error 0x{err & 0xffffffff:x}, "
                f"VMM error 0x{err >> 32:x}")
        return Evidence(report=_report_from_resp(resp)).to_bytes()


def _report_from_resp(resp: bytes) -> bytes:
    status, size = struct.unpack_from("<II", resp, 0)
    if status != 0:
        raise ProviderError(f"firmware refused the report request: status 0x{status:x}")
    if size != 0x4A0 or len(resp) < _MSG_REPORT_RSP_HDR + size:
        raise ProviderError(f"firmware returned a report of {size} bytes")
    return resp[_MSG_REPORT_RSP_HDR : _MSG_REPORT_RSP_HDR + size]


def _real_ioctl(fd: int, request: int, arg: bytearray) -> int:
    import fcntl

    try:
        fcntl.ioctl(fd, request, arg, True)
    except OSError:
        return -1
    return 0


def auto_provider(override: str | None = None) -> ConfigfsTsmProvider | SevGuestProvider:
    """configfs-tsm when present, else /dev/sev-guest; ``override`` names one."""
    if override == "configfs" or (override is None and CONFIGFS_TSM_REPORT.is_dir()):
        return ConfigfsTsmProvider()
    if override == "sev-guest" or (override is None and SEV_GUEST_DEVICE.exists()):
        return SevGuestProvider()
    if override not in (None, "configfs", "sev-guest"):
        raise ProviderError(f"unknown provider {override!r} (configfs, sev-guest)")
    raise ProviderError(
        "this is not an SEV-SNP guest: neither /sys/kernel/config/tsm/report nor "
        "/dev/sev-guest exists (use the simulated platform for tests and demos)")

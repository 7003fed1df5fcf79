"""The VM tests' guest: ONE QEMU guest (ctlive.testing.vm.VmHost) per test session, on a
bridge of ctlive.testing.hosts, with ``ctlive serve`` running inside it."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pytest
from criu_harness import require_criu

from ctlive.attest import SnpPolicy
from ctlive.identity import Identity
from ctlive.testing.hosts import Network
from ctlive.testing.vm import VmHost

SRC, DST = Identity(bytes(range(1, 33))), Identity(bytes(range(33, 65)))
PORT = 7788


@attrs.frozen
class Guest:
    net: Network
    vm: VmHost
    policy: SnpPolicy
    """Trusts the guest receiver's simulated SNP platform (INSECURE: tests only)."""

    @property
    def address(self) -> tuple[str, int]:
        return (self.vm.ip, PORT)


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    require_criu()
    net = Network(index=226)  # 230-250 are other tests'
    try:
        vm = VmHost(net, memory="2G")
        try:
            key, allow, chain = vm.dir / "dst.key", vm.dir / "allow.txt", vm.dir / "chain.pem"
            DST.save(key, force=True)
            allow.write_text(SRC.public_key.hex() + "\n")
            vm.serve(key=key, allow=allow, chain=chain, port=PORT)
            yield Guest(net, vm, SnpPolicy(allow_any_measurement=True,
                                           simulated_chain=str(chain)))
        finally:
            vm.close()
    finally:
        net.close()

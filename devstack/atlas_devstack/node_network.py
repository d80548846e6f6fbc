"""The deploy node's network on this machine: the bridge, the Service route, sysctls, iptables.

Pods get their own network namespaces on the bridge `atlas0` (10.244.0.0/24, the node is
10.244.0.1; the CNI bridge plugin adds a veth per pod). The Service range (10.0.0.0/24) is routed
onto the bridge so that kube-proxy's rules make Services reachable from this host. Pod traffic
never leaves the machine: an iptables chain drops anything forwarded between the bridge and any
other interface. `NodeNetwork.down()` removes all of it and restores the sysctls it changed;
`remove_owned_chains()` removes the chains the kubelet and the portmap plugin leave behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

from .controlplane import SERVICE_CIDR

BRIDGE = "atlas0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
ISOLATION_CHAIN = "ATLAS-NODE-ISOLATION"


class NetworkError(RuntimeError):
    pass


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name.replace(".", "/")).write_text(value + "\n")


def _iptables(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return _run("iptables", "-w", "5", *args, check=check)


class NodeNetwork:
    """The bridge, the Service route, the sysctls a node needs and the isolation rules.

    State (previous sysctl values) in <dir>/network.json, so `down` restores the host."""

    SYSCTLS: ClassVar[dict[str, str]] = {
        "net.ipv4.ip_forward": "1",
        "net.bridge.bridge-nf-call-iptables": "1",
        # Without it conntrack marks some packets of short-lived connections to a ClusterIP
        # INVALID; they escape kube-proxy's DNAT and the client sees "connection refused"
        # (measured: 6 in 3026 requests through the Service, 0 with it, 0 to a pod IP). The
        # same setting as kube-proxy's conntrack.tcpBeLiberal.
        "net.netfilter.nf_conntrack_tcp_be_liberal": "1",
    }

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.state_file = self.dir / "network.json"

    def up(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sysctl, module in (
            ("net.bridge.bridge-nf-call-iptables", "br_netfilter"),
            ("net.netfilter.nf_conntrack_tcp_be_liberal", "nf_conntrack"),
        ):
            if _read_sysctl(sysctl) is None:
                _run("modprobe", module, check=False)
        saved = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        for name, value in self.SYSCTLS.items():
            current = _read_sysctl(name)
            if current is None:
                raise NetworkError(f"sysctl {name} is missing (kernel module not loaded?)")
            saved.setdefault(name, current)
            if current != value:
                _write_sysctl(name, value)
        self.state_file.write_text(json.dumps(saved))
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        prefix = POD_CIDR.split("/")[1]
        if f"{NODE_IP}/{prefix}" not in _run("ip", "-o", "addr", "show", "dev", BRIDGE).stdout:
            _run("ip", "addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # Host -> ClusterIP: route the Service range onto the bridge (kube-proxy DNATs it),
        # never to the default gateway.
        _run("ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)
        # Pod traffic stays on this machine: the bridge plugin turns on IP forwarding, so drop
        # whatever would be forwarded between the bridge and any other interface.
        if _iptables("-n", "-L", ISOLATION_CHAIN).returncode != 0:
            _iptables("-N", ISOLATION_CHAIN, check=True)
        _iptables("-F", ISOLATION_CHAIN, check=True)
        _iptables("-A", ISOLATION_CHAIN, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP", check=True)
        _iptables("-A", ISOLATION_CHAIN, "!", "-i", BRIDGE, "-o", BRIDGE, "-j", "DROP", check=True)
        if _iptables("-C", "FORWARD", "-j", ISOLATION_CHAIN).returncode != 0:
            _iptables("-I", "FORWARD", "1", "-j", ISOLATION_CHAIN, check=True)

    def down(self) -> list[str]:
        """Remove the bridge (and any veth still on it), the route, our iptables chains;
        restore the sysctls. Returns what was removed."""
        removed = []
        veths = _run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout
        for line in veths.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0]
            _run("ip", "link", "delete", name, check=False)
            removed.append(f"veth {name}")
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            _run("ip", "link", "delete", BRIDGE, check=False)
            removed.append(f"bridge {BRIDGE}")
        # (the Service route went with the bridge)
        while _iptables("-D", "FORWARD", "-j", ISOLATION_CHAIN).returncode == 0:
            pass
        if _iptables("-X", ISOLATION_CHAIN).returncode == 0 or _iptables("-F", ISOLATION_CHAIN).returncode == 0:
            _iptables("-X", ISOLATION_CHAIN)
            removed.append(f"iptables chain {ISOLATION_CHAIN}")
        removed += remove_owned_chains()
        if self.state_file.exists():
            for name, value in json.loads(self.state_file.read_text()).items():
                if _read_sysctl(name) not in (None, value):
                    _write_sysctl(name, value)
            self.state_file.unlink()
        return removed


# Chains the kubelet (KUBE-FIREWALL, canaries, hint) and the portmap plugin create; kube-proxy's
# own are removed by `kube-proxy --cleanup`.
OWNED_CHAINS = {
    "filter": ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "CNI-FORWARD"),
    "nat": (
        "KUBE-KUBELET-CANARY",
        "CNI-HOSTPORT-DNAT",
        "CNI-HOSTPORT-SNAT",
        "CNI-HOSTPORT-MASQ",
        "CNI-HOSTPORT-SETMARK",
    ),
    "mangle": ("KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"),
}


def remove_owned_chains() -> list[str]:
    """Delete OWNED_CHAINS (IPv4 and IPv6): jumps to them first, then the chains."""
    removed = []
    for binary in ("iptables", "ip6tables"):
        if not shutil.which(binary):
            continue
        ipt = lambda *a: _run(binary, "-w", "5", *a, check=False)  # noqa: B023, E731
        for table, chains in OWNED_CHAINS.items():
            rules = ipt("-t", table, "-S").stdout.splitlines()
            present = [c for c in chains if f"-N {c}" in rules]
            for rule in rules:
                parts = rule.split()
                if (
                    parts[:1] == ["-A"]
                    and "-j" in parts
                    and parts[parts.index("-j") + 1] in present
                    and parts[1] not in present
                ):
                    ipt("-t", table, "-D", *parts[1:])
            for chain in present:
                ipt("-t", table, "-F", chain)
            for chain in present:
                if ipt("-t", table, "-X", chain).returncode == 0:
                    removed.append(f"{binary} {table}/{chain}")
    return removed

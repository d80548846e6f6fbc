"""One Kubernetes node on this machine: containerd, kubelet, kube-proxy and a CNI bridge.

Everything is built from source (`make node-tools`) and lives under the node's state dir
(`.deploy/node/`): containerd's root, state and socket, the kubelet's root dir and pod logs,
the CNI config and IP allocations. The network (bridge `atlas0`, routes, isolation rules) is
atlas_devstack.node_network's. Nothing listens beyond the bridge address and loopback.

The control plane runs in cluster mode (ControlPlane(node_ip=NODE_IP)) and binds the bridge
address, so the bridge comes up first (`NodeNetwork.up()`), then the control plane, then
`Node.start()`.

Teardown (`Node.stop_from_state_dir`) is thorough because a node leaves things behind that a
process kill does not remove: containerd shims and their containers, network namespaces and
veths, overlay/tmpfs/shm mounts, iptables chains, cgroups. Each is found from the state dir
(or the names this module owns) and removed; what remained is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from .controlplane import ControlPlane, _Pki
from .node_images import pause_image, write_pause
from .node_network import BRIDGE, NODE_IP, POD_CIDR
from .processes import pid_alive, pid_cmdline, terminate
from .tools import cni_bin_dir, find_tool
from .waiting import WaitTimeout, wait_for

NODE_NAME = "atlas-node"
CLUSTER_DNS_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
CRI_NAMESPACE = "k8s.io"
DAEMONS = ("kube-proxy", "kubelet", "containerd")  # stop order
POLL = 0.1


class NodeError(RuntimeError):
    pass


def _run(*argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise NodeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- node


class Node:
    """containerd + kubelet + kube-proxy for the control plane `cp` (in cluster mode)."""

    def __init__(
        self,
        state_dir: str | Path,
        cp: ControlPlane,
        *,
        startup_timeout: float = 120.0,
        log: Callable[[str], None] | None = None,
    ):
        self.dir = Path(state_dir).resolve()
        self.cp = cp
        self.startup_timeout = startup_timeout
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.containerd_dir = self.dir / "containerd"
        self.socket = self.containerd_dir / "containerd.sock"
        self.kubelet_dir = self.dir / "kubelet"
        self.cni_dir = self.dir / "cni"
        self.logs = self.dir / "logs"
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- public API

    def start(self) -> "Node":
        if self.cp.node_ip != NODE_IP:
            raise NodeError(f"the control plane must run in cluster mode with node_ip={NODE_IP}")
        for d in (self.logs, self.cni_dir / "net.d", self.cni_dir / "ipam"):
            d.mkdir(parents=True, exist_ok=True)
        if self.is_running(self.dir):
            raise NodeError(f"a node is already running from {self.dir}")
        t0 = time.monotonic()
        self._start_containerd()
        self.import_image(self._pause_archive())
        self._start_kubelet()
        self._start_kube_proxy()
        self._wait_node_ready()
        self._log(
            f"[node] {NODE_NAME} Ready in {time.monotonic() - t0:.1f}s "
            f"(containerd {self.socket}, bridge {BRIDGE} {NODE_IP})"
        )
        return self

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run(
            str(find_tool("ctr")),
            "--address",
            str(self.socket),
            "-n",
            CRI_NAMESPACE,
            *args,
            check=check,
            timeout=timeout,
        )

    def import_image(self, archive: Path) -> None:
        """Load an image archive (docker save or OCI layout) into the CRI namespace, unpacked."""
        self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))

    def images(self) -> set[str]:
        return set(self.ctr("images", "ls", "-q").stdout.split())

    @classmethod
    def is_running(cls, state_dir: str | Path) -> bool:
        return any(_pid_of(Path(state_dir), name) for name in DAEMONS)

    @classmethod
    def stop_from_state_dir(
        cls, state_dir: str | Path, log: Callable[[str], None] | None = None, timeout: float = 30.0
    ) -> list[str]:
        """Stop the node of `state_dir` and remove everything it left; returns what it did."""
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        state = Path(state_dir).resolve()
        done: list[str] = []
        for name in ("kube-proxy", "kubelet"):
            if _stop_daemon(state, name, timeout):
                done.append(f"stopped {name}")
        socket_path = state / "containerd" / "containerd.sock"
        if _pid_of(state, "containerd") and socket_path.exists():
            done += _remove_all_containers(state, socket_path)
        if _stop_daemon(state, "containerd", timeout):
            done.append("stopped containerd")
        done += _kill_orphaned_shims(socket_path)
        done += _unmount_under(state)
        done += _remove_netns(state)
        try:
            _run(str(find_tool("kube-proxy")), "--cleanup", check=False, timeout=60)
            done.append("kube-proxy --cleanup")
        except Exception as exc:  # noqa: BLE001 - a missing binary must not stop the teardown
            log(f"[node] kube-proxy --cleanup skipped: {exc}")
        done += _remove_kubepods_cgroups()
        done += _remove_container_log_links(state)
        for sub in ("containerd", "kubelet", "cni"):
            shutil.rmtree(state / sub, ignore_errors=True)
        return done

    # ---- containerd

    def _pause_archive(self) -> Path:
        return write_pause(self.dir / "images" / "pause.tar")

    def _containerd_config(self) -> str:
        runtime_root = self.containerd_dir / "runc"
        return f"""\
# Written by atlas_devstack.node: a containerd of its own for the Atlas deploy node.
version = 3
root = "{self.containerd_dir / "root"}"
state = "{self.containerd_dir / "state"}"
# The sandbox refuses to lower oom_score_adj: leave containerd's own as it is.
oom_score = 0
# NRI would open /var/run/nri/nri.sock; the node does not use it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.containerd_dir / "opt"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause_image()}"

[plugins."io.containerd.cri.v1.runtime"]
  # The sandbox refuses oom_score_adj below the runtime's own: without this every pod
  # sandbox fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Network namespaces under the state dir, not /var/run/netns: teardown finds them there.
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
        Root = "{runtime_root}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin_dir()}"]
    conf_dir = "{self.cni_dir / "net.d"}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

    def _cni_config(self) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": "atlas",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.cni_dir / "ipam"),
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _start_containerd(self) -> None:
        (self.containerd_dir).mkdir(parents=True, exist_ok=True)
        config = self.containerd_dir / "config.toml"
        config.write_text(self._containerd_config())
        (self.cni_dir / "net.d" / "10-atlas.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        containerd = find_tool("containerd")
        shim = find_tool("containerd-shim-runc-v2")
        # containerd finds its shim on PATH: ours first (Debian's containerd 1.6 shim, which
        # docker.io installs, does not work with containerd 2).
        env = {**os.environ, "PATH": f"{shim.parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        self._spawn("containerd", [str(containerd), "--config", str(config)], env=env)
        wait_for(
            "containerd socket",
            lambda: self.socket.exists() and self.ctr("version", check=False, timeout=10).returncode == 0,
            self.startup_timeout,
            interval=POLL,
            failed=self._died,
            error=NodeError,
        )

    # ---- kubelet

    def _start_kubelet(self) -> None:
        pki = _Pki(self.cp.dir)
        kubeconfig = self.cp.node_kubeconfig("kubelet", f"system:node:{NODE_NAME}", ("system:nodes",))
        serving_crt, serving_key = pki.issue_files(
            "kubelet-serving", f"system:node:{NODE_NAME}", server_sans=(NODE_IP, NODE_NAME)
        )
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # The kubelet API (logs, exec) on the node's bridge address only; health on loopback.
            "address": NODE_IP,
            "port": ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": ports["kubelet_healthz"],
            "tlsCertFile": str(serving_crt),
            "tlsPrivateKeyFile": str(serving_key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # This kernel mounts cgroup v1 (the kubelet refuses it unless told otherwise).
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            # The sandbox refuses lowering oom_score_adj (the kubelet's default is -999).
            "oomScoreAdj": 0,
            "clusterDNS": [CLUSTER_DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            # Pods resolve through CoreDNS only: no upstream resolver, nothing leaves the machine.
            "resolvConf": "",
            "podLogsDir": str(self.dir / "pod-logs"),
            "volumePluginDir": str(self.kubelet_dir / "volume-plugins"),
            "staticPodPath": "",
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "serializeImagePulls": False,
            # Images are imported, never pulled: never garbage-collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # The disk is shared with the rest of the machine: evict only when really short.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
                "nodefs.inodesFree": "2%",
            },
            "mergeDefaultEvictionSettings": False,
            "maxPods": 110,
            "shutdownGracePeriod": "0s",
        }
        config_path = self.kubelet_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn(
            "kubelet",
            [
                str(find_tool("kubelet")),
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.kubelet_dir / 'root'}",
                f"--cert-dir={self.kubelet_dir / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        kubeconfig = self.cp.node_kubeconfig("kube-proxy", "system:kube-proxy")
        ports = self._ports()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"127.0.0.1:{ports['kube_proxy_healthz']}",
            "metricsBindAddress": f"127.0.0.1:{ports['kube_proxy_metrics']}",
            # NodePorts only on the node's bridge address, never on this machine's interfaces.
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "iptables": {"localhostNodePorts": False},
            # Leave the host's conntrack sysctls alone (0 = do not set).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        path = self.dir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn("kube-proxy", [str(find_tool("kube-proxy")), f"--config={path}", "--v=1"])

    def _wait_node_ready(self) -> None:
        def ready() -> bool:
            res = self.cp.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if res.returncode != 0:
                return False
            conds = {c["type"]: c["status"] for c in json.loads(res.stdout)["status"].get("conditions", [])}
            return conds.get("Ready") == "True"

        wait_for(
            f"node {NODE_NAME} Ready", ready, self.startup_timeout, interval=POLL, failed=self._died, error=NodeError
        )

    # ---- processes

    def _ports(self) -> dict[str, int]:
        path = self.dir / "ports.json"
        if path.exists():
            return json.loads(path.read_text())
        ports = {
            "kubelet": _free_port(NODE_IP),
            "kubelet_healthz": _free_port("127.0.0.1"),
            "kube_proxy_healthz": _free_port("127.0.0.1"),
            "kube_proxy_metrics": _free_port("127.0.0.1"),
        }
        path.write_text(json.dumps(ports))
        return ports

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        with open(self.logs / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,
            )
        self._procs[name] = proc
        (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _died(self) -> str | None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}; log tail:\n" + _tail(self.logs / f"{name}.log")
        return None


# --------------------------------------------------------------------------- teardown helpers


def _pid_of(state: Path, name: str) -> int | None:
    """The pid in <state>/<name>.pid if that process is still ours (pids get reused)."""
    try:
        pid = int((state / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    cmdline = pid_cmdline(pid)
    if pid_alive(pid) and name in cmdline and str(state) in cmdline:
        return pid
    return None


def _stop_daemon(state: Path, name: str, timeout: float) -> bool:
    pid = _pid_of(state, name)
    if pid is None:  # not running (or the pid was reused): only the stale pidfile goes
        (state / f"{name}.pid").unlink(missing_ok=True)
        return False
    terminate(pid, timeout)  # SIGTERM, then SIGKILL after the timeout
    (state / f"{name}.pid").unlink(missing_ok=True)
    return True


def _remove_all_containers(state: Path, socket_path: Path) -> list[str]:
    """Kill and delete every task and container in the CRI namespace (the kubelet is gone)."""
    try:
        ctr = [str(find_tool("ctr")), "--address", str(socket_path), "-n", CRI_NAMESPACE]
    except Exception:  # noqa: BLE001
        return []
    done = []
    tasks = _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split()
    for task in tasks:
        _run(*ctr, "tasks", "kill", "-s", "SIGKILL", task, check=False)
    for task in tasks:
        try:
            wait_for(
                f"task {task} deleted",
                lambda: _run(*ctr, "tasks", "delete", task, check=False).returncode == 0,  # noqa: B023 (run in this iteration)
                15,
                interval=POLL,
            )
        except WaitTimeout:
            pass  # its container is deleted below all the same
    if tasks:
        done.append(f"killed {len(tasks)} container task(s)")
    containers = _run(*ctr, "containers", "ls", "-q", check=False).stdout.split()
    for c in containers:
        _run(*ctr, "containers", "delete", c, check=False)
    return done


def _kill_orphaned_shims(socket_path: Path) -> list[str]:
    """Shims outlive containerd by design; ours name our containerd's socket."""
    done = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        cmdline = pid_cmdline(int(proc.name))
        if "containerd-shim" in cmdline and str(socket_path) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                done.append(f"killed shim {proc.name}")
            except ProcessLookupError:
                pass
    return done


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == str(root):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def _unmount_under(state: Path) -> list[str]:
    done = []
    for _ in range(3):  # a mount may hide another at the same point
        points = _mounts_under(state)
        if not points:
            break
        for point in points:
            if _run("umount", point, check=False).returncode != 0:
                _run("umount", "-l", point, check=False)
            done.append(f"unmounted {point}")
    return done


def _remove_netns(state: Path) -> list[str]:
    """Network namespaces containerd pinned under its state dir: once unmounted and removed,
    the kernel frees them with their veth ends."""
    done = []
    for d in (state / "containerd" / "state").glob("**/netns"):
        for ns in d.iterdir():
            ns.unlink(missing_ok=True)
            done.append(f"removed netns {ns.name}")
    return done


def _remove_kubepods_cgroups() -> list[str]:
    """The kubelet (cgroupfs driver) creates kubepods/ under each cgroup v1 hierarchy."""
    removed = 0
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.glob("**/") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
                removed += 1
            except OSError:
                pass
    return [f"removed {removed} kubepods cgroup(s)"] if removed else []


def _remove_container_log_links(state: Path) -> list[str]:
    """The kubelet links each container's log into /var/log/containers (a fixed path)."""
    links = Path("/var/log/containers")
    removed = 0
    if links.is_dir():
        for link in links.iterdir():
            try:
                if link.is_symlink() and os.readlink(link).startswith(str(state)):
                    link.unlink()
                    removed += 1
            except OSError:
                pass
    return [f"removed {removed} log link(s) in {links}"] if removed else []

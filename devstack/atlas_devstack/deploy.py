"""`make deploy-up` / `make deploy-down`: Atlas as pods on a single-node cluster on this machine.

`python -m atlas_devstack.deploy up` builds the gateway, operator and mock-upstream images
(hack/images.sh, Docker from Debian's packages), brings up the node network, the control plane
in cluster mode (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), the node
(containerd, kubelet, kube-proxy, CNI bridge), loads the images, runs CoreDNS and a default
StorageClass, the mock upstream (unless ATLAS_UPSTREAM_URL is set), and installs the chart with
`helm upgrade --install --wait` and its default values (only the image references and the
upstream URL are set). It writes `.deploy/env`. Run again, it rebuilds the images and upgrades
the release in place, keeping the cluster.

`python -m atlas_devstack.deploy down` removes everything: pods, node, processes, mounts,
network devices, iptables chains; it keeps `.deploy/logs/` for a post-mortem.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import string
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import yaml

from .controlplane import ControlPlane
from .node import CLUSTER_DNS_IP, NODE_NAME, Node, NodeError, _mounts_under
from .node_images import coredns_image, redis_image, write_coredns, write_redis
from .node_network import BRIDGE, NODE_IP, NetworkError, NodeNetwork
from .processes import pid_cmdline
from .tools import BIN_DIR, REPO_ROOT, find_tool
from .waiting import wait_for

DEFAULT_STATE_DIR = REPO_ROOT / ".deploy"
MANIFESTS = REPO_ROOT / "hack" / "deploy"
CHART = REPO_ROOT / "charts" / "atlas"
RELEASE = os.environ.get("ATLAS_RELEASE", "atlas")
NAMESPACE = os.environ.get("ATLAS_NAMESPACE", "atlas-system")
MOCK_NAME = "atlas-mock-upstream"
MOCK_PORT = 8000
SPARE_VOLUMES = 3
APP_IMAGES = ("gateway", "operator", "mock-upstream")  # hack/images.sh save DIR -> DIR/<name>.tar


class DeployError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _bridge_exists() -> bool:
    return subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0


def _other_node(node_dir: Path) -> str | None:
    """A kubelet of this module's node name started from another state dir, if any."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            cmdline = pid_cmdline(int(proc.name))
            if "kubelet" in cmdline and f"--hostname-override={NODE_NAME}" in cmdline and str(node_dir) not in cmdline:
                return f"kubelet pid {proc.name}"
    return None


class DeployStack:
    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        upstream_url: str | None = None,
        log: Callable[[str], None] | None = None,
        timeout: float = 300.0,
    ):
        self.dir = Path(state_dir).resolve()
        self.upstream_url = upstream_url if upstream_url is not None else os.environ.get("ATLAS_UPSTREAM_URL")
        self.timeout = timeout
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.cp_dir = self.dir / "controlplane"
        self.node_dir = self.dir / "node"
        self.images_dir = self.dir / "images"
        self.logs = self.dir / "logs"
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ paths, tools

    @property
    def kubeconfig(self) -> Path:
        return self.cp_dir / "kubeconfig"

    @property
    def env_file(self) -> Path:
        return self.dir / "env"

    def tool_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.cp_dir / "kube-cache"),
            "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.dir / "helm" / "data"),
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return self._run([str(find_tool("kubectl")), *args], input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return self._run([str(find_tool("helm")), *args], check=check, timeout=timeout)

    def _run(
        self, argv: list[str], input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, env=self.tool_env(), input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise DeployError(
                f"{' '.join(argv[:4])}... exited {res.returncode}: {(res.stderr or res.stdout).strip()[-2000:]}"
            )
        return res

    def _phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - since, 1)
        self._log(f"[deploy] {name}: {now - since:.1f}s")
        return now

    # ------------------------------------------------------------------ up

    def up(self) -> dict[str, str]:
        t0 = t = time.monotonic()
        for d in (self.dir, self.logs, self.images_dir):
            d.mkdir(parents=True, exist_ok=True)
        archives = self.build_images()
        t = self._phase("images built", t)
        try:
            self.start_cluster()
            t = self._phase("cluster up", t)
            self.load_images(archives)
            t = self._phase("images loaded", t)
            self.install_addons()
            t = self._phase("CoreDNS and storage", t)
            upstream = self.ensure_upstream()
            t = self._phase("upstream", t)
            self.helm_install(upstream, archives)
            t = self._phase("helm upgrade --install --wait", t)
            env = self.write_env()
        except BaseException:
            self._log(f"[deploy] failed; logs in {self.logs} (make deploy-down removes everything)")
            raise
        self.timings["total"] = round(time.monotonic() - t0, 1)
        (self.dir / "timings.json").write_text(json.dumps(self.timings, indent=2))
        self._log(f"[deploy] up in {self.timings['total']:.1f}s; source {self.env_file}")
        return env

    # ---- images

    def build_images(self) -> dict[str, Path]:
        """Image archives: the app images from hack/images.sh (docker save), and the node's own."""
        out = self.images_dir
        with open(self.logs / "images.log", "ab") as log_file:
            res = subprocess.run(
                ["bash", str(REPO_ROOT / "hack" / "images.sh"), "save", str(out)],
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        if res.returncode != 0:
            raise DeployError(f"hack/images.sh failed ({res.returncode}):\n" + _tail(self.logs / "images.log"))
        archives: dict[str, Path] = {}
        for name in APP_IMAGES:
            path = out / f"{name}.tar"
            if not path.is_file():
                raise DeployError(f"hack/images.sh did not write {path}")
            archives[name] = path
        archives["coredns"] = write_coredns(out / "coredns.tar")
        archives["redis"] = write_redis(out / "redis.tar")
        return archives

    def load_images(self, archives: dict[str, Path]) -> None:
        node = self._node()
        for path in archives.values():
            node.import_image(path)

    # ---- cluster

    def start_cluster(self) -> None:
        other = _other_node(self.node_dir)
        if other:
            raise DeployError(
                f"another deploy node runs on this machine ({other}); one node per "
                "machine: stop it first (python -m atlas_devstack.deploy --state-dir DIR down)"
            )
        NodeNetwork(self.node_dir).up()
        if not ControlPlane.is_running(self.cp_dir):
            # The chart installs the CRDs (as on any cluster), not the control plane.
            ControlPlane(self.cp_dir, node_ip=NODE_IP, apply_crds=False, log=self._log).start()
            for path in (self.cp_dir / "logs").glob("*.log"):
                self._link_log(path.stem, path)
        else:
            self._log(f"[deploy] control plane already running ({self.cp_dir})")
        if not Node.is_running(self.node_dir):
            self._node().start()
            for path in (self.node_dir / "logs").glob("*.log"):
                self._link_log(path.stem, path)
        else:
            self._log(f"[deploy] node already running ({self.node_dir})")

    def _node(self) -> Node:
        return Node(self.node_dir, ControlPlane.attach(self.cp_dir, node_ip=NODE_IP), log=self._log)

    def _apply_template(self, name: str, **values: str) -> None:
        text = string.Template((MANIFESTS / name).read_text()).substitute(values)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text)

    def install_addons(self) -> None:
        self._apply_template("coredns.yaml", IMAGE=coredns_image(), DNS_IP=CLUSTER_DNS_IP)
        self._apply_template("storage.yaml")
        volumes = self.dir / "volumes"
        docs = []
        for i in range(SPARE_VOLUMES):
            path = volumes / f"pv-{i}"
            path.mkdir(parents=True, exist_ok=True)
            # hostPath ignores fsGroup: the bundled Redis (UID/GID 999 in the chart) must own it.
            os.chown(path, 999, 999)
            os.chmod(path, 0o700)
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"atlas-local-{i}"},
                    "spec": {
                        "capacity": {"storage": "1Gi"},
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "atlas-local",
                        "persistentVolumeReclaimPolicy": "Retain",
                        "hostPath": {"path": str(path), "type": "Directory"},
                    },
                }
            )
        self.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
        self.kubectl(
            "rollout",
            "status",
            "-n",
            "kube-system",
            "deployment/coredns",
            f"--timeout={int(self.timeout)}s",
            timeout=self.timeout + 10,
        )

    def ensure_upstream(self) -> str:
        """ATLAS_UPSTREAM_URL when given (and the mock removed), else the mock upstream pod."""
        self.kubectl("create", "namespace", NAMESPACE, check=False)
        if self.upstream_url:
            self.kubectl(
                "delete", "deployment,service", MOCK_NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=false"
            )
            return self.upstream_url
        self._apply_template(
            "mock-upstream.yaml",
            NAME=MOCK_NAME,
            NAMESPACE=NAMESPACE,
            IMAGE=self._image_ref("mock-upstream"),
            PORT=str(MOCK_PORT),
        )
        self.kubectl(
            "rollout",
            "status",
            "-n",
            NAMESPACE,
            f"deployment/{MOCK_NAME}",
            f"--timeout={int(self.timeout)}s",
            timeout=self.timeout + 10,
        )
        return f"http://{MOCK_NAME}.{NAMESPACE}.svc:{MOCK_PORT}"

    def _image_ref(self, name: str) -> str:
        """The reference an archive from hack/images.sh carries (docker save's manifest)."""
        import tarfile

        with tarfile.open(self.images_dir / f"{name}.tar") as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        return manifest[0]["RepoTags"][0]

    def _image_id(self, path: Path) -> str:
        import tarfile

        with tarfile.open(path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        return manifest[0]["Config"].rsplit("/", 1)[-1].replace("sha256:", "")[:16]

    def helm_install(self, upstream: str, archives: dict[str, Path]) -> None:
        repo, tag = redis_image()
        values = {
            "gateway": {
                "upstream": {"url": upstream},
                # A rebuilt image under the same tag rolls the pods (else `up` would not upgrade).
                "podAnnotations": {"atlas.bugvanquisher.io/image-id": self._image_id(archives["gateway"])},
            },
            "operator": {"podAnnotations": {"atlas.bugvanquisher.io/image-id": self._image_id(archives["operator"])}},
            # The chart's default Redis image cannot be pulled here: the node's own (Debian's).
            "redis": {"bundled": {"image": {"repository": repo, "tag": tag}}},
        }
        values_file = self.dir / "values-deploy.yaml"
        values_file.write_text(
            "# written by atlas_devstack.deploy: what differs from the chart defaults\n"
            + yaml.safe_dump(values, sort_keys=False)
        )
        t0 = time.monotonic()
        self.helm(
            "upgrade",
            "--install",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--values",
            str(values_file),
            "--wait",
            f"--timeout={int(self.timeout)}s",
            timeout=self.timeout + 30,
        )
        self.wait_gateway_served(deadline=t0 + self.timeout)
        self.timings["helm_install_seconds"] = round(time.monotonic() - t0, 1)

    def wait_gateway_served(self, deadline: float) -> None:
        """`helm --wait` returns once the new pods are ready, while an upgrade's old pods may still
        be terminating and listed behind the Service: wait until the rollout is complete, the
        Service's endpoints are exactly its ready pods, and the Service answers several times in a
        row (kube-proxy has caught up), so that `up` returns with the Service working."""
        selector = "app.kubernetes.io/component=gateway"
        self.kubectl(
            "rollout",
            "status",
            "deployment",
            "-n",
            NAMESPACE,
            "-l",
            selector,
            f"--timeout={max(1, int(deadline - time.monotonic()))}s",
            timeout=self.timeout,
        )

        def endpoints_are_the_ready_pods() -> bool:
            pods = json.loads(self.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout)
            ready = {
                p["status"].get("podIP")
                for p in pods["items"]
                if not p["metadata"].get("deletionTimestamp")
                and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
            }
            slices = json.loads(
                self.kubectl(
                    "get",
                    "endpointslices",
                    "-n",
                    NAMESPACE,
                    "-l",
                    "kubernetes.io/service-name=" + self._gateway_service(),
                    "-o",
                    "json",
                ).stdout
            )
            listed = {
                addr for s in slices["items"] for ep in s.get("endpoints") or [] for addr in ep.get("addresses", [])
            }
            return bool(ready) and listed == ready

        wait_for(
            "the gateway Service's endpoints to be exactly its ready pods",
            endpoints_are_the_ready_pods,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        url = self.gateway_url() + "/healthz"
        answered = 0

        def answers_in_a_row() -> bool:
            nonlocal answered
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    answered = answered + 1 if resp.status == 200 else 0
            except OSError:
                answered = 0
            return answered >= 10

        wait_for(
            f"{url} to answer 10 times in a row",
            answers_in_a_row,
            timeout=max(1.0, deadline - time.monotonic()),
            interval=0.05,
        )

    def _gateway_service(self) -> str:
        svc = json.loads(
            self.kubectl(
                "get", "service", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=gateway", "-o", "json"
            ).stdout
        )["items"]
        if not svc:
            raise DeployError(f"no gateway Service in namespace {NAMESPACE}")
        return svc[0]["metadata"]["name"]

    def gateway_url(self) -> str:
        svc = json.loads(
            self.kubectl(
                "get", "service", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=gateway", "-o", "json"
            ).stdout
        )["items"]
        if not svc:
            raise DeployError(f"no gateway Service in namespace {NAMESPACE}")
        spec = svc[0]["spec"]
        return f"http://{spec['clusterIP']}:{spec['ports'][0]['port']}"

    def write_env(self) -> dict[str, str]:
        env = {
            "KUBECONFIG": str(self.kubeconfig),
            "ATLAS_NAMESPACE": NAMESPACE,
            "ATLAS_RELEASE": RELEASE,
            "ATLAS_GATEWAY_URL": self.gateway_url(),
            "ATLAS_HOST_FROM_PODS": NODE_IP,
            "PATH": f"{BIN_DIR}:$PATH",
        }
        lines = ["# written by `make deploy-up` (python -m atlas_devstack.deploy up): . .deploy/env"]
        for key, value in env.items():
            rendered = f'"{value}"' if key == "PATH" else shlex.quote(value)
            lines.append(f"export {key}={rendered}")
        self.env_file.write_text("\n".join(lines) + "\n")
        return env

    def _link_log(self, name: str, target: Path) -> None:
        link = self.logs / f"{name}.log"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    # ------------------------------------------------------------------ down

    def down(self, timeout: float = 60.0) -> list[str]:
        done: list[str] = []
        if not (self.cp_dir.exists() or self.node_dir.exists()) and not _bridge_exists():
            return done  # never started (or already down): nothing to look for
        if ControlPlane.is_running(self.cp_dir) and Node.is_running(self.node_dir):
            done += self._drain(timeout)
        done += Node.stop_from_state_dir(self.node_dir, log=self._log)
        if self.cp_dir.is_dir():
            done += [f"stopped {n}" for n in ControlPlane.stop_from_state_dir(self.cp_dir)]
        done += NodeNetwork(self.node_dir).down()
        leftovers = self.leftovers()
        for sub in ("controlplane", "node", "volumes", "helm", "images"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        for f in ("env", "values-deploy.yaml"):
            (self.dir / f).unlink(missing_ok=True)
        if leftovers:
            raise DeployError("deploy-down left behind: " + "; ".join(leftovers))
        return done

    def _drain(self, timeout: float) -> list[str]:
        """Delete the pods through the API while the kubelet still runs, so that it stops each
        sandbox itself (CNI DEL, netns, mounts). Controllers stop first: nothing comes back."""
        for name in ("kube-controller-manager", "kube-scheduler"):
            pidfile = self.cp_dir / f"{name}.pid"
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            if name in pid_cmdline(pid):
                os.kill(pid, 15)
        self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=5", "--wait=false", check=False)
        node = self._node()

        def no_pods() -> bool:
            res = self.kubectl("get", "pods", "-A", "-o", "name", check=False)
            return res.returncode == 0 and not res.stdout.strip()

        def no_tasks() -> bool:
            return not node.ctr("tasks", "ls", "-q", check=False).stdout.strip()

        try:
            wait_for("every pod gone", no_pods, timeout, interval=0.2, retry=(Exception,), error=DeployError)
            wait_for("every container stopped", no_tasks, timeout, interval=0.2, retry=(Exception,), error=DeployError)
        except DeployError as exc:
            self._log(f"[deploy] drain incomplete ({exc}); removing the rest by force")
            return ["drain incomplete"]
        return ["pods deleted"]

    def leftovers(self) -> list[str]:
        """What an earlier run left on this machine: processes, mounts, network devices."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                cmdline = pid_cmdline(int(proc.name))
                if str(self.dir) in cmdline:
                    found.append(f"process {proc.name}: {cmdline[:120]}")
        found += [f"mount {m}" for m in _mounts_under(self.dir)]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0]
            if name == BRIDGE or f"master {BRIDGE}" in line:
                found.append(f"network device {name}")
        for table in ("filter", "nat", "mangle"):
            rules = subprocess.run(
                ["iptables", "-w", "5", "-t", table, "-S"], capture_output=True, text=True
            ).stdout.splitlines()
            found += [
                f"iptables {table} chain {r.split()[1]}"
                for r in rules
                if r.startswith("-N ") and r.split()[1].startswith(("KUBE-", "CNI-", "ATLAS-"))
            ]
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atlas_devstack.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build, start, install (or upgrade); write .deploy/env")
    sub.add_parser("down", help="remove everything `up` started")
    args = parser.parse_args(argv)
    stack = DeployStack(args.state_dir)
    try:
        if args.command == "up":
            env = stack.up()
            print(
                f"\nAtlas is deployed on node {NODE_NAME}. In a shell:  source {stack.env_file}\n"
                f"  gateway Service {env['ATLAS_GATEWAY_URL']}  namespace {env['ATLAS_NAMESPACE']}\n"
                f"  kubectl get pods -n {env['ATLAS_NAMESPACE']}; docs/deploy.md has a walkthrough"
            )
        else:
            done = stack.down()
            print("deploy-down: " + (", ".join(done) or "nothing was running"))
    except (DeployError, NodeError, NetworkError) as exc:
        print(f"deploy-{args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

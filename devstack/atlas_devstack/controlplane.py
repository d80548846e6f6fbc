"""A local Kubernetes control plane: etcd + kube-apiserver built from source (`make tools`).

Like controller-runtime's envtest: real validation, CEL, status subresource, printer
columns, RBAC, server-side apply, finalizers. There is no kube-controller-manager, so
nothing reconciles built-in objects:
  * a deleted namespace stays Terminating forever (no namespace finalization);
  * no garbage collection of ownerReferences, no Deployments -> Pods, no token controller.
Tests therefore use a fresh namespace each and never wait for GC. The ServiceAccount
admission plugin is disabled (as envtest does): without the controller no `default`
ServiceAccount exists, and Pod creation would otherwise be refused.

Cluster mode (opt-in, `ControlPlane(..., node_ip="10.244.0.1")`, used by `make deploy-up`):
the API server binds to the node's bridge address instead of loopback (pods reach it through
the `kubernetes` Service), kube-controller-manager and kube-scheduler run too, the
ServiceAccount admission plugin and the Node authorizer are on, and the `kubernetes`
Service's endpoints are reconciled. The tiers above keep the envtest-like default.

Two modes:
  * ephemeral (default): everything in a temp dir, removed on stop(); the processes die with
    the Python process (PR_SET_PDEATHSIG) and stop() also runs at exit.
  * persistent: ControlPlane(state_dir=".dev/controlplane") keeps etcd data, certificates
    and the kubeconfig there, writes pidfiles and outlives the starting process;
    ControlPlane.stop_from_state_dir(state_dir) stops it (make dev-down).

    with ControlPlane() as cp:
        cp.kubectl("get", "atlaskeys", "-A")
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Iterable

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import processes
from .processes import pid_alive, pid_cmdline, terminate
from .tools import REPO_ROOT, ToolNotFound, find_tool
from .waiting import wait_for

ATLAS_GROUP_VERSION = "atlas.bugvanquisher.io/v1alpha1"
ATLAS_RESOURCES = ("atlaskeys", "atlasquotas", "atlaspricelists")
SERVICE_CIDR = "10.0.0.0/24"
POLL_INTERVAL = 0.05  # seconds between checks inside a deadline loop
# Stop order: the API server's clients, the API server, then its storage.
PROCESSES = ("kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd")
CORE_PROCESSES = ("kube-apiserver", "etcd")  # what every mode runs
TEMP_PREFIX = "atlas-controlplane-"


class ControlPlaneError(RuntimeError):
    pass


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:  # CalledProcessError hides stderr; the reason is there
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {(self.stderr or '').strip()}"


# --------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: milliseconds to generate (RSA-2048 costs ~100 ms each on this machine class).
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    ca_key,
    ca_cert,
    key,
    common_name: str,
    *,
    orgs: Iterable[str] = (),
    is_ca: bool = False,
    server_sans: Iterable[str] = (),
    client: bool = False,
    days: int = 365,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    # X.509 suggests CN <= 64 chars, but Kubernetes user names (system:serviceaccount:<ns>:<name>)
    # can be longer and Go's parser accepts them, so the length check is skipped.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    subject = x509.Name(attrs)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = []
    for san in server_sans:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            sans.append(x509.DNSName(san))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key if ca_key is not None else key, hashes.SHA256())


def serving_tls(
    directory: Path, name: str, sans: Iterable[str] = ("127.0.0.1", "localhost")
) -> tuple[Path, Path, Path]:
    """A CA of its own and a serving certificate it signed for ``sans``: (<name>-ca.crt,
    <name>.crt, <name>.key) in ``directory`` (a test HTTPS server its clients trust by that CA)."""
    ca_key, key = _new_key(), _new_key()
    ca_cert = _issue(None, None, ca_key, f"{name}-ca", is_ca=True, days=30)
    cert = _issue(ca_key, ca_cert, key, name, server_sans=sans, days=30)
    paths = (directory / f"{name}-ca.crt", directory / f"{name}.crt", directory / f"{name}.key")
    for path, data in zip(paths, (_cert_pem(ca_cert), _cert_pem(cert), _key_pem(key))):
        path.write_bytes(data)
        os.chmod(path, 0o600)
    return paths


class _Pki:
    """CA, serving cert, service-account key pair under <dir>/pki; created once, reused."""

    def __init__(self, root: Path):
        self.dir = root / "pki"
        self.ca_crt, self.ca_key = self.dir / "ca.crt", self.dir / "ca.key"
        self.serving_crt, self.serving_key = self.dir / "apiserver.crt", self.dir / "apiserver.key"
        self.sa_key, self.sa_pub = self.dir / "sa.key", self.dir / "sa.pub"

    def ensure(self) -> None:
        if all(
            p.exists() for p in (self.ca_crt, self.ca_key, self.serving_crt, self.serving_key, self.sa_key, self.sa_pub)
        ):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        ca_key = _new_key()
        ca_cert = _issue(None, None, ca_key, "atlas-local-ca", is_ca=True, days=3650)
        serving_key = _new_key()
        serving = _issue(
            ca_key,
            ca_cert,
            serving_key,
            "kube-apiserver",
            server_sans=(
                "127.0.0.1",
                "localhost",
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
        )
        sa_key = _new_key()
        self._write(self.ca_crt, _cert_pem(ca_cert))
        self._write(self.ca_key, _key_pem(ca_key))
        self._write(self.serving_crt, _cert_pem(serving))
        self._write(self.serving_key, _key_pem(serving_key))
        self._write(self.sa_key, _key_pem(sa_key))
        self._write(
            self.sa_pub,
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.write_bytes(data)
        os.chmod(path, 0o600)

    def ensure_serving_sans(self, sans: Iterable[str]) -> None:
        """Reissue the serving cert when it lacks one of `sans` (cluster mode adds the node IP)."""
        sans = list(sans)
        cert = x509.load_pem_x509_certificate(self.serving_crt.read_bytes())
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        present = {str(v) for v in have.get_values_for_type(x509.IPAddress)} | set(
            have.get_values_for_type(x509.DNSName)
        )
        if all(san in present for san in sans):
            return
        ca_cert = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        key = _new_key()
        serving = _issue(
            ca_key,
            ca_cert,
            key,
            "kube-apiserver",
            server_sans=[*sorted(present), *(s for s in sans if s not in present)],
        )
        self._write(self.serving_crt, _cert_pem(serving))
        self._write(self.serving_key, _key_pem(key))

    def issue_files(
        self, name: str, common_name: str, orgs: Iterable[str] = (), *, server_sans: Iterable[str] = ()
    ) -> tuple[Path, Path]:
        """<pki>/<name>.crt/.key signed by the CA (client cert, or serving cert with SANs);
        created once, reused."""
        crt, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if not (crt.exists() and key_path.exists()):
            ca_cert = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
            ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
            key = _new_key()
            server_sans = list(server_sans)
            cert = _issue(ca_key, ca_cert, key, common_name, orgs=orgs, client=not server_sans, server_sans=server_sans)
            self._write(crt, _cert_pem(cert))
            self._write(key_path, _key_pem(key))
        return crt, key_path

    def client_cert(self, user: str, groups: Iterable[str]) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for `user` in `groups`, signed by the cluster CA."""
        ca_cert = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        key = _new_key()
        cert = _issue(ca_key, ca_cert, key, user, orgs=groups, client=True)
        return _cert_pem(cert), _key_pem(key)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _die_with_parent() -> None:
    """preexec_fn: the child is killed when the Python process dies, even by SIGKILL.

    SIGKILL, not SIGTERM: when both get SIGTERM at once, etcd's graceful stop waits for
    kube-apiserver's watch streams while kube-apiserver waits for etcd, and both hang.
    Ephemeral data is thrown away anyway."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _remove_orphaned_temp_dirs() -> None:
    """Temp dirs of ephemeral control planes whose Python process was killed (-9): their
    processes died with it (PDEATHSIG) but nobody removed the dir."""
    for d in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        pids = []
        for name in PROCESSES:
            try:
                pids.append(int((d / f"{name}.pid").read_text()))
            except (OSError, ValueError):
                pass
        if pids and not any(pid_alive(pid) for pid in pids):
            shutil.rmtree(d, ignore_errors=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kubeconfig_doc(
    server: str, ca_pem: bytes, user: str, cert_pem: bytes, key_pem: bytes, namespace: str | None = None
) -> dict:
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    context = {"cluster": "atlas-local", "user": user}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "atlas-local", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": "atlas-local", "context": context}],
        "current-context": "atlas-local",
        "preferences": {},
    }


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd + kube-apiserver on free 127.0.0.1 ports, CRDs from crds/ applied and served."""

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        crds_dir: str | Path | None = None,
        apply_crds: bool = True,
        startup_timeout: float = 90.0,
        stop_timeout: float = 10.0,
        log: Callable[[str], None] | None = None,
        node_ip: str | None = None,
    ):
        self.persistent = state_dir is not None
        # Cluster mode (see the module docstring): the address the API server binds and
        # advertises, reachable from pods on the node's bridge.
        self.node_ip = node_ip
        self.bind_ip = node_ip or "127.0.0.1"
        self._state_dir_arg = Path(state_dir).resolve() if state_dir is not None else None
        self.crds_dir = Path(crds_dir) if crds_dir is not None else REPO_ROOT / "crds"
        self.apply_crds = apply_crds
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._atexit_registered = False
        self.etcd_port = self.etcd_peer_port = self.apiserver_port = 0
        self.startup_seconds: float | None = None

    # ---- public API

    @property
    def server(self) -> str:
        return f"https://{self.bind_ip}:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self._require_dir() / "kubeconfig"

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The running children by name (empty when stopped), e.g. for processes.wait_any()."""
        return dict(self._procs)

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG (admin) and a private kubectl discovery cache."""
        d = self._require_dir()
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(d / "kube-cache")}

    def start(self) -> "ControlPlane":
        if self._procs:
            raise ControlPlaneError("control plane already started")
        t0 = time.monotonic()
        etcd_bin, apiserver_bin = find_tool("etcd"), find_tool("kube-apiserver")
        find_tool("kubectl")  # fail before starting anything when it is missing
        if self.node_ip:
            controller_bins = {name: find_tool(name) for name in ("kube-controller-manager", "kube-scheduler")}
        self._prepare_dir()
        if not self.persistent and not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        phases: list[str] = []

        def phase(name: str, since: float) -> float:
            now = time.monotonic()
            phases.append(f"{name} {now - since:.1f}s")
            return now

        try:
            t = phase("certs", t0)
            self._start_etcd(etcd_bin)
            t = phase("etcd", t)
            self._start_apiserver(apiserver_bin)
            self._write_admin_kubeconfig()
            self._wait_apiserver_ready()
            t = phase("kube-apiserver", t)
            if self.node_ip:
                self._start_controllers(controller_bins)
                t = phase("controllers", t)
            if self.apply_crds:
                self._apply_crds()
                phase("crds", t)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self._log(
            f"[controlplane] ready in {self.startup_seconds:.1f}s ({', '.join(phases)}): "
            f"kube-apiserver {self.server}, etcd http://127.0.0.1:{self.etcd_port}, "
            f"KUBECONFIG={self.kubeconfig}"
        )
        return self

    def stop(self) -> None:
        """Stop the processes (SIGTERM, then SIGKILL after stop_timeout); idempotent."""
        with processes.signals_held():  # a second Ctrl-C must not cut the stop short
            self._stop()

    def _stop(self) -> None:
        for name in PROCESSES:
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if self.dir is not None:
                (self.dir / f"{name}.pid").unlink(missing_ok=True)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        if not self.persistent and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kubectl(
        self,
        *args: str,
        kubeconfig: str | Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run the built kubectl against this control plane (admin unless kubeconfig given)."""
        env = self.env()
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        cmd = [str(find_tool("kubectl")), *map(str, args)]
        res = subprocess.run(cmd, env=env, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise KubectlError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def user_kubeconfig(
        self, user: str, groups: Iterable[str] = (), path: str | Path | None = None, namespace: str | None = None
    ) -> Path:
        """Kubeconfig authenticating as `user` in `groups` (client cert signed by the CA).

        RBAC sees exactly that user and those groups (plus system:authenticated)."""
        return write_user_kubeconfig(self._require_dir(), user, groups, path, namespace=namespace)

    def service_account_kubeconfig(self, namespace: str, name: str, path: str | Path | None = None) -> Path:
        """Kubeconfig with the identity of ServiceAccount namespace/name, as RBAC sees it.

        Authenticates by client cert with the same user name and groups a token would carry,
        so RoleBindings to `kind: ServiceAccount` subjects apply (e.g. run the operator with
        exactly the chart's RBAC). The ServiceAccount object itself need not exist."""
        return write_user_kubeconfig(
            self._require_dir(),
            f"system:serviceaccount:{namespace}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
            path,
            namespace=namespace,
        )

    @classmethod
    def stop_from_state_dir(cls, state_dir: str | Path, timeout: float = 10.0) -> list[str]:
        """Stop a persistent control plane by its pidfiles; returns the names stopped."""
        state = Path(state_dir)
        stopped = []
        for name in PROCESSES:
            pidfile = state / f"{name}.pid"
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            # Only signal the pid if it is still our process (pids get reused).
            if pid_alive(pid) and name in pid_cmdline(pid) and str(state.resolve()) in pid_cmdline(pid):
                terminate(pid, timeout)
                stopped.append(name)
            pidfile.unlink(missing_ok=True)
        return stopped

    @classmethod
    def attach(cls, state_dir: str | Path, node_ip: str | None = None) -> "ControlPlane":
        """A handle on a persistent control plane another process started (its kubeconfigs,
        certificates and kubectl), without starting or stopping anything."""
        cp = cls(state_dir, node_ip=node_ip)
        cp.dir = cp._state_dir_arg
        ports = json.loads((cp.dir / "ports.json").read_text())
        cp.etcd_port, cp.etcd_peer_port, cp.apiserver_port = ports["etcd"], ports["etcd_peer"], ports["apiserver"]
        return cp

    @classmethod
    def is_running(cls, state_dir: str | Path) -> bool:
        state = Path(state_dir)
        for name in CORE_PROCESSES:
            try:
                pid = int((state / f"{name}.pid").read_text().strip())
            except (OSError, ValueError):
                return False
            if not pid_alive(pid):
                return False
        return True

    # ---- internals

    def _require_dir(self) -> Path:
        if self.dir is None:
            raise ControlPlaneError("control plane not started")
        return self.dir

    def _prepare_dir(self) -> None:
        if self.persistent:
            self.dir = self._state_dir_arg
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.is_running(self.dir):
                raise ControlPlaneError(
                    f"a control plane is already running from {self.dir}; "
                    "stop it first (ControlPlane.stop_from_state_dir)"
                )
            self.stop_from_state_dir(self.dir)  # clears stale pidfiles / half-dead leftovers
        else:
            _remove_orphaned_temp_dirs()
            self.dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        (self.dir / "logs").mkdir(exist_ok=True)
        _Pki(self.dir).ensure()
        if self.node_ip:
            _Pki(self.dir).ensure_serving_sans([self.node_ip])
        self._pick_ports()

    def _pick_ports(self) -> None:
        # Persistent mode keeps etcd's ports: its member record stores the peer URL.
        ports_file = self.dir / "ports.json"
        saved = {}
        if self.persistent and ports_file.exists():
            saved = json.loads(ports_file.read_text())

        def pick(key: str) -> int:
            port = saved.get(key)
            return port if port and _port_is_free(port) else free_port()

        self.etcd_port, self.etcd_peer_port, self.apiserver_port = (pick("etcd"), pick("etcd_peer"), pick("apiserver"))
        ports = {"etcd": self.etcd_port, "etcd_peer": self.etcd_peer_port, "apiserver": self.apiserver_port}
        if self.node_ip:  # secure (health) ports of the controllers, on loopback
            self.controller_ports = {name: pick(name) for name in ("kube-controller-manager", "kube-scheduler")}
            ports.update(self.controller_ports)
        ports_file.write_text(json.dumps(ports))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = self.dir / "logs" / f"{name}.log"
        with open(log_path, "ab") as log_file, processes.signals_held():  # recorded before a signal lands
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                # Own session: a Ctrl-C meant for pytest / make does not hit them out of order.
                start_new_session=True,
                preexec_fn=None if self.persistent else _die_with_parent,
            )
            self._procs[name] = proc
            (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def _wait(self, what: str, check: Callable[[], bool], timeout: float | None = None) -> None:
        """Until ``check`` holds; a ControlPlaneError at once when one of our processes exited."""
        dead: list[str] = []

        def exited() -> str | None:
            dead.extend(name for name, proc in self._procs.items() if proc.poll() is not None)
            return f"{dead[0]} exited with {self._procs[dead[0]].returncode}" if dead else None

        def error(message: str) -> ControlPlaneError:
            where = (
                f"log tail:\n{_tail(self.dir / 'logs' / f'{dead[0]}.log')}" if dead else f"logs in {self.dir / 'logs'}"
            )
            return ControlPlaneError(f"{message}; {where}")

        wait_for(what, check, timeout or self.startup_timeout, interval=POLL_INTERVAL, failed=exited, error=error)

    def _start_etcd(self, etcd_bin: Path) -> None:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        argv = [
            str(etcd_bin),
            "--name=atlas",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=atlas={peer}",
            "--initial-cluster-state=new",
            "--log-level=warn",
        ]
        if not self.persistent:
            argv.append("--unsafe-no-fsync")  # throwaway data: skip fsync, much faster writes
        self._spawn("etcd", argv)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                    return json.loads(resp.read()).get("health") == "true"
            except (OSError, ValueError):
                return False

        self._wait("etcd /health", healthy)

    def _start_apiserver(self, apiserver_bin: Path) -> None:
        pki = _Pki(self.dir)
        argv = [
            str(apiserver_bin),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.bind_ip}",
            f"--advertise-address={self.bind_ip}",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_crt}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            f"--service-account-issuer=https://{self.bind_ip}:{self.apiserver_port}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            # No controller-manager: no `default` ServiceAccount would ever exist (as envtest).
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # The `kubernetes` Service's endpoints cannot be a loopback address: without this
            # the apiserver logs a failed reconcile every 10 s, drowning `make dev`'s log.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]
        if self.node_ip:
            argv = [
                a
                for a in argv
                if a
                not in (
                    "--authorization-mode=RBAC",
                    "--disable-admission-plugins=ServiceAccount",
                    "--endpoint-reconciler-type=none",
                )
            ]
            kubelet_crt, kubelet_key = pki.issue_files(
                "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
            )
            argv += [
                # Kubelets get exactly what their own pods need (Node authorizer + NodeRestriction).
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                # For `kubectl logs/exec`: the API server authenticates to the kubelet.
                f"--kubelet-client-certificate={kubelet_crt}",
                f"--kubelet-client-key={kubelet_key}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        self._spawn("kube-apiserver", argv)

    def _component_kubeconfig(self, name: str, user: str, groups: Iterable[str] = ()) -> Path:
        """<dir>/<name>.kubeconfig: a client cert identity for a cluster component."""
        pki = _Pki(self.dir)
        crt, key = pki.issue_files(name, user, groups)
        path = self.dir / f"{name}.kubeconfig"
        _write_private(
            path,
            yaml.safe_dump(
                _kubeconfig_doc(self.server, pki.ca_crt.read_bytes(), user, crt.read_bytes(), key.read_bytes()),
                sort_keys=False,
            ),
        )
        return path

    def node_kubeconfig(self, component: str, user: str, groups: Iterable[str] = ()) -> Path:
        """Kubeconfig for a node component (kubelet: system:node:<name>/system:nodes,
        kube-proxy: system:kube-proxy): the identities the default RBAC roles bind."""
        return self._component_kubeconfig(component, user, groups)

    def _start_controllers(self, bins: dict[str, Path]) -> None:
        """kube-controller-manager and kube-scheduler, serving health on loopback only."""
        pki = _Pki(self.dir)
        kcm = self._component_kubeconfig("kube-controller-manager", "system:kube-controller-manager")
        sched = self._component_kubeconfig("kube-scheduler", "system:kube-scheduler")
        self._spawn(
            "kube-controller-manager",
            [
                str(bins["kube-controller-manager"]),
                f"--kubeconfig={kcm}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_ports['kube-controller-manager']}",
                f"--cert-dir={self.dir / 'kcm-certs'}",
                # One token identity per controller, and tokens for ServiceAccount Secrets.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_crt}",
                f"--cluster-signing-cert-file={pki.ca_crt}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bins["kube-scheduler"]),
                f"--kubeconfig={sched}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_ports['kube-scheduler']}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # self-signed serving certs of their own

        def healthy(port: int) -> Callable[[], bool]:
            def check() -> bool:
                try:
                    with urllib.request.urlopen(
                        f"https://127.0.0.1:{port}/healthz", context=insecure, timeout=2
                    ) as resp:
                        return resp.status == 200
                except OSError:
                    return False

            return check

        for name, port in self.controller_ports.items():
            self._wait(f"{name} /healthz", healthy(port))
        # The token controller's first job: without a `default` ServiceAccount no Pod is admitted.
        self._wait(
            "ServiceAccount default/default",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
        )

    def _admin_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(_Pki(self.dir).ca_crt))
        ctx.load_cert_chain(self.dir / "pki" / "admin.crt", self.dir / "pki" / "admin.key")
        return ctx

    def _write_admin_kubeconfig(self) -> None:
        pki = _Pki(self.dir)
        admin_crt, admin_key = pki.dir / "admin.crt", pki.dir / "admin.key"
        if not (admin_crt.exists() and admin_key.exists()):
            cert, key = pki.client_cert("atlas-admin", ("system:masters",))
            pki._write(admin_crt, cert)
            pki._write(admin_key, key)
        doc = _kubeconfig_doc(
            self.server, pki.ca_crt.read_bytes(), "atlas-admin", admin_crt.read_bytes(), admin_key.read_bytes()
        )
        _write_private(self.kubeconfig, yaml.safe_dump(doc, sort_keys=False))
        (self.dir / "server").write_text(self.server + "\n")  # for write_user_kubeconfig

    def _get(self, path: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.server + path, context=ctx, timeout=2) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except OSError:
            return 0, b""

    def _wait_apiserver_ready(self) -> None:
        ctx = self._admin_ssl_context()
        self._wait("kube-apiserver /readyz", lambda: self._get("/readyz", ctx)[0] == 200)

    def _apply_crds(self) -> None:
        if not self.crds_dir.is_dir() or not any(self.crds_dir.glob("*.y*ml")):
            raise ControlPlaneError(f"no CRDs found in {self.crds_dir}")
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(self.crds_dir), timeout=60)
        ctx = self._admin_ssl_context()

        def served() -> bool:
            status, body = self._get(f"/apis/{ATLAS_GROUP_VERSION}", ctx)
            if status != 200:
                return False
            names = {r.get("name") for r in json.loads(body).get("resources", [])}
            return all(r in names for r in ATLAS_RESOURCES)

        self._wait(f"{ATLAS_GROUP_VERSION} {'/'.join(ATLAS_RESOURCES)} in discovery", served)
        # Established means the storage is ready for writes, not only listed in discovery.
        self.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            *(f"crd/{r}.{ATLAS_GROUP_VERSION.split('/')[0]}" for r in ATLAS_RESOURCES),
        )


def write_user_kubeconfig(
    state_dir: str | Path,
    user: str,
    groups: Iterable[str] = (),
    path: str | Path | None = None,
    namespace: str | None = None,
) -> Path:
    """Kubeconfig for `user` in `groups` against the control plane whose dir is state_dir.

    Works for a running persistent control plane from another process (e.g. the dev stack)."""
    state = Path(state_dir)
    pki = _Pki(state)
    server = (state / "server").read_text().strip()
    cert, key = pki.client_cert(user, list(groups))
    if path is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        path = state / "users" / f"{safe}.kubeconfig"
    path = Path(path)
    _write_private(
        path,
        yaml.safe_dump(_kubeconfig_doc(server, pki.ca_crt.read_bytes(), user, cert, key, namespace), sort_keys=False),
    )
    return path


def main(argv: list[str] | None = None) -> int:
    """python -m atlas_devstack.controlplane [STATE_DIR] [--detach] | --stop STATE_DIR"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m atlas_devstack.controlplane",
        description=__doc__.splitlines()[0],
        epilog="Runs in the foreground until SIGTERM, SIGINT (Ctrl-C) or SIGHUP, or until etcd or "
        "kube-apiserver exits (then the other is stopped and the exit status is 1). "
        "With --detach it returns once the control plane is ready and leaves it running; "
        "stop it later with --stop STATE_DIR.",
    )
    parser.add_argument(
        "state_dir",
        nargs="?",
        help="keep etcd data, certificates and the kubeconfig here (default: a temporary dir, removed on exit)",
    )
    parser.add_argument("--detach", action="store_true", help="return once ready; needs STATE_DIR")
    parser.add_argument("--stop", action="store_true", help="stop the control plane of STATE_DIR")
    args = parser.parse_args(argv)
    if (args.stop or args.detach) and not args.state_dir:
        parser.error(f"{'--stop' if args.stop else '--detach'} needs STATE_DIR")
    if args.stop:

        def stop_by_pidfiles(on_exit: processes.OnExit) -> int:
            with processes.signals_held():  # a Ctrl-C waits until both are stopped
                print("stopped:", ", ".join(ControlPlane.stop_from_state_dir(args.state_dir)) or "nothing")
            return 0

        return processes.run("controlplane", stop_by_pidfiles)

    def body(on_exit: processes.OnExit) -> int:
        cp = ControlPlane(args.state_dir)

        def stop() -> None:  # a signal or a failure during start-up stops it, detached or not
            if not (args.detach and cp.startup_seconds is not None):
                cp.stop()

        on_exit(stop)
        cp.start()
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        if args.detach:
            return 0
        name, code = processes.wait_any(cp.processes)
        raise processes.ChildExited(name, code, "log tail:\n" + _tail(cp.dir / "logs" / f"{name}.log", 10))

    return processes.run("controlplane", body, errors=(ControlPlaneError, ToolNotFound))


if __name__ == "__main__":
    sys.exit(main())

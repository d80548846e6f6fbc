"""The whole Atlas dev stack on 127.0.0.1: Redis, the local control plane, the operator, the
mock upstream (unless ATLAS_UPSTREAM_URL is set), Jaeger (the gateway's traces), the gateway, and
the quickstart example.

`python -m atlas_devstack up|down|logs [--follow]` drives it from a shell (make dev-up /
dev-down / dev / dev-logs); tests use it as a context manager with a temporary state dir:

    with DevStack(tmp_path / "dev") as stack:
        stack.env["ATLAS_DEMO_KEY"]

Every process runs in its own session (process group) with a pidfile in the state dir, so
`down` stops exactly what `up` started, from any later process: SIGTERM to the group, then
SIGKILL after a deadline. Persistent data (etcd, Redis snapshots) stays in the state dir;
`.dev/env` is replaced by a file that, sourced, says the stack is down and returns 1.
If a service exits while `up` waits for the stack to come up, `up` fails at once (the log's
tail in the error) and stops the rest; a signal during `up` does the same (see processes.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

import redis as redis_client

from . import oidc_issuer, processes
from .controlplane import ControlPlane
from .jaeger import Jaeger
from .oidc_issuer import OidcIssuer
from .processes import pid_alive, pid_cmdline, stop_group
from .redis_server import RedisServer, free_port
from .tools import BIN_DIR, REPO_ROOT, find_tool
from .waiting import wait_for

T = TypeVar("T")

DEFAULT_STATE_DIR = REPO_ROOT / ".dev"
QUICKSTART = REPO_ROOT / "examples" / "01-quickstart"
DEMO_KEY_NAME = "search-frontend"
DEMO_SECRET = "search-frontend-api-key"
DEMO_NAMESPACE = "default"
DEMO_MODEL = "llama-3.1-8b-instruct"
SERVICES = ("gateway", "operator", "mock-upstream", "oidc-issuer", "jaeger")  # stop order: clients first


class StackError(RuntimeError):
    pass


def http(
    method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class DevStack:
    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        upstream_url: str | None = None,
        usage_interval: float = 2.0,
        log: Callable[[str], None] | None = None,
        timeout: float = 120.0,
        redis_url: str | None = None,
    ) -> None:
        self.dir = Path(state_dir).resolve()
        # REDIS_URL names a Redis (single or Cluster) to use instead of starting one; the URL of
        # the Redis an earlier `up` started (still exported by a sourced .dev/env) does not count
        if redis_url is None:
            redis_url = os.environ.get("REDIS_URL") or None
            if redis_url is not None and redis_url == os.environ.get("ATLAS_DEV_OWN_REDIS_URL"):
                redis_url = None
        self.external_redis_url = redis_url
        self.upstream_url = upstream_url if upstream_url is not None else os.environ.get("ATLAS_UPSTREAM_URL")
        self.usage_interval = usage_interval
        self.timeout = timeout
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.env: dict[str, str] = {}
        self.control_plane: ControlPlane | None = None
        self._redis: RedisServer | None = None
        self._services: dict[str, subprocess.Popen] = {}  # started by this process

    # ------------------------------------------------------------------ paths

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def env_file(self) -> Path:
        return self.dir / "env"

    def _pidfile(self, service: str) -> Path:
        return self.dir / f"{service}.pid"

    # ------------------------------------------------------------------ up

    def up(self) -> dict[str, str]:
        started = time.monotonic()
        self.down(quiet=True)  # leftovers of an earlier run (keeps the data)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            redis_url, own_redis = self._redis_url()
            cp = ControlPlane(self.dir / "controlplane", log=self._log)
            cp.start()
            self.control_plane = cp
            for path in (cp.dir / "logs").glob("*.log"):
                self._link_log(path.stem, path)
            base_env = {
                **os.environ,
                "KUBECONFIG": str(cp.kubeconfig),
                "PATH": f"{BIN_DIR}{os.pathsep}{find_tool('kubectl').parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }

            upstream = self.upstream_url
            if not upstream:
                port = free_port()
                self._spawn(
                    "mock-upstream",
                    [sys.executable, "-m", "atlas_devstack.mock_upstream", "--host", "127.0.0.1", "--port", str(port)],
                    base_env,
                )
                upstream = f"http://127.0.0.1:{port}"
                self._wait("the mock upstream", lambda: http("GET", upstream + "/healthz")[0] == 200, 30)

            jaeger = Jaeger(self.dir / "jaeger")
            self._spawn("jaeger", jaeger.command(), base_env)
            self._wait("jaeger", jaeger.ready, 30)

            issuer = self._start_oidc_issuer(base_env)
            operator_metrics_port = free_port()
            self._spawn(
                "operator",
                [sys.executable, "-m", "atlas_operator"],
                {
                    **base_env,
                    "ATLAS_REDIS_URL": redis_url,
                    "ATLAS_LIVENESS_PORT": str(free_port()),
                    "ATLAS_METRICS_PORT": str(operator_metrics_port),
                    "ATLAS_USAGE_INTERVAL_SECONDS": str(self.usage_interval),
                    "ATLAS_JWT_ISSUERS": json.dumps([issuer.jwt_config()]),
                },
            )
            gateway_port = free_port()
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            self._spawn(
                "gateway",
                [sys.executable, "-m", "atlas_gateway"],
                {
                    **base_env,
                    "ATLAS_REDIS_URL": redis_url,
                    "ATLAS_UPSTREAM_URL": upstream,
                    "ATLAS_HOST": "127.0.0.1",
                    "ATLAS_PORT": str(gateway_port),
                    # every request traced to the stack's Jaeger, a usage record per request in gateway.log
                    "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http_url,
                    "ATLAS_USAGE_RECORDS": "stdout",
                },
            )
            self._wait("the gateway's /readyz", lambda: http("GET", gateway_url + "/readyz")[0] == 200, 60)

            cp.kubectl("apply", "-n", DEMO_NAMESPACE, "-k", str(QUICKSTART))
            demo_key = self._wait(
                "the operator to generate the demo key's Secret", lambda: self._read_demo_key(cp), self.timeout
            )
            self._wait(
                "the demo key to work through the gateway",
                lambda: self.chat(gateway_url, demo_key)[0] == 200,
                self.timeout,
            )

            self.env = {
                "KUBECONFIG": str(cp.kubeconfig),
                "ATLAS_GATEWAY_URL": gateway_url,
                "ATLAS_OPERATOR_METRICS_URL": f"http://127.0.0.1:{operator_metrics_port}/metrics",
                "ATLAS_UPSTREAM_URL": upstream,
                "ATLAS_JAEGER_URL": jaeger.query_url,
                "REDIS_URL": redis_url,
                "ATLAS_DEMO_KEY": demo_key,
                # a real OIDC issuer the operator trusts: User/Group subjects (docs/workload-identity.md)
                "ATLAS_OIDC_ISSUER_URL": issuer.url,
                "ATLAS_OIDC_ISSUER_CA": str(issuer.ca_file),
                "PATH": f"{BIN_DIR}:{find_tool('kubectl').parent}:$PATH",
            }
            if own_redis:  # so a later `up` from a shell that sourced this file starts its own again
                self.env["ATLAS_DEV_OWN_REDIS_URL"] = redis_url
            if os.environ.get("ATLAS_REDIS_CLUSTER"):
                self.env["ATLAS_REDIS_CLUSTER"] = os.environ["ATLAS_REDIS_CLUSTER"]
            self._write_env()
        except BaseException:
            self._log(f"[dev] start-up failed; logs in {self.logs}")
            self.down(quiet=True)
            raise
        self._log(f"[dev] up in {time.monotonic() - started:.1f}s; env in {self.env_file}")
        return self.env

    def _start_oidc_issuer(self, env: dict[str, str]) -> OidcIssuer:
        """The test OIDC issuer (oidc-provider-mock over HTTPS, its CA in the state dir)."""
        cert_dir = self.dir / "oidc-issuer"
        cert_dir.mkdir(parents=True, exist_ok=True)
        ca, cert, key = oidc_issuer.tls_files(cert_dir)
        port = free_port()
        self._spawn("oidc-issuer", oidc_issuer.command(port, cert, key), env)
        issuer = OidcIssuer(f"https://127.0.0.1:{port}", ca)
        wait_for("the OIDC issuer's discovery", issuer.ready, 30, failed=self._exited_service)
        return issuer

    def _redis_url(self) -> tuple[str, bool]:
        """(the Redis URL the stack uses, whether the stack started that Redis itself)."""
        if self.external_redis_url:
            url = self.external_redis_url
            shown = url.split("@")[-1]  # never log a password
            probe = redis_client.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            try:
                info = probe.info("server")  # also fails on a wrong password: better now than later
                kind = "a Redis Cluster" if probe.info("cluster").get("cluster_enabled") else "a single Redis"
            except redis_client.RedisError as exc:
                raise StackError(f"REDIS_URL={shown} does not answer: {exc}") from None
            finally:
                probe.close()
            self._log(
                f"[dev] redis {shown} (REDIS_URL: {kind}, redis {info.get('redis_version')}; not started "
                f"here; ATLAS_REDIS_CLUSTER={os.environ.get('ATLAS_REDIS_CLUSTER') or 'auto'})"
            )
            return url, False
        server = self._redis = RedisServer(dir=self.dir / "redis").start()
        self._link_log("redis", server.logfile)
        self._log(f"[dev] redis {server.url}")
        return server.url, True

    def _read_demo_key(self, cp: ControlPlane) -> str | None:
        res = cp.kubectl(
            "get", "secret", DEMO_SECRET, "-n", DEMO_NAMESPACE, "-o", "jsonpath={.data.api-key}", check=False
        )
        if res.returncode != 0 or not res.stdout.strip():
            return None
        import base64

        return base64.b64decode(res.stdout.strip()).decode()

    @staticmethod
    def chat(gateway_url: str, key: str, model: str = DEMO_MODEL) -> tuple[int, bytes]:
        return http(
            "POST",
            gateway_url + "/v1/chat/completions",
            {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]},
            {"authorization": f"Bearer {key}"},
        )

    def _spawn(self, service: str, argv: list[str], env: dict[str, str]) -> int:
        # The pidfile is how `down` finds it: written before a signal can interrupt us.
        with open(self.logs / f"{service}.log", "ab") as out, processes.signals_held():
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
            self._services[service] = proc
            self._pidfile(service).write_text(f"{proc.pid}\n")
        self._log(f"[dev] {service} pid {proc.pid}, log {self.logs / (service + '.log')}")
        return proc.pid

    def _wait(self, what: str, check: Callable[[], T], timeout: float) -> T:
        """Until ``check`` holds (its errors mean "not yet"); a StackError at once when a service
        or a control-plane process we started exited, or at the deadline."""
        return wait_for(
            what, check, timeout, interval=0.1, failed=self._exited_service, retry=(Exception,), error=StackError
        )

    def _exited_service(self) -> str | None:
        """Why waiting is pointless: a service (or a control-plane process) we started exited."""
        children = dict(self._services)
        if self.control_plane is not None:
            children.update(self.control_plane.processes)
        if self._redis is not None and self._redis.process is not None:
            children["redis"] = self._redis.process
        for name, proc in children.items():
            if proc.poll() is not None:
                log = self.logs / f"{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
                return f"{processes.ChildExited(name, proc.returncode)}; end of {log}:\n{tail}"
        return None

    def _link_log(self, name: str, target: Path) -> None:
        link = self.logs / f"{name}.log"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def _write_env(self) -> None:
        lines = ["# written by `python -m atlas_devstack up`; source it: . .dev/env"]
        for key, value in self.env.items():
            rendered = f'"{value}"' if key == "PATH" else shlex.quote(value)
            lines.append(f"export {key}={rendered}")
        self.env_file.write_text("\n".join(lines) + "\n")
        os.chmod(self.env_file, 0o600)  # it holds the demo key

    def _invalidate_env_file(self) -> None:
        """Replace the env file of a running stack by one that, sourced, says the stack is down,
        unsets the variables that still point at it and returns 1 (so `. .dev/env && ...` and
        `set -e` scripts stop there). Left alone when it is missing or already says so."""
        try:
            text = self.env_file.read_text()
        except OSError:
            return
        if not text.startswith("# written by `python -m atlas_devstack up`"):
            return
        exported = {}
        for line in text.splitlines():
            if line.startswith("export ") and "=" in line:
                key, _, value = line[len("export ") :].partition("=")
                if key != "PATH":  # bin/ first in PATH stays harmless
                    exported[key] = shlex.split(value)[0] if value else ""
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines = [
            f"# written by `python -m atlas_devstack down` at {when}: the dev stack is stopped.",
            "# `make dev-up` writes the real file again.",
            f"echo {shlex.quote(f'atlas: the dev stack in {self.dir} is down (stopped {when}); run `make dev-up`')} >&2",
        ]
        # Unset what still points at this stack; the demo key by name (its value stays out of here).
        lines += [
            f'[ "${{{key}:-}}" = {shlex.quote(value)} ] && unset {key}'
            for key, value in exported.items()
            if key != "ATLAS_DEMO_KEY"
        ]
        lines.append("unset ATLAS_DEMO_KEY")
        lines.append("return 1 2>/dev/null || exit 1")
        self.env_file.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ down

    def down(self, quiet: bool = False, timeout: float = 10.0) -> list[str]:
        """Stop everything `up` started (by this or an earlier process); idempotent. Runs to its
        end even when signalled (the signal is delivered afterwards)."""
        with processes.signals_held():
            return self._down(quiet, timeout)

    def _down(self, quiet: bool, timeout: float) -> list[str]:
        stopped = []
        self._invalidate_env_file()  # first: from now on the addresses in it are wrong
        for service in SERVICES:
            pidfile = self._pidfile(service)
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            # Only signal it when the pid still runs one of our commands (pids get reused).
            wanted = {
                "gateway": "atlas_gateway",
                "operator": "atlas_operator",
                "mock-upstream": "mock_upstream",
                "oidc-issuer": "oidc_issuer",
                "jaeger": "jaeger",
            }[service]
            if pid_alive(pid) and wanted in pid_cmdline(pid):
                stop_group(pid, timeout)
                stopped.append(service)
            pidfile.unlink(missing_ok=True)
        for proc in self._services.values():
            proc.poll()  # reap the ones this process started (no zombie left)
        self._services.clear()
        # Started by this process (tests): stop through the objects so the children are reaped.
        if self.control_plane is not None and ControlPlane.is_running(self.control_plane.dir):
            self.control_plane.stop()
            stopped += ["kube-apiserver", "etcd"]
        self.control_plane = None
        if self._redis is not None and self._redis.ping():
            self._redis.stop(timeout)
            stopped.append("redis")
        self._redis = None
        # Started by an earlier `up` (make dev-up then make dev-down): by pidfile.
        if (self.dir / "controlplane").is_dir():
            stopped += ControlPlane.stop_from_state_dir(self.dir / "controlplane", timeout)
        if RedisServer.stop_pidfile(self.dir / "redis" / "redis.pid", timeout):
            stopped.append("redis")
        if not quiet:
            self._log(f"[dev] stopped: {', '.join(stopped) or 'nothing was running'}")
        return stopped

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "DevStack":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down(quiet=True)

    # ------------------------------------------------------------------ presentation

    def banner(self) -> str:
        env = self.env
        kubectl_out = ""
        if self.control_plane is not None:
            kubectl_out = self.control_plane.kubectl("get", "atlaskeys,atlasquotas", "-n", DEMO_NAMESPACE).stdout
        return f"""
Atlas dev stack is up. In a shell:  source {self.env_file}

curl:
  curl -s $ATLAS_GATEWAY_URL/v1/chat/completions \\
    -H "Authorization: Bearer $ATLAS_DEMO_KEY" -H 'content-type: application/json' \\
    -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "hello"}}]}}'

openai SDK:
  python - <<'PY'
  import os
  from openai import OpenAI
  client = OpenAI(base_url=os.environ["ATLAS_GATEWAY_URL"] + "/v1", api_key=os.environ["ATLAS_DEMO_KEY"])
  reply = client.chat.completions.create(model="{DEMO_MODEL}", messages=[{{"role": "user", "content": "hello"}}])
  print(reply.choices[0].message.content, reply.usage)
  PY

kubectl get atlaskeys,atlasquotas:
{kubectl_out}
gateway {env.get("ATLAS_GATEWAY_URL")}  upstream {env.get("ATLAS_UPSTREAM_URL")}  redis {env.get("REDIS_URL")}
traces (Jaeger's query API): $ATLAS_JAEGER_URL/api/v3/traces/<trace id>   usage records: in gateway.log
logs: python -m atlas_devstack logs --follow   (files in {self.logs})
"""

    def log_files(self) -> list[Path]:
        return sorted(p for p in self.logs.glob("*.log") if p.exists())

    def follow_logs(self, follow: bool, lines: int = 20) -> None:
        files = self.log_files()
        if not files:
            print(f"no logs in {self.logs} (run `make dev-up` first)")
            return
        handles = {}
        for path in files:
            text = path.read_text(errors="replace").splitlines()[-lines:]
            for line in text:
                print(f"{path.stem:>15} | {line}")
            fh = open(path, errors="replace")  # noqa: SIM115 (kept open to follow; closed below)
            fh.seek(0, os.SEEK_END)
            handles[path] = fh
        try:
            while follow:
                quiet = True
                for path, fh in handles.items():
                    for line in fh.readlines():
                        quiet = False
                        print(f"{path.stem:>15} | {line.rstrip()}", flush=True)
                if quiet:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            for fh in handles.values():
                fh.close()

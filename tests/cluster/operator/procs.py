"""Helpers for the operator's cluster tests: real processes and condition waits."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from atlas_devstack.redis_server import free_port
from atlas_devstack.stack import http, stop_group
from atlas_devstack.waiting import wait_for

REPO = Path(__file__).resolve().parents[3]


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """The one wait helper (atlas_devstack.waiting) with this tier's habits: 30 s, and a check
    that fails (an object not there yet, a status without the field) means "not yet"."""
    return wait_for(what, check, timeout, interval=interval, retry=(Exception,))


class Proc:
    """A Python module run as a real process in its own process group, logging to a file."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path, ready_url: str | None = None):
        self.module, self.env, self.log_path, self.ready_url = module, env, log_path, ready_url
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Proc":
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        if self.ready_url:

            def ready() -> bool:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.module} exited {self.proc.returncode}:\n{self.log_tail()}")
                return http("GET", self.ready_url, timeout=1)[0] == 200

            wait_until(f"{self.module} ready", ready, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc.pid, timeout=10)
            self.proc.wait(5)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def operator_proc(kubeconfig: Path, redis_url: str, log_path: Path, jwt_issuers: list | None = None) -> Proc:
    port = free_port()
    proc = Proc(
        "atlas_operator",
        {
            "KUBECONFIG": str(kubeconfig),
            "ATLAS_REDIS_URL": redis_url,
            "ATLAS_LIVENESS_PORT": str(port),
            "ATLAS_METRICS_PORT": str(free_port()),
            "ATLAS_USAGE_INTERVAL_SECONDS": "1",
            "ATLAS_HEAL_INTERVAL_SECONDS": "1",
            "ATLAS_JWT_ISSUERS": json.dumps(jwt_issuers or []),
        },
        log_path,
        ready_url=f"http://127.0.0.1:{port}/healthz",
    )
    proc.metrics_url = f"http://127.0.0.1:{proc.env['ATLAS_METRICS_PORT']}/metrics"
    return proc


class Gateway:
    def __init__(self, url: str):
        self.url = url

    def chat(
        self, key: str, model: str = "llama-3.1-8b-instruct", tokens: int = 8, headers: dict[str, str] | None = None
    ) -> tuple[int, dict]:
        status, body = http(
            "POST",
            self.url + "/v1/chat/completions",
            {"model": model, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]},
            {"authorization": f"Bearer {key}", **(headers or {})},
        )
        try:
            return status, json.loads(body or b"{}")
        except ValueError:
            return status, {}


class Kube:
    """kubectl in one namespace, with JSON helpers."""

    def __init__(self, kubectl: Callable[..., subprocess.CompletedProcess], namespace: str):
        self.kubectl, self.ns = kubectl, namespace

    def __call__(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.kubectl(*args, "-n", self.ns, **kw)

    def apply(self, manifest: str) -> None:
        self("apply", "-f", "-", input=manifest)

    def get(self, kind: str, name: str) -> dict | None:
        res = self("get", kind, name, "-o", "json", check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def condition(self, kind: str, name: str, ctype: str = "Ready") -> dict:
        obj = self.get(kind, name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or ():
            if cond["type"] == ctype:
                return cond
        return {}

    def secret_key(self, name: str) -> str | None:
        obj = self.get("secret", name)
        if not obj or "api-key" not in (obj.get("data") or {}):
            return None
        return base64.b64decode(obj["data"]["api-key"]).decode()

    def columns(self, kind: str, name: str) -> dict[str, str]:
        """The printer columns of `kubectl get <kind> <name>` as {HEADER: value}."""
        lines = self("get", kind, name).stdout.splitlines()
        header = lines[0]
        # kubectl separates columns by 3+ spaces; a header itself may hold single spaces.
        starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
        cols = {}
        for n, start in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else None
            cols[header[start:end].strip()] = lines[1][start:end].strip()
        return cols


def key_manifest(name: str, **spec: Any) -> str:
    return json.dumps(
        {"apiVersion": "atlas.bugvanquisher.io/v1alpha1", "kind": "AtlasKey", "metadata": {"name": name}, "spec": spec}
    )


def quota_manifest(name: str, **limits: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
            "kind": "AtlasQuota",
            "metadata": {"name": name},
            "spec": {"limits": limits},
        }
    )


def secret_manifest(name: str, value: str, atlaskey: str | None = None) -> str:
    """A user-supplied key Secret; with ``atlaskey`` labelled so that the operator watches it."""
    meta: dict[str, Any] = {"name": name}
    if atlaskey:
        meta["labels"] = {"atlas.bugvanquisher.io/atlaskey": atlaskey}
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"api-key": value}})


def now() -> float:
    return time.monotonic()

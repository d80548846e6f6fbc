"""Jaeger all-in-one (built by ``make tools``, pinned in hack/tools/versions.env) on 127.0.0.1
with memory storage: the trace backend of the integration tier, the dev stack and anyone
trying the gateway's tracing by hand.

Every port is a free loopback port picked at start (OTLP gRPC and HTTP in, the query API's
HTTP and gRPC out), and the collector's own telemetry is off, so nothing listens on Jaeger's
fixed default ports (4317, 4318, 16686, 8888...) and several instances can run side by side.

    with Jaeger() as jaeger:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http_url}
        ...
        spans = jaeger.wait_for_spans(trace_id, count=4, timeout=10)

Alone: ``python -m atlas_devstack.jaeger`` prints ``export OTEL_EXPORTER_OTLP_ENDPOINT=...``
and ``export ATLAS_JAEGER_URL=...`` (the query API) once Jaeger answers, and runs in the
foreground until SIGTERM, SIGINT or SIGHUP (Jaeger is stopped, exit 128+N).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from . import processes
from .redis_server import free_port
from .tools import find_tool
from .waiting import wait_for

# The collector pipeline: OTLP in, memory storage out, no batching (a span is queryable as soon
# as it arrives: tests wait on a condition, not on a batch timer).
_CONFIG = """\
extensions:
  jaeger_storage:
    backends:
      memory_store:
        memory:
          max_traces: {max_traces}
  jaeger_query:
    storage:
      traces: memory_store
    http:
      endpoint: {host}:{query_http}
    grpc:
      endpoint: {host}:{query_grpc}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {host}:{otlp_grpc}
      http:
        endpoint: {host}:{otlp_http}
exporters:
  jaeger_storage_exporter:
    trace_storage: memory_store
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: {log_level}
"""


class Jaeger:
    """One ``jaeger`` process on loopback. ``dir``: where its config and log go (a temporary
    directory, removed on stop, when None). ``host``: another address of this machine to listen
    on (the deploy tier's pods reach the host at ATLAS_HOST_FROM_PODS)."""

    def __init__(
        self,
        dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        max_traces: int = 100_000,
        log_level: str = "warn",
        start_timeout: float = 30.0,
    ) -> None:
        self.binary = find_tool("jaeger")  # ToolNotFound (run `make tools`) before anything starts
        self._own_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="atlas-jaeger-")) if dir is None else Path(dir)
        self.host = host
        self.ports = {name: free_port() for name in ("otlp_grpc", "otlp_http", "query_http", "query_grpc")}
        self.max_traces = max_traces
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def otlp_grpc_url(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for OTEL_EXPORTER_OTLP_PROTOCOL=grpc."""
        return f"http://{self.host}:{self.ports['otlp_grpc']}"

    @property
    def otlp_http_url(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for http/protobuf (the signal paths /v1/traces... follow)."""
        return f"http://{self.host}:{self.ports['otlp_http']}"

    @property
    def query_url(self) -> str:
        """The query API (``/api/v3/traces/<id>``, ``/api/services``...)."""
        return f"http://{self.host}:{self.ports['query_http']}"

    @property
    def config_path(self) -> Path:
        return self.dir / "jaeger.yaml"

    @property
    def log_path(self) -> Path:
        return self.dir / "jaeger.log"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    def command(self) -> list[str]:
        """Write the config and return the command line (the dev stack spawns it itself)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            _CONFIG.format(host=self.host, max_traces=self.max_traces, log_level=self.log_level, **self.ports)
        )
        return [str(self.binary), "--config", str(self.config_path)]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Jaeger":
        command = self.command()
        with open(self.log_path, "ab") as log, processes.signals_held():
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.wait_ready(self.start_timeout, failed=self._exited)
        except BaseException:
            self.stop()
            raise
        return self

    def _exited(self) -> str | None:
        if self._proc is not None and self._proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            return f"jaeger exited with {self._proc.returncode}; end of {self.log_path}:\n{tail}"
        return None

    def ready(self) -> bool:
        """The query API answers and both OTLP receivers accept connections (the collector
        starts its extensions before its receivers)."""
        try:
            with urllib.request.urlopen(self.query_url + "/api/services", timeout=1) as resp:
                if resp.status != 200:
                    return False
            for port in (self.ports["otlp_grpc"], self.ports["otlp_http"]):
                socket.create_connection((self.host, port), timeout=1).close()
        except OSError:
            return False
        return True

    def wait_ready(self, timeout: float, failed=None) -> None:
        wait_for(f"jaeger (log {self.log_path})", self.ready, timeout, interval=0.05, failed=failed, error=TimeoutError)

    def stop(self, timeout: float = 10.0) -> None:
        with processes.signals_held():
            proc, self._proc = self._proc, None
            processes.stop_process(proc, timeout)
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Jaeger":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the query API
    def trace(self, trace_id: str) -> list[dict]:
        """The spans Jaeger holds for ``trace_id`` (32 hex digits), in OTLP/JSON form (each with
        its ``resource`` and ``scope`` added); [] while it knows none."""
        return trace_spans(self.query_url, trace_id)

    def wait_for_spans(self, trace_id: str, count: int, timeout: float = 15.0) -> list[dict]:
        """The trace's spans once it holds at least ``count`` (exporters batch: spans arrive in
        several requests); WaitTimeout (an AssertionError) when the deadline passes."""

        def enough() -> list[dict] | None:
            spans = self.trace(trace_id)
            return spans if len(spans) >= count else None

        return wait_for(f"{count} span(s) of trace {trace_id} in jaeger", enough, timeout, interval=0.05)


def trace_spans(query_url: str, trace_id: str) -> list[dict]:
    """GET /api/v3/traces/<id> of a Jaeger query API: the spans, flattened."""
    try:
        with urllib.request.urlopen(f"{query_url}/api/v3/traces/{trace_id}", timeout=5) as resp:
            doc = json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise
    spans = []
    for resource_spans in doc.get("result", {}).get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                spans.append(
                    {**span, "resource": resource_spans.get("resource", {}), "scope": scope_spans.get("scope", {})}
                )
    return spans


def attributes(item: dict) -> dict:
    """An OTLP/JSON ``attributes`` list as a plain dict (int values as ints)."""
    out = {}
    for attr in item.get("attributes", []):
        value = attr.get("value", {})
        if "intValue" in value:
            out[attr["key"]] = int(value["intValue"])
        elif value:
            out[attr["key"]] = next(iter(value.values()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlas_devstack.jaeger",
        description="Jaeger all-in-one (memory storage) on 127.0.0.1, in the foreground.",
    )
    parser.add_argument("--dir", help="keep its config and log here (default: a temporary dir, removed on exit)")
    args = parser.parse_args(argv)

    def body(on_exit: processes.OnExit) -> int:
        jaeger = Jaeger(args.dir)
        on_exit(jaeger.stop)
        jaeger.start()
        print(f"export OTEL_EXPORTER_OTLP_ENDPOINT={jaeger.otlp_http_url}", flush=True)
        print(f"export ATLAS_JAEGER_URL={jaeger.query_url}", flush=True)
        print(
            f"# OTLP gRPC: {jaeger.otlp_grpc_url} (with OTEL_EXPORTER_OTLP_PROTOCOL=grpc); log {jaeger.log_path}",
            flush=True,
        )
        assert jaeger.process is not None
        _, code = processes.wait_any({"jaeger": jaeger.process})
        raise processes.ChildExited("jaeger", code)

    from .tools import ToolNotFound

    return processes.run("jaeger", body, errors=(ToolNotFound, RuntimeError, TimeoutError))


if __name__ == "__main__":
    sys.exit(main())

"""How stale AtlasKey statuses get at scale, with the real operator process and the real API server:
`python -m benchmarks.status_staleness --keys 10000` (docs/benchmarks.md, "Status at scale").

Starts etcd + kube-apiserver (built from source), a redis-server, creates ``--keys`` AtlasKeys
(bound to ``--quotas`` AtlasQuotas) and runs `python -m atlas_operator` with its defaults (the
usage interval included) until every key is reconciled and the write-back is idle. Then, at T0,
it adds usage to every key in Redis at once (the worst burst a fleet can see) and watches the
AtlasKeys: each key's staleness is the time from T0 until its status shows the new figure.
Reports the staleness distribution (p50 / p99 / max), the status patches per second, the CPU
the API server and etcd spent meanwhile (/proc, so other work on the machine does not count)
and the operator's memory.

``--compare SRC`` runs the same round a second time on the same fleet with the operator package
found in SRC (e.g. an older tree from `git archive <commit> operator | tar -x -C SRC`): the
before/after figures of one change on one fleet.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import redis as redislib

from atlas_core import contract
from atlas_devstack.controlplane import ControlPlane
from atlas_devstack.redis_server import RedisServer, free_port
from atlas_devstack.waiting import wait_for

from .procs import cpu_seconds, rss_kb

GROUP, VERSION = "atlas.bugvanquisher.io", "v1alpha1"
REPO = Path(__file__).resolve().parents[1]


class KeyWatch:
    """One watch on the namespace's AtlasKeys (a thread): the latest status of each key, and the
    first instant each showed ``tokensToday >= target``."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        from kubernetes import client, config, watch

        self.api = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))
        self.watch = watch
        self.namespace = namespace
        self.reconciled: set[str] = set()
        self.tokens: dict[str, int] = {}
        self.events = 0
        self.target: int | None = None
        self.shown_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _see(self, obj: dict) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        tokens = (status.get("usage") or {}).get("tokensToday", 0)
        now = time.monotonic()
        with self.lock:
            self.events += 1
            if status.get("keyId"):
                self.reconciled.add(name)
            self.tokens[name] = tokens
            if self.target is not None and tokens >= self.target and name not in self.shown_at:
                self.shown_at[name] = now

    def _run(self) -> None:
        rv = None
        while not self.stopped.is_set():
            try:
                if rv is None:
                    listed = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "atlaskeys")
                    for obj in listed["items"]:
                        self._see(obj)
                    rv = listed["metadata"]["resourceVersion"]
                for event in self.watch.Watch().stream(
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    "atlaskeys",
                    resource_version=rv,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                ):
                    obj = event["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._see(obj)
                    if self.stopped.is_set():
                        return
            except Exception:  # noqa: BLE001 - 410 Gone or a dropped stream: list again
                rv = None

    def expect(self, tokens: int) -> None:
        with self.lock:
            self.target = tokens
            self.shown_at = {}

    def stop(self) -> None:
        self.stopped.set()


def create_fleet(kubeconfig: Path, namespace: str, n_keys: int, n_quotas: int) -> None:
    from kubernetes import client, config

    api_client = config.new_client_from_config(str(kubeconfig))
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": namespace}})
    custom = client.CustomObjectsApi(api_client)

    def create(plural: str, kind: str, name: str, spec: dict) -> None:
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            plural,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec},
        )

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: create("atlasquotas", "AtlasQuota", f"q{i}", {"limits": {"tokensPerDay": 10**9}}),
                range(n_quotas),
            )
        )
        list(
            pool.map(
                lambda i: create(
                    "atlaskeys",
                    "AtlasKey",
                    f"k{i}",
                    {"quotaRef": f"q{i % n_quotas}", "limits": {"tokensPerDay": 10**8}},
                ),
                range(n_keys),
            )
        )


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("atlas_operator_write_back") or line.startswith("atlas_operator_status_lag")
    }


def start_operator(
    kubeconfig: Path, redis_url: str, namespace: str, log: Path, src: str | None, env_extra: dict[str, str]
) -> tuple[subprocess.Popen, str]:
    metrics_port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "ATLAS_REDIS_URL": redis_url,
        "ATLAS_NAMESPACES": namespace,
        "ATLAS_LIVENESS_PORT": str(free_port()),
        "ATLAS_METRICS_PORT": str(metrics_port),
        "ATLAS_SERVICE_ACCOUNT_TOKENS": "false",
        **env_extra,
    }
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src) / "operator"), env.get("PYTHONPATH", "")])
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atlas_operator"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{metrics_port}/metrics"


def stop_operator(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(5)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def one_round(
    label: str,
    cp: ControlPlane,
    server: RedisServer,
    namespace: str,
    n_keys: int,
    n_quotas: int,
    watch: KeyWatch,
    src: str | None,
    log_dir: Path,
    env_extra: dict[str, str],
    timeout: float,
) -> dict:
    log = log_dir / f"operator-{label}.log"
    proc, metrics_url = start_operator(cp.kubeconfig, server.url, namespace, log, src, env_extra)
    try:
        t_start = time.monotonic()

        def reconciled() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited: {log.read_text()[-2000:]}")
            return len(watch.reconciled) >= n_keys

        wait_for("every key reconciled", reconciled, 3600, interval=1.0)
        idle = []
        last_cpu = [cpu_seconds(proc.pid), time.monotonic()]

        def write_back_idle() -> bool:
            # idle: the last cycle wrote and deferred nothing, and the operator's CPU is below
            # 20 % of a core (a restarted operator resumes every object first)
            try:
                m = scrape(metrics_url)
            except OSError:
                return False
            cpu, at = cpu_seconds(proc.pid), time.monotonic()
            busy = (cpu - last_cpu[0]) / max(1e-3, at - last_cpu[1])
            last_cpu[:] = [cpu, at]
            idle.append(
                m.get("atlas_operator_write_back_patches", 1) == 0
                and m.get("atlas_operator_write_back_deferred", 0) == 0
                and busy < 0.2
            )
            return len(idle) >= 2 and idle[-1] and idle[-2]

        wait_for("the write-back idle", write_back_idle, 3600, interval=5.0)
        settle_seconds = time.monotonic() - t_start
        operator_rss = rss_kb(proc.pid)
        r = redislib.Redis.from_url(server.url)
        now = datetime.now(timezone.utc)
        current = max(watch.tokens.values())
        target = current + 10
        pipe = r.pipeline(transaction=False)
        for i in range(n_keys):
            subject = contract.key_subject(namespace, f"k{i}")
            day_key, month_key = contract.usage_keys(
                subject, now, contract.slot_tag(namespace, f"k{i}", f"q{i % n_quotas}")
            )
            pipe.hset(day_key, contract.USAGE_SETTLED, target)
            pipe.hincrby(day_key, contract.USAGE_REQUESTS, 1)
            pipe.hset(day_key, contract.USAGE_LAST, int(now.timestamp() * 1000))
            pipe.hset(month_key, contract.USAGE_SETTLED, target)
        watch.expect(target)
        cpu = {name: cpu_seconds(p.pid) for name, p in cp.processes.items()}
        op_cpu = cpu_seconds(proc.pid)
        events_before = watch.events
        t0 = time.monotonic()
        pipe.execute()
        r.close()
        wait_for("every status showing the new usage", lambda: len(watch.shown_at) >= n_keys, timeout, interval=0.5)
        elapsed = time.monotonic() - t0
        cpu = {name: cpu_seconds(p.pid) - cpu[name] for name, p in cp.processes.items()}
        op_cpu = cpu_seconds(proc.pid) - op_cpu
        stale = [t - t0 for t in watch.shown_at.values()]
        last = max(stale)
        result = {
            "label": label,
            "keys": n_keys,
            "settle_s": round(settle_seconds),
            "p50_s": round(percentile(stale, 50), 1),
            "p99_s": round(percentile(stale, 99), 1),
            "max_s": round(last, 1),
            "patches_per_s": round((watch.events - events_before) / last, 1),
            "apiserver_cpu_s": round(cpu.get("kube-apiserver", 0), 1),
            "etcd_cpu_s": round(cpu.get("etcd", 0), 1),
            "apiserver_ms_per_patch": round(
                1000 * cpu.get("kube-apiserver", 0) / max(1, watch.events - events_before), 2
            ),
            "etcd_ms_per_patch": round(1000 * cpu.get("etcd", 0) / max(1, watch.events - events_before), 2),
            "operator_cpu_s": round(op_cpu, 1),
            "operator_rss_mib_settled": round(operator_rss / 1024),
            "operator_rss_mib_after": round(rss_kb(proc.pid) / 1024),
            "window_s": round(elapsed, 1),
            "loadavg": os.getloadavg()[0],
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        stop_operator(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--quotas", type=int, default=100)
    parser.add_argument(
        "--compare", metavar="SRC", help="then the same round with the operator package in SRC/operator"
    )
    parser.add_argument("--compare-first", action="store_true", help="run the --compare round first")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every status")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra operator environment for this tree's round (e.g. ATLAS_STATUS_WRITES_PER_SECOND=100)",
    )
    args = parser.parse_args()
    # stopped by a signal: unwind, so the operator, Redis and the control plane stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env_extra = dict(e.split("=", 1) for e in args.env)
    log_dir = Path(tempfile.mkdtemp(prefix="atlas-staleness-"))
    print(f"logs in {log_dir}", flush=True)
    namespace = "fleet"
    with ControlPlane(log=lambda m: None) as cp, RedisServer() as server:
        t0 = time.monotonic()
        create_fleet(cp.kubeconfig, namespace, args.keys, args.quotas)
        print(
            f"created {args.keys} AtlasKeys and {args.quotas} AtlasQuotas in {time.monotonic() - t0:.0f}s", flush=True
        )
        watch = KeyWatch(cp.kubeconfig, namespace)
        rounds = [("this tree", None, env_extra)]
        if args.compare:
            rounds.append((f"{args.compare}", args.compare, {}))
            if args.compare_first:
                rounds.reverse()
        try:
            for label, src, extra in rounds:
                one_round(
                    label.replace("/", "_"),
                    cp,
                    server,
                    namespace,
                    args.keys,
                    args.quotas,
                    watch,
                    src,
                    log_dir,
                    extra,
                    args.timeout,
                )
        finally:
            watch.stop()


if __name__ == "__main__":
    main()

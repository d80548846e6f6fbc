"""Run the Atlas benchmarks: ``python -m benchmarks`` (``make bench``).

Starts a real redis-server, the mock upstream and the gateway as separate processes on free
loopback ports, then:

1. wrk (with a Lua script for the POST body, --latency) against the mock directly and
   through the gateway, at concurrency 1 and 16: p50/p99, req/s, the added p50 at c=1 and the
   c=16 throughput ratio, against the targets (<= 1 ms, >= 40 %);
2. the same wrk runs through a minimal proxy using aiohttp and one using httpx (the upstream
   client choice);
3. exactness: 200 concurrent requests against a key whose daily budget fits exactly 20;
4. 1,000 slow and hostile clients (benchmarks/slow_clients.py): the gateway's memory and open
   sockets over time, and a normal client's latency meanwhile.

The gateway runs with ATLAS_WORKERS=1 (the default) and, for c=16, once more with 2 workers.
The gateway's CPU time per request (from /proc) is printed too: unlike latency it hardly
depends on what else the machine is doing.

A reference run repeats the direct/gateway pair against a FastAPI implementation of the mock,
the setup of design.md's performance table (the raw ASGI mock is several times faster, which
makes the throughput ratio much harder to reach).

Environment: BENCH_REDIS_URL (a Redis or Redis Cluster to use instead of starting one),
BENCH_DURATION (seconds per wrk run, default 6), BENCH_SKIP_CLIENTS=1 to skip
step 2, BENCH_SKIP_WORKERS=1 to skip the 2-worker run, BENCH_SKIP_REFERENCE=1 to skip the
FastAPI-mock reference run, BENCH_SKIP_SLOW=1 to skip step 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone

import redis

from atlas_core import contract
from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer, free_port
from atlas_gateway.settings import Settings
from atlas_gateway.tokens import Meter

from . import slow_clients

TARGET_ADDED_P50_MS = 1.0
TARGET_RATIO = 0.40
MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 16}
BENCH_KEY = "sk-atlas-bench-0000000000000000000000"
EXACT_KEY = "sk-atlas-exact-0000000000000000000000"


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} not ready")


class Proc:
    """A Python module run as a server process on a free port, stopped on exit."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, health: str = "/healthz",
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.env = {**os.environ, **(env or {})}
        self.health = health
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Proc":
        self.proc = subprocess.Popen([sys.executable, *self.args], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(self.url + self.health, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """user+system CPU of a process and its direct children (uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(p: int) -> float:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            return 0.0

    total = of(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        total += of(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return total


def gateway(redis_url: str, upstream: str, **extra: str) -> Proc:
    env = {"ATLAS_REDIS_URL": redis_url, "ATLAS_UPSTREAM_URL": upstream, "ATLAS_LOG_LEVEL": "warning", **extra}
    port = free_port()
    env["ATLAS_PORT"] = str(port)
    return Proc(["-m", "atlas_gateway"], env, port=port)


# Every limit kind on the benchmark key and on its quota, set high enough never to bite: the
# benchmark measures the full admission script, not a short cut for unlimited keys.
NEVER_BITING = contract.Limits(requests_per_second=1e6, burst=10**6, tokens_per_minute=10**12,
                               tokens_per_day=10**13, tokens_per_month=10**14, max_concurrent=10_000)


def write_key(r: redis.Redis, key: str, name: str, limits: contract.Limits, quota: contract.Limits | None) -> None:
    key_hash = contract.hash_api_key(key)
    cfg = contract.KeyConfig("bench", name, contract.key_id_of(key_hash), limits,
                             quota=f"{name}-quota" if quota else None)
    r.set(contract.key_config_key(key_hash), cfg.encode())
    if quota:
        r.set(contract.quota_config_key("bench", f"{name}-quota"),
              contract.QuotaConfig("bench", f"{name}-quota", quota).encode())


# ------------------------------------------------------------------------------------- wrk

def _to_ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        return float("nan")
    num, unit = float(m.group(1)), m.group(2)
    return num * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, connections: int, duration: int, key: str | None, workdir: str) -> dict:
    script = os.path.join(workdir, "post.lua")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    with open(script, "w") as fh:
        fh.write('wrk.method = "POST"\n')
        fh.write(f"wrk.body = {json.dumps(json.dumps(BODY))}\n")
        for name, value in headers.items():
            fh.write(f'wrk.headers["{name}"] = "{value}"\n')
        # wrk counts non-2xx/3xx responses; print them so a benchmark of errors cannot pass silently
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script,
         url + "/v1/chat/completions"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    res = {"p50": float("nan"), "p99": float("nan"), "rps": 0.0, "errors": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("50%"):
            res["p50"] = _to_ms(line.split()[1])
        elif line.startswith("99%"):
            res["p99"] = _to_ms(line.split()[1])
        elif line.startswith("Requests/sec:"):
            res["rps"] = float(line.split()[1])
        elif line.startswith("Non-2xx or 3xx responses:"):
            res["errors"] = int(line.split()[-1])
    return res


REDIS_PID: list[int] = []  # set once Redis runs: its CPU per request is reported too


def redis_client(url: str):
    """redis-py for ``url``: a RedisCluster when the server runs in cluster mode."""
    probe = redis.Redis.from_url(url)
    try:
        on_cluster = bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    finally:
        probe.close()
    return redis.RedisCluster.from_url(url) if on_cluster else redis.Redis.from_url(url)


class _ExternalRedis:
    def __init__(self, url: str) -> None:
        self.url = url


@contextlib.contextmanager
def bench_redis():
    """BENCH_REDIS_URL: run against that Redis, single or a Redis Cluster (e.g. one started by
    ``python -m atlas_devstack.redis_cluster``), instead of starting one. Redis CPU is then the
    (local) master serving the benchmark key's slot."""
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        with RedisServer() as rs:
            REDIS_PID.append(rs._proc.pid)
            yield rs
        return
    client = redis_client(url)
    try:
        bench_slot_key = contract.lease_key(contract.key_subject("bench", "bench"),
                                            contract.quota_subject("bench", "bench-quota"))
        if isinstance(client, redis.RedisCluster):
            info = client.info("server", target_nodes=client.get_node_from_key(bench_slot_key))
        else:
            info = client.info("server")
        REDIS_PID.append(int(info["process_id"]))
    finally:
        client.close()
    yield _ExternalRedis(url)


def measure_gateway(gw: Proc, c: int, duration: int, workdir: str, key: str | None = BENCH_KEY,
                    warmup: int = 2) -> dict:
    if warmup:
        wrk(gw.url, c, warmup, key, workdir)
    cpu0 = cpu_seconds(gw.proc.pid)
    redis0 = cpu_seconds(REDIS_PID[0]) if REDIS_PID and key else 0.0
    res = wrk(gw.url, c, duration, key, workdir)
    # CPU per request is the load-independent figure: on a shared 2-core machine latency
    # mostly measures the scheduler
    requests = max(1, res["rps"] * duration)
    res["cpu_us"] = (cpu_seconds(gw.proc.pid) - cpu0) / requests * 1e6
    if REDIS_PID and key:
        res["redis_us"] = (cpu_seconds(REDIS_PID[0]) - redis0) / requests * 1e6
    return res


# ------------------------------------------------------------------------------- exactness

async def exactness(gateway_url: str, redis_url: str, upstream_url: str) -> dict:
    import aiohttp

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 100}
    bound = Meter.from_settings(Settings(upstream_url="http://unused")).bound("chat", body)  # the gateway's defaults
    prompt_est, reserve = bound.prompt, bound.reserve
    budget = 20 * reserve
    r = redis_client(redis_url)
    write_key(r, EXACT_KEY, "exact", contract.Limits(tokens_per_day=budget), None)
    # The mock reports exactly the reservation as usage, so settling refunds nothing and the
    # budget fits exactly 20 requests; 100 ms latency keeps all 200 truly concurrent.
    headers = {"Authorization": f"Bearer {EXACT_KEY}", "x-mock-latency-ms": "100",
               "x-mock-prompt-tokens": str(prompt_est), "x-mock-completion-tokens": str(reserve - prompt_est)}
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> None:
            async with session.post(gateway_url + "/v1/chat/completions", json=body, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)

        await asyncio.gather(*(one() for _ in range(200)))
    day_key, _ = contract.usage_keys(contract.key_subject("bench", "exact"), datetime.now(timezone.utc))
    settled = int(r.hget(day_key, "settled") or 0)
    leases = r.zcard(contract.lease_key(contract.key_subject("bench", "exact")))
    r.close()
    return {"admitted": statuses.count(200), "rejected_429": statuses.count(429),
            "other": len(statuses) - statuses.count(200) - statuses.count(429),
            "reserve_per_request": reserve, "budget": budget, "tokens_settled": settled,
            "leases_left": leases, "ok": settled <= budget and statuses.count(200) <= 20 and leases == 0}


# ------------------------------------------------------------------------------------ main

def fmt(res: dict) -> str:
    return f"p50 {res['p50']:7.3f} ms  p99 {res['p99']:7.3f} ms  {res['rps']:9.1f} req/s" + (
        f"  proxy CPU {res['cpu_us']:.0f} us/req" if "cpu_us" in res else "") + (
        f", Redis CPU {res['redis_us']:.0f} us/req" if "redis_us" in res else "") + (
        f"  ({res['errors']} non-2xx!)" if res["errors"] else "")


def main() -> int:
    if not shutil.which("wrk"):
        print("wrk not found: install it (make system-deps)", file=sys.stderr)
        return 2
    duration = int(os.environ.get("BENCH_DURATION", "6"))
    workdir = tempfile.mkdtemp(prefix="atlas-bench-")
    results: dict[str, dict] = {}
    started = time.monotonic()
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{os.cpu_count()} CPUs; {duration}s per wrk run", flush=True)
    try:
        with bench_redis() as rs, MockUpstreamProcess() as mock:
            r = redis_client(rs.url)
            write_key(r, BENCH_KEY, "bench", NEVER_BITING, NEVER_BITING)
            r.close()
            with gateway(rs.url, mock.url, ATLAS_WORKERS="1") as gw:
                for c in (1, 16):
                    wrk(mock.url, c, 2, None, workdir)  # warm-up
                    results[f"direct c={c}"] = wrk(mock.url, c, duration, None, workdir)
                    print(f"direct    c={c:<3} {fmt(results[f'direct c={c}'])}", flush=True)
                    results[f"gateway c={c}"] = measure_gateway(gw, c, duration, workdir)
                    print(f"gateway   c={c:<3} {fmt(results[f'gateway c={c}'])}", flush=True)
                exact = asyncio.run(exactness(gw.url, rs.url, mock.url))
            slow = None
            if os.environ.get("BENCH_SKIP_SLOW") != "1":
                with gateway(rs.url, mock.url, ATLAS_HEADER_TIMEOUT_SECONDS="5",
                             ATLAS_BODY_TIMEOUT_SECONDS="10") as sgw:
                    slow = asyncio.run(slow_clients.flood(sgw.url, sgw.port, sgw.proc.pid, BENCH_KEY,
                                                          json.dumps(BODY).encode()))
            if os.environ.get("BENCH_SKIP_WORKERS") != "1":
                with gateway(rs.url, mock.url, ATLAS_WORKERS="2") as gw2:
                    results["gateway 2 workers c=16"] = measure_gateway(gw2, 16, duration, workdir)
                    print(f"gateway 2 workers c=16 {fmt(results['gateway 2 workers c=16'])}", flush=True)
            if os.environ.get("BENCH_SKIP_REFERENCE") != "1":
                # design.md's reference table used a FastAPI mock: same runs against one
                with Proc(["-m", "atlas_devstack.mock_upstream", "--framework", "fastapi",
                           "--port", "{port}"]) as fmock, gateway(rs.url, fmock.url) as fgw:
                    for c in (1, 16):
                        wrk(fmock.url, c, 2, None, workdir)
                        results[f"fastapi-mock direct c={c}"] = wrk(fmock.url, c, duration, None, workdir)
                        print(f"fastapi-mock direct c={c:<3} {fmt(results[f'fastapi-mock direct c={c}'])}", flush=True)
                        results[f"fastapi-mock gateway c={c}"] = measure_gateway(fgw, c, duration, workdir)
                        print(f"fastapi-mock gateway c={c:<3} {fmt(results[f'fastapi-mock gateway c={c}'])}", flush=True)
            if os.environ.get("BENCH_SKIP_CLIENTS") != "1":
                for client in ("aiohttp", "httpx"):
                    with Proc(["-m", "benchmarks.client_proxy", "--client", client, "--upstream", mock.url,
                               "--port", "{port}"]) as proxy:
                        for c in (1, 16):
                            results[f"{client} proxy c={c}"] = measure_gateway(proxy, c, duration, workdir, None)
                            print(f"{client:7} proxy c={c:<3} {fmt(results[f'{client} proxy c={c}'])}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    added = results["gateway c=1"]["p50"] - results["direct c=1"]["p50"]
    ratio = results["gateway c=16"]["rps"] / results["direct c=16"]["rps"] if results["direct c=16"]["rps"] else 0
    print("\n=== summary ===")
    print(f"{'path':26} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>10} {'proxy CPU':>10} {'Redis CPU':>10}  (us/req)")
    for name, res in results.items():
        cpu = f"{res['cpu_us']:10.0f}" if "cpu_us" in res else ""
        rcpu = f"{res['redis_us']:10.0f}" if "redis_us" in res else ""
        print(f"{name:26} {res['p50']:8.3f} {res['p99']:8.3f} {res['rps']:10.1f} {cpu:>10} {rcpu:>10}")
    ok_latency = added <= TARGET_ADDED_P50_MS
    ok_ratio = ratio >= TARGET_RATIO
    print(f"\nadded p50 at c=1: {added:.3f} ms (target <= {TARGET_ADDED_P50_MS} ms) -> {'PASS' if ok_latency else 'MISS'}")
    print(f"c=16 throughput ratio: {ratio:.2f} (target >= {TARGET_RATIO:.2f}) -> {'PASS' if ok_ratio else 'MISS'}")
    if "gateway 2 workers c=16" in results and results["direct c=16"]["rps"]:
        ratio2 = results["gateway 2 workers c=16"]["rps"] / results["direct c=16"]["rps"]
        print(f"c=16 throughput ratio, ATLAS_WORKERS=2: {ratio2:.2f} "
              f"(target >= {TARGET_RATIO:.2f}) -> {'PASS' if ratio2 >= TARGET_RATIO else 'MISS'}")
    if "fastapi-mock direct c=16" in results:
        f_added = results["fastapi-mock gateway c=1"]["p50"] - results["fastapi-mock direct c=1"]["p50"]
        f_ratio = results["fastapi-mock gateway c=16"]["rps"] / max(1.0, results["fastapi-mock direct c=16"]["rps"])
        print(f"reference setup (FastAPI mock, as in design.md): added p50 {f_added:.3f} ms, "
              f"c=16 ratio {f_ratio:.2f}")
    for client in ("aiohttp", "httpx"):
        if f"{client} proxy c=16" in results:
            share = results[f"{client} proxy c=16"]["rps"] / results["direct c=16"]["rps"]
            print(f"{client} minimal proxy c=16 share of direct: {share:.2f}")
    print(f"exactness: {exact['admitted']} admitted, {exact['rejected_429']} x 429, {exact['other']} other; "
          f"tokens settled {exact['tokens_settled']} of budget {exact['budget']} "
          f"({exact['reserve_per_request']} per request); leases left {exact['leases_left']} -> "
          f"{'PASS' if exact['ok'] else 'FAIL: BUDGET EXCEEDED'}")
    if slow is not None:
        print("1,000 slow clients (400 idle, 300 slow headers, 200 slow 4 MB bodies, 100 unknown keys "
              "sending 4 MB):")
        print(slow_clients.report(slow))
    invalid = [name for name, res in results.items() if res["errors"]]
    if invalid:
        print(f"INVALID: non-2xx responses in {', '.join(invalid)}: those figures measure errors")
    print(f"load average after: {os.getloadavg()[0]:.2f}; total {time.monotonic() - started:.0f}s")
    return 0 if exact["ok"] and not invalid else 1


if __name__ == "__main__":
    sys.exit(main())

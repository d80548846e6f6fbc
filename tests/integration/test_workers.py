"""ATLAS_WORKERS=2 as a pod runs it: one port, two worker processes (each its own SO_REUSEPORT
socket), /metrics summing both workers whichever answers the scrape, a killed worker started
again without its counts going missing, and nothing left when the gateway stops."""

from __future__ import annotations

import glob
import json
import os
import re
import signal

import httpx

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import write_key
from tests.fixtures.leftovers import listening_ports, process_tree

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def listening_workers(gw) -> list[int]:
    return sorted(p for p in process_tree(gw.proc.pid) if listening_ports({p}) == {gw.port})


def requests_counted(gw) -> float:
    """atlas_gateway_requests_total summed over its label sets, from one scrape."""
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(r"^atlas_gateway_requests_total\{[^}]*\} (\S+)$", text, re.M))


def send(gw, key: str, n: int) -> None:
    for _ in range(n):  # a new connection each: the kernel spreads them over the workers' sockets
        with httpx.Client(timeout=10) as client:
            resp = client.post(gw.url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 200, resp.text


def snapshots(tmp) -> dict[int, float]:
    """pid -> requests counted in that worker's metrics snapshot (worker_metrics.py)."""
    out = {}
    for path in glob.glob(os.path.join(tmp, "atlas-metrics-*", "*.json")):
        with open(path) as fh:
            families = json.load(fh)
        out[int(os.path.basename(path)[:-5])] = sum(
            value
            for name, _, _, samples in families
            if name == "atlas_gateway_requests"
            for sample, _, value in samples
            if sample == "atlas_gateway_requests_total"
        )
    return out


def test_two_workers_share_the_port_and_their_metrics_add_up(redis_url, mock_upstream, start_gateway, tmp_path):
    write_key(redis_url, "sk-workers", "workers", contract.Limits(tokens_per_day=10_000_000))
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_WORKERS="2", TMPDIR=str(tmp_path))
    workers = wait_for("two workers on the port", lambda: len(w := listening_workers(gw)) == 2 and w, 20)
    assert not listening_ports({gw.proc.pid})  # the supervisor holds no socket

    send(gw, "sk-workers", 60)
    # each worker snapshots its counts once a second: the sum is exact once both have
    wait_for("/metrics counting all 60 requests", lambda: requests_counted(gw) == 60, 10)
    per_worker = wait_for(
        "both workers' snapshots", lambda: (s := snapshots(str(tmp_path))) and sum(s.values()) == 60 and s, 10
    )
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker  # both served

    # a worker that dies is started again; what it had counted stays counted
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_for("the worker started again", lambda: len(w := listening_workers(gw)) == 2 and victim not in w, 20)
    assert requests_counted(gw) == 60
    send(gw, "sk-workers", 20)
    wait_for("/metrics counting all 80 requests", lambda: requests_counted(gw) == 80, 10)

    gw.stop()
    assert not glob.glob(os.path.join(str(tmp_path), "atlas-metrics-*")), "the snapshot directory is removed"
    assert not any(p in process_tree(os.getpid()) for p in workers)

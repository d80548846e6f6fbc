"""One load run against one target, with the CPU its processes spent per request."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from . import bodies, load, tools
from .keys import BENCH_KEY
from .procs import Proc, cpu_seconds, per_request_us

CHAT = "/v1/chat/completions"


def _one_request(url: str, body: bytes, headers: dict[str, str]) -> None:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
    except OSError:
        pass  # an error answer shows in the measured run's error count


@dataclass
class Target:
    """Something a load generator is pointed at, and whose processes' CPU is counted."""

    label: str
    url: str  # chat completions, non-streaming
    stream_url: str  # the same for streaming requests (nginx answers SSE on another location)
    headers: dict[str, str] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)  # process label -> pid


class Bench:
    """Runs wrk or vegeta against a target and counts its processes' CPU per request (/proc
    before and after the run). The first run against a target is preceded by a warm-up."""

    def __init__(self, tl: tools.Tools, workdir: str, duration: float, warmup: float) -> None:
        self.tools, self.workdir, self.duration, self.warmup = tl, workdir, duration, warmup
        self.warmed: set[str] = set()

    def _counted(self, target: Target, fn) -> load.Run:
        before = {name: cpu_seconds(pid) for name, pid in target.cpu.items()}
        run = fn()
        if run.requests:
            for name, pid in target.cpu.items():
                run.cpu_us[name] = per_request_us(before[name], cpu_seconds(pid), run.requests)
        return run

    def closed(self, target: Target, connections: int, body: bytes | None = None, stream: bool = False) -> load.Run:
        body = body or bodies.encode(bodies.SMALL)
        url = target.stream_url if stream else target.url
        if target.label not in self.warmed:
            # at least one request: a cold first one (LiteLLM imports lazily for over a second)
            # is not what is measured
            _one_request(url, body, target.headers)
            if self.warmup:
                load.wrk(self.tools.wrk, url, 16, self.warmup, body, target.headers, self.workdir)
            self.warmed.add(target.label)
        return self._counted(
            target,
            lambda: load.wrk(self.tools.wrk, url, connections, self.duration, body, target.headers, self.workdir),
        )

    def fixed(self, target: Target, rate: int) -> load.Run:
        body = bodies.encode(bodies.SMALL)
        return self._counted(
            target,
            lambda: load.vegeta(self.tools.vegeta, target.url, rate, self.duration, body, target.headers, self.workdir),
        )


def gateway_target(label: str, gw: Proc, redis_pid: int | None) -> Target:
    cpu = {"gateway": gw.pid}
    if redis_pid:
        cpu["redis-server"] = redis_pid
    return Target(label, gw.url + CHAT, gw.url + CHAT, {"Authorization": f"Bearer {BENCH_KEY}"}, cpu)

"""The two load generators and what their output says.

* **wrk** (closed loop): N connections, each sends its next request when the previous answer
  is in. It measures throughput and the latency of a saturated server, but a stall delays the
  requests that would have been sent meanwhile, so they are never measured (coordinated
  omission).
* **vegeta** (open loop): requests leave at a fixed rate whatever the answers do (it starts
  more workers and connections as needed), and each latency is measured from its send; a stall
  shows in the percentiles instead of lowering the rate.

Both POST one fixed body with the headers given; non-2xx answers are counted, so a run that
measured errors cannot pass for a result.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass, field

NAN = float("nan")


@dataclass
class Run:
    """One load run against one URL."""

    p50: float = NAN  # ms
    p99: float = NAN  # ms
    rps: float = 0.0  # answers per second
    requests: int = 0
    errors: int = 0  # non-2xx answers, socket errors, timeouts
    cpu_us: dict[str, float] = field(default_factory=dict)  # process label -> CPU µs per request
    rate: float | None = None  # fixed-rate runs: the rate asked for

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.errors == 0 and not math.isnan(self.p50)


# ------------------------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(value: str) -> float:
    """A wrk duration (``812.00us``, ``1.23ms``, ``2.01s``, ``1.00m``) in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    return float(m.group(1)) * _UNITS_MS[m.group(2)] if m else NAN


def parse_wrk(out: str) -> Run:
    """wrk ``--latency`` output -> Run (p50, p99, req/s, request count, non-2xx + socket errors)."""
    run = Run()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("50%"):
            run.p50 = to_ms(line.split()[1])
        elif line.startswith("99%"):
            run.p99 = to_ms(line.split()[1])
        elif line.startswith("Requests/sec:"):
            run.rps = float(line.split()[1])
        elif m := re.match(r"(\d+) requests in", line):
            run.requests = int(m.group(1))
        elif line.startswith("Non-2xx or 3xx responses:"):
            run.errors += int(line.split()[-1])
        elif line.startswith("Socket errors:"):
            # "Socket errors: connect 0, read 0, write 0, timeout 0"
            run.errors += sum(int(n) for n in re.findall(r"\d+", line))
    if not run.requests:  # wrk prints a distribution of zeros when nothing was answered
        run.p50 = run.p99 = NAN
    return run


def wrk_script(body: bytes, headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def wrk(
    binary: str, url: str, connections: int, duration: float, body: bytes, headers: dict[str, str], workdir: str
) -> Run:
    script = os.path.join(workdir, "wrk-post.lua")
    with open(script, "w") as fh:
        fh.write(wrk_script(body, {"Content-Type": "application/json", **headers}))
    out = subprocess.run(
        [
            binary,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            script,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    ).stdout
    return parse_wrk(out)


# ---------------------------------------------------------------------------------- vegeta


def vegeta_target(url: str, body: bytes, headers: dict[str, str]) -> str:
    """One target in vegeta's JSON target format (the body base64-encoded)."""
    return json.dumps(
        {
            "method": "POST",
            "url": url,
            "body": base64.b64encode(body).decode(),
            "header": {k: [v] for k, v in {"Content-Type": "application/json", **headers}.items()},
        }
    )


def parse_vegeta_report(report: str, rate: float) -> Run:
    """``vegeta report -type=json`` -> Run. Latencies there are in nanoseconds; ``throughput``
    counts successful answers per second, ``rate`` the requests sent per second."""
    doc = json.loads(report)
    lat = doc.get("latencies", {})
    codes = doc.get("status_codes") or {}
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    requests = int(doc.get("requests", 0))
    return Run(
        p50=lat.get("50th", 0) / 1e6 if requests else NAN,
        p99=lat.get("99th", 0) / 1e6 if requests else NAN,
        rps=float(doc.get("throughput", 0.0)),
        requests=requests,
        errors=requests - ok,
        rate=rate,
    )


def vegeta(
    binary: str, url: str, rate: int, duration: float, body: bytes, headers: dict[str, str], workdir: str
) -> Run:
    targets = os.path.join(workdir, "vegeta-targets.json")
    results = os.path.join(workdir, "vegeta-results.bin")
    with open(targets, "w") as fh:
        fh.write(vegeta_target(url, body, headers) + "\n")
    # -max-workers bounds the goroutines a stalled target can pile up; 2,000 in flight is already
    # a second of backlog at the highest rate, far beyond any latency worth reporting
    subprocess.run(
        [
            binary,
            "attack",
            "-format=json",
            f"-targets={targets}",
            f"-rate={rate}/s",
            f"-duration={max(1, round(duration))}s",
            "-timeout=10s",
            "-max-workers=2000",
            f"-output={results}",
        ],
        check=True,
        capture_output=True,
        timeout=duration + 60,
    )
    report = subprocess.run(
        [binary, "report", "-type=json", results], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return parse_vegeta_report(report, rate)

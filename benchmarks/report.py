"""The bench's tables and targets, as Markdown: printed, and written into docs/benchmarks.md
between the markers below (the rest of the document is kept)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .load import Run

BEGIN = "<!-- make-bench:results:begin (written by `make bench`; edits here are replaced) -->"
END = "<!-- make-bench:results:end -->"

# issue 13's targets
TARGET_CPU_C16_US = 100.0
TARGET_CPU_C1_US = 150.0
TARGET_ADDED_P99_C1_MS = 0.5
TARGET_TAIL_RATIO = 3.0
TARGET_BIG_PROMPT_MS = 0.5
TARGET_REDIS_CPU_US = 20.0
# issue 24's: Atlas's CPU per request over the floor (a bare forward on its own server and client)
TARGET_FLOOR_RATIO = 1.25
TARGET_ADDED_P50_C1_MS = 0.3

# the two floors every Atlas figure is divided by (benchmarks.floor): a proxy in C, and a
# forward with no logic on Atlas's own server and upstream client
NGINX_PROXY = "nginx as a reverse proxy → nginx"
BARE_FORWARD = "bare forward on Atlas's stack (its uvicorn protocol + aiohttp, no logic) → nginx"


@dataclass
class Results:
    """Everything one bench run measured; filled by __main__ as it goes."""

    meta: dict = field(default_factory=dict)  # started, load averages, durations, versions
    closed: dict[str, dict[int, Run]] = field(default_factory=dict)  # target -> concurrency -> Run
    fixed: dict[str, dict[int, Run | str]] = field(default_factory=dict)  # target -> rate -> Run or why not run
    prompts: dict[str, dict[tuple[int, bool], Run]] = field(default_factory=dict)  # target -> (bytes, stream)
    memory: dict[str, dict[str, dict]] = field(default_factory=dict)  # gateway -> idle/streams -> figures
    exactness: dict[str, dict] = field(default_factory=dict)
    slow_clients: dict[str, str] = field(default_factory=dict)
    token_auth: dict[str, str] = field(default_factory=dict)  # gateway -> token vs static key (token_auth.py)
    profiles: dict[str, str] = field(default_factory=dict)  # gateway target -> profiling.report text
    tracing: str = ""  # tracing_cost.table: CPU per request with tracing off, at 1 % and 100 %
    capacity: str = ""  # capacity.table: long requests held at once, shed, memory and files per request
    leases: str = ""  # lease_scale.report: Redis CPU per admission vs requests in flight
    gateways: list[str] = field(default_factory=list)  # Atlas labels, "before" first
    reference: str = "nginx directly"
    peer: str | None = None  # LiteLLM's label when it ran


# ---------------------------------------------------------------------------- formatting


def ms(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def rps(value: float) -> str:
    return f"{value:,.0f}" if value else "–"


def us(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.0f} µs"


def _cell(run: Run | None, attr: str) -> str:
    if run is None:
        return "–"
    text = rps(run.rps) if attr == "rps" else ms(getattr(run, attr))
    return text + (f" ({run.errors} errors!)" if run.errors else "")


def cpu_cell(c1: Run | None, c16: Run | None, c16_label: str = "c=16") -> str:
    """``149 µs (c=16), 318 µs (c=1), plus 28 µs in redis-server``: the target's own process
    first, redis-server's (Atlas) after it."""

    def own(run: Run) -> float | None:
        return next((v for k, v in run.cpu_us.items() if k != "redis-server"), None)

    parts = [
        f"{us(own(r))} ({label})"
        for label, r in ((c16_label, c16), ("c=1", c1))
        if r is not None and own(r) is not None
    ]
    redis = [r.cpu_us["redis-server"] for r in (c16, c1) if r is not None and "redis-server" in r.cpu_us]
    text = ", ".join(parts) or "–"
    if redis:
        text += f", plus {us(redis[0])} in redis-server"
    return text


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


# -------------------------------------------------------------------------------- tables


def own_cpu(run: Run | None) -> float | None:
    """The CPU per request of the target's own process (not redis-server's)."""
    if run is None:
        return None
    return next((v for k, v in run.cpu_us.items() if k != "redis-server"), None)


def ratio(res: Results, target: str, floor: str, c: int = 16) -> float | None:
    """``target``'s own CPU per request over ``floor``'s, at concurrency ``c``."""
    mine, base = own_cpu(res.closed.get(target, {}).get(c)), own_cpu(res.closed.get(floor, {}).get(c))
    return mine / base if mine is not None and base else None


def closed_loop_table(res: Results) -> str:
    rows = []
    floors = [f for f in (NGINX_PROXY, BARE_FORWARD) if f in res.closed]
    for target, runs in res.closed.items():
        c1, c16 = runs.get(1), runs.get(16)
        ratios = []
        for floor in floors:
            r = ratio(res, target, floor) if target != res.reference else None
            ratios.append(f"{r:.2f}×" if r is not None else "–")
        rows.append(
            [
                target,
                _cell(c16, "rps"),
                _cell(c1, "p50"),
                _cell(c1, "p99"),
                _cell(c16, "p99"),
                cpu_cell(c1, c16),
                *ratios,
            ]
        )
    names = {NGINX_PROXY: "CPU c=16 ÷ nginx proxy", BARE_FORWARD: "CPU c=16 ÷ bare forward"}
    return table(
        ["target", "req/s c=16", "p50 c=1", "p99 c=1", "p99 c=16", "CPU per request", *(names[f] for f in floors)], rows
    )


def fixed_rate_table(res: Results) -> str:
    rates = sorted({rate for runs in res.fixed.values() for rate in runs})
    header = (
        ["target"] + [f"{rate:,}/s: p50 / p99 (answered/s)" for rate in rates] + ["CPU per request at the lowest rate"]
    )
    rows = []
    for target, runs in res.fixed.items():
        row = [target]
        for rate in rates:
            run = runs.get(rate)
            if isinstance(run, Run):
                row.append(
                    f"{ms(run.p50)} / {ms(run.p99)} ({rps(run.rps)})" + (f", {run.errors} errors" if run.errors else "")
                )
            else:
                row.append(run or "–")
        lowest = runs.get(rates[0]) if rates else None
        row.append(cpu_cell(None, lowest, f"{rates[0]:,}/s") if isinstance(lowest, Run) and lowest.cpu_us else "–")
        rows.append(row)
    return table(header, rows)


def size_label(n: int) -> str:
    return f"{n // 1024} KB" if n >= 1024 else f"{n} B"


def prompt_table(res: Results) -> str:
    keys = sorted({k for runs in res.prompts.values() for k in runs}, key=lambda k: (k[1], k[0]))
    header = ["target"] + [f"{size_label(n)}{', streamed' if s else ''}: p50 (added), CPU/request" for n, s in keys]
    ref = res.prompts.get(res.reference, {})
    rows = []
    for target, runs in res.prompts.items():
        row = [target]
        for k in keys:
            run = runs.get(k)
            if run is None:
                row.append("–")
                continue
            cell = ms(run.p50)
            if target != res.reference and k in ref:
                cell += f" (+{run.p50 - ref[k].p50:.2f})"
            own = next((v for name, v in run.cpu_us.items() if name != "redis-server"), None)
            if own is not None:  # the load-independent figure beside the latency
                cell += f", {us(own)}"
            row.append(cell + (f", {run.errors} errors!" if run.errors else ""))
        rows.append(row)
    return table(header, rows)


def memory_table(res: Results) -> str:
    rows = []
    for gw, parts in res.memory.items():
        idle, streams = parts.get("idle"), parts.get("streams")

        def cell(d: dict | None) -> str:
            if not d:
                return "–"
            return (
                f"{d['per_item_kb']:.1f} KiB ({d['n']} → +{(d['rss_after_kb'] - d['rss_before_kb']) / 1024:.1f} MiB, "
                f"{d['ok']} answered 200)"
            )

        rows.append([gw, cell(idle), cell(streams)])
    return table(["gateway", "per idle keep-alive connection", "per open stream (slow upstream)"], rows)


# ------------------------------------------------------------------------------- targets


def _added(res: Results, target: str, key: tuple[int, bool]) -> float:
    ref, run = res.prompts.get(res.reference, {}).get(key), res.prompts.get(target, {}).get(key)
    return run.p50 - ref.p50 if run and ref else math.nan


def targets(res: Results) -> list[tuple[str, dict[str, tuple[str, bool | None]]]]:
    """[(target text, {gateway label: (measured text, met?)})]; met is None when not measured."""
    out: list[tuple[str, dict[str, tuple[str, bool | None]]]] = []
    ref = res.closed.get(res.reference, {})

    def each(fn) -> dict[str, tuple[str, bool | None]]:
        values = {}
        for gw in res.gateways:
            try:
                values[gw] = fn(gw)
            except (KeyError, TypeError, AttributeError):
                values[gw] = ("–", None)
        return values

    def gateway_cpu(gw: str, c: int) -> float:
        return res.closed[f"{gw} → nginx"][c].cpu_us["gateway"]

    def check(value: float, limit: float, unit: str) -> tuple[str, bool | None]:
        if value is None or math.isnan(value):
            return "–", None
        return (f"{value:.2f} ms" if unit == "ms" else f"{value:.0f} µs"), value <= limit

    out.append(
        (
            f"gateway CPU per request at c=16 ≤ {TARGET_CPU_C16_US:.0f} µs",
            each(lambda gw: check(gateway_cpu(gw, 16), TARGET_CPU_C16_US, "us")),
        )
    )
    if BARE_FORWARD in res.closed:

        def over_floor(gw: str) -> tuple[str, bool | None]:
            r = ratio(res, f"{gw} → nginx", BARE_FORWARD)
            return ("–", None) if r is None else (f"{r:.2f}×", r <= TARGET_FLOOR_RATIO)

        out.append(
            (f"gateway CPU per request at c=16 ≤ {TARGET_FLOOR_RATIO}× the bare forward's (issue 24)", each(over_floor))
        )
    out.append(
        (
            f"gateway CPU per request at c=1 ≤ {TARGET_CPU_C1_US:.0f} µs",
            each(lambda gw: check(gateway_cpu(gw, 1), TARGET_CPU_C1_US, "us")),
        )
    )

    def added_p99(gw: str) -> tuple[str, bool | None]:
        added = res.closed[f"{gw} → nginx"][1].p99 - ref[1].p99
        if added < 0:  # nginx's own tail was the larger: the machine's scheduling, not a result
            return f"{added:.2f} ms (nginx's own p99 {ms(ref[1].p99)} was higher: noise)", None
        return check(added, TARGET_ADDED_P99_C1_MS, "ms")

    out.append((f"added p99 at c=1 ≤ {TARGET_ADDED_P99_C1_MS} ms (over nginx directly)", each(added_p99)))
    out.append(
        (
            f"added p50 at c=1 ≤ {TARGET_ADDED_P50_C1_MS} ms (over nginx directly; issue 24)",
            each(lambda gw: check(res.closed[f"{gw} → nginx"][1].p50 - ref[1].p50, TARGET_ADDED_P50_C1_MS, "ms")),
        )
    )

    def tail(gw: str) -> tuple[str, bool | None]:
        run = res.closed[f"{gw} → nginx"][16]
        ratio = run.p99 / run.p50 if run.p50 else math.nan
        if math.isnan(ratio):
            return "–", None
        return f"{ratio:.1f}× ({ms(run.p99)} / {ms(run.p50)})", ratio <= TARGET_TAIL_RATIO

    out.append((f"p99 at c=16 ≤ {TARGET_TAIL_RATIO:.0f}× its p50", each(tail)))
    sizes = sorted({n for runs in res.prompts.values() for n, _ in runs})
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        for stream in (False, True):

            def big_prompt(gw: str, stream=stream) -> tuple[str, bool | None]:
                diff = _added(res, f"{gw} → nginx", (big, stream)) - _added(res, f"{gw} → nginx", (small, stream))
                return check(diff, TARGET_BIG_PROMPT_MS, "ms")

            out.append(
                (
                    f"{size_label(big)} prompt adds ≤ {TARGET_BIG_PROMPT_MS} ms over {size_label(small)} "
                    f"({'streamed' if stream else 'not streamed'}; added p50 over nginx, difference)",
                    each(big_prompt),
                )
            )
    out.append(
        (
            f"redis-server CPU per request ≤ {TARGET_REDIS_CPU_US:.0f} µs (c=16)",
            each(lambda gw: check(res.closed[f"{gw} → nginx"][16].cpu_us["redis-server"], TARGET_REDIS_CPU_US, "us")),
        )
    )
    return out


def targets_table(res: Results) -> str:
    rows = []
    for text, values in targets(res):
        row = [text]
        for gw in res.gateways:
            measured, met = values.get(gw, ("–", None))
            row.append(
                measured
                if measured.endswith("noise)")
                else f"{measured}: {'met' if met else '**missed**' if met is False else 'not measured'}"
            )
        rows.append(row)
    return table(["target"] + res.gateways, rows)


# ------------------------------------------------------------------------------ the doc


def render(res: Results) -> str:
    m = res.meta
    parts = [
        f"### Latest `make bench` ({m.get('started', '?')}; load average {m.get('load_before', '?')} before, "
        f"{m.get('load_after', '?')} after; {m.get('total_s', '?')} s)",
        "",
        f"{m.get('machine', '')} Load: wrk `-t1`, {m.get('duration', '?')} s per run after a warm-up; "
        f"vegeta at a fixed rate, {m.get('duration', '?')} s per rate. Atlas: 1 worker unless said, the bench key "
        "with every limit kind on the key and its quota. Versions: " + m.get("versions", "") + ".",
        "",
        *([m["note"], ""] if m.get("note") else []),
        "Closed loop (wrk), small chat completion (16 completion tokens). The last columns divide a target's "
        "own CPU per request at c=16 by that of the two floors: nginx as a reverse proxy, and a bare forward "
        "(benchmarks/bare_forward.py) on Atlas's own server and upstream client:",
        "",
        closed_loop_table(res),
        "",
        "Fixed rate, open loop (vegeta), same request:",
        "",
        fixed_rate_table(res),
        "",
        "Prompt size, sequential requests (wrk c=1): p50, in brackets the added p50 over nginx directly, then "
        "the CPU per request of the target's own process (the gateway's, without redis-server):",
        "",
        prompt_table(res),
        "",
    ]
    if res.memory:
        parts += ["Memory (RSS of one gateway process):", "", memory_table(res), ""]
    if res.gateways:
        parts += ["Targets (issue 13):", "", targets_table(res), ""]
    if res.tracing:
        parts += [res.tracing, ""]
    if res.capacity:
        parts += [
            "Long requests held at once through one gateway process with its defaults (benchmarks.capacity; "
            "`BENCH_CAPACITY_N`):",
            "",
            res.capacity,
            "",
        ]
    if res.leases:
        parts += [res.leases, ""]
    for gw, exact in res.exactness.items():
        parts.append(f"Exactness ({gw}): {exact}")
        parts.append("")
    for target, text in res.profiles.items():
        parts += [
            f"Profile of {target} under wrk c=16 (py-spy, `BENCH_PROFILE=1`):",
            "",
            "```",
            text.rstrip(),
            "```",
            "",
        ]
    for gw, flood in res.slow_clients.items():
        parts.append(f"1,000 slow clients ({gw}): {flood.strip().splitlines()[-1].strip()}")
        parts.append("")
    for gw, line in res.token_auth.items():
        parts += [f"Workload identity token vs static key ({gw}): {line}", ""]
    return "\n".join(parts).rstrip() + "\n"


def replace_section(doc: str, section: str, heading: str = "## Results") -> str:
    """``doc`` with the text between BEGIN and END replaced by ``section``; without markers the
    marked section goes right under ``heading`` (or at the end when there is none)."""
    block = f"{BEGIN}\n\n{section.rstrip()}\n\n{END}"
    start, end = doc.find(BEGIN), doc.find(END)
    if start != -1 and end > start:
        return doc[:start] + block + doc[end + len(END) :]
    at = doc.find("\n" + heading + "\n")
    if at == -1:
        return doc.rstrip() + "\n\n" + block + "\n"
    at += len(heading) + 2
    return doc[:at] + "\n" + block + "\n" + doc[at:]

"""Instructions per request of a gateway (or a bare forward), counted by callgrind: the A/B
figure a shared, loaded machine cannot disturb (CPU time per request moves with the other
work on the cores; an instruction count does not).

``python -m benchmarks.instructions BASE_DIR [NEW_DIR]`` (checkouts, as for benchmarks.ab):
each gateway runs under ``valgrind --tool=callgrind`` with the bench key (every limit kind on)
in front of a static nginx; WARM requests warm it up, the counters are zeroed
(``callgrind_control -z``), N requests at concurrency C are sent, and the dump's total is
divided by N. ``BARE=1`` adds the bare forward on Atlas's stack (benchmarks.bare_forward), or
``BARE=server/client,...`` those candidates of it (``SKIP_GATEWAYS=1``: only them).

Environment: N (2,000), WARM (500), C (16), BODY_BYTES (a chat body of that size, as make bench's
prompt-size runs send, instead of the small one), UPSTREAM=mock (the project's mock upstream instead
of nginx: the upstream's own work is not counted either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from atlas_devstack.redis_server import RedisServer

from . import bodies, floor, nginx, tools
from .gateways import HERE_ROOT, GatewaySource
from .keys import BENCH_KEY
from .procs import Proc, free_port, process_tree
from .runs import CHAT


async def _send(url: str, n: int, concurrency: int, headers: dict[str, str]) -> None:
    import aiohttp

    size = int(os.environ.get("BODY_BYTES", "0"))
    body = bodies.encode(bodies.chat(size, False) if size else bodies.SMALL)
    left = [n]

    async def worker(session) -> None:
        while left[0] > 0:
            left[0] -= 1
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def _total(dump: str) -> int:
    with open(dump) as fh:
        for line in fh:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {dump}")


def count(
    name: str,
    args: list[str],
    env: dict[str, str],
    url: str,
    headers: dict[str, str],
    workdir: str,
    cwd: str | None = None,
) -> float:
    """Instructions per request of the server started by ``args`` (its port in ``env``/args)."""
    n, warm, c = int(os.environ.get("N", "2000")), int(os.environ.get("WARM", "500")), int(os.environ.get("C", "16"))
    out = os.path.join(workdir, f"callgrind.{name.replace(' ', '_')}.%p")
    # children too (granian serves from a worker process): each process of the tree is zeroed,
    # dumped and summed
    grind = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        f"--callgrind-out-file={out}",
        "--dump-instr=no",
        *args,
    ]
    with Proc(
        name,
        grind,
        env,
        port=int(env["BENCH_PORT"]),
        log=os.path.join(workdir, f"{name}.log"),
        cwd=cwd,
        start_timeout=300,
    ) as proc:
        asyncio.run(_send(url, warm, c, headers))
        pids = process_tree(proc.pid)
        for pid in pids:
            subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)
        asyncio.run(_send(url, n, c, headers))
        total = 0
        for pid in pids:
            if subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True).returncode != 0:
                continue  # not a process callgrind runs (an exec'd helper)
            dumps = sorted(glob.glob(out.replace("%p", str(pid)) + ".*"), key=os.path.getmtime)
            if dumps:
                total += _total(dumps[-1])
        if not total:
            raise RuntimeError(f"{name}: callgrind dumped nothing")
        return total / n


def main(argv: list[str]) -> int:
    workdir = tempfile.mkdtemp(prefix="atlas-instr-")
    sources = {}
    for name, path in zip(("base", "new"), argv or [str(HERE_ROOT)]):
        root = Path(path).resolve()
        sources[name] = GatewaySource(name, root.parent if (root / "atlas_gateway").is_dir() else root)
    if len(argv) == 1:
        sources["new"] = GatewaySource("new", HERE_ROOT)
    results = {}
    with contextlib.ExitStack() as stack:
        if os.environ.get("UPSTREAM") == "mock":
            from atlas_devstack.mock_upstream import MockUpstreamProcess

            static = stack.enter_context(MockUpstreamProcess())
            upstream_root, json_base, prefix = static.url, static.url, ""
        else:
            static = stack.enter_context(nginx.static_upstream(tools.debian_only().nginx, workdir))
            upstream_root, json_base, prefix = static.url, static.url + nginx.JSON_BASE, nginx.JSON_BASE
        bare = os.environ.get("BARE", "")
        for cand in ["atlas/aiohttp"] if bare == "1" else [c for c in bare.split(",") if c]:
            server, client = cand.split("/")
            port = free_port()
            results[f"bare forward {cand}"] = count(
                f"bare-{server}-{client}",
                floor.bare_forward_command(server, client, upstream_root, str(port)),
                {"BENCH_PORT": str(port), "PYTHONPATH": str(HERE_ROOT)},
                f"http://127.0.0.1:{port}{prefix}{CHAT}",
                {},
                workdir,
                cwd=str(HERE_ROOT),
            )
            print(f"bare forward {cand}: {results[f'bare forward {cand}']:,.0f} instructions per request", flush=True)
        for name, src in ({} if os.environ.get("SKIP_GATEWAYS") == "1" else sources).items():
            rs = stack.enter_context(RedisServer())
            src.write_bench_key(rs.url)
            port = free_port()
            env = {
                "PYTHONPATH": src.pythonpath,
                "ATLAS_REDIS_URL": rs.url,
                "ATLAS_UPSTREAM_URL": json_base,
                "ATLAS_LOG_LEVEL": "warning",
                "ATLAS_PORT": str(port),
                "ATLAS_HOST": "127.0.0.1",
                "BENCH_PORT": str(port),
            }
            results[name] = count(
                name,
                [sys.executable, "-m", "atlas_gateway"],
                env,
                f"http://127.0.0.1:{port}{CHAT}",
                {"Authorization": f"Bearer {BENCH_KEY}"},
                workdir,
                cwd=str(src.root),
            )
            print(f"{name} ({src.root}): {results[name]:,.0f} instructions per request", flush=True)
    if "base" in results and "new" in results:
        print(f"new / base: {results['new'] / results['base']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The Atlas gateways under test: this checkout's, and any other checkout's named in
``BENCH_GATEWAY_SRC`` (comma-separated paths, e.g. ``/work/main`` for a "before" run), each
run from its own source tree in the same bench run, against the same upstreams and load.

A gateway of another checkout runs with that checkout's ``gateway/`` and ``core/`` first on
PYTHONPATH (ahead of this venv's editable install), and the helpers that write its keys or read
its counters (benchmarks.keys, benchmarks.exactness) run the same way, so each side uses its
own Redis contract. The other checkout must need no package this venv lacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import Proc, free_port

HERE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class GatewaySource:
    label: str
    root: Path

    @property
    def pythonpath(self) -> str:
        # the bench's own package last: only benchmarks.* comes from it
        return os.pathsep.join([str(self.root / "gateway"), str(self.root / "core"), str(HERE_ROOT)])

    def run_helper(self, module: str, *args: str) -> str:
        """``python -m benchmarks.<module> args`` in this gateway's import path; its stdout."""
        env = {**os.environ, "PYTHONPATH": self.pythonpath}
        done = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", *args],
            env=env,
            cwd=str(HERE_ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"benchmarks.{module} for {self.label} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def write_bench_key(self, redis_url: str) -> int | None:
        """Write the bench key with this gateway's contract; the pid of the redis-server that
        holds its counters."""
        return json.loads(self.run_helper("keys", redis_url).strip().splitlines()[-1])["redis_pid"]

    def exactness(self, gateway_url: str, redis_url: str) -> dict:
        return json.loads(self.run_helper("exactness", gateway_url, redis_url).strip().splitlines()[-1])

    def start(
        self, redis_url: str, upstream_url: str, workdir: str, models: dict[str, str] | None = None, **extra: str
    ) -> Proc:
        port = free_port()
        env = {
            "PYTHONPATH": self.pythonpath,
            "ATLAS_REDIS_URL": redis_url,
            "ATLAS_UPSTREAM_URL": upstream_url,
            "ATLAS_LOG_LEVEL": "warning",
            "ATLAS_PORT": str(port),
            "ATLAS_HOST": "127.0.0.1",
            **extra,
        }
        if models:
            env["ATLAS_UPSTREAM_MODELS"] = json.dumps(models)
        log = os.path.join(workdir, f"gateway-{self.label.replace(' ', '_').replace('/', '_')}-{port}.log")
        return Proc(self.label, [sys.executable, "-m", "atlas_gateway"], env, port=port, log=log, cwd=str(self.root))


def _git_label(root: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "gateway", "core"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return root.name
    return (rev or root.name) + ("+changes" if dirty else "")


def sources(env: dict[str, str] | None = None) -> list[GatewaySource]:
    """The other checkouts first (the "before"), this checkout's gateway last, unless
    ``BENCH_SKIP_SELF=1`` (then only the others)."""
    env = os.environ if env is None else env
    out = []
    for raw in filter(None, (p.strip() for p in env.get("BENCH_GATEWAY_SRC", "").split(","))):
        root = Path(raw).expanduser().resolve()
        if not (root / "gateway" / "atlas_gateway").is_dir():
            raise SystemExit(f"BENCH_GATEWAY_SRC={raw}: no gateway/atlas_gateway in that checkout")
        out.append(GatewaySource(f"Atlas {_git_label(root)}", root))
    if env.get("BENCH_SKIP_SELF") != "1" or not out:
        out.append(GatewaySource(f"Atlas {_git_label(HERE_ROOT)}", HERE_ROOT))
    labels = [s.label for s in out]
    for i, s in enumerate(out):  # two checkouts at the same commit: tell them apart by folder
        if labels.count(s.label) > 1:
            out[i] = GatewaySource(f"{s.label} ({s.root})", s.root)
    return out

"""Where the bench's external programs are: wrk and nginx from Debian's packages
(hack/system-deps.sh bench), vegeta, LiteLLM and py-spy built or installed once per pinned
version into the tools cache by hack/tools/bench-tools.sh (run here, so that ``make bench``
on a fresh machine does it itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Tools:
    wrk: str
    nginx: str
    vegeta: str
    litellm: str | None  # None: BENCH_SKIP_LITELLM=1
    py_spy: str | None  # None: no profile asked for


def parse_tool_lines(out: str) -> dict[str, str]:
    """``KEY=path`` lines printed by bench-tools.sh -> {KEY: path}; other lines are ignored."""
    found = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.isupper() and value.startswith("/"):
            found[key] = value
    return found


def _debian_binary(name: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-root PATH may lack
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def debian_only() -> Tools:
    """wrk and nginx alone (benchmarks.floor and benchmarks.instructions need nothing else)."""
    missing = [n for n in ("wrk", "nginx") if not _debian_binary(n)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: run `bash hack/system-deps.sh bench`")
    return Tools(wrk=_debian_binary("wrk"), nginx=_debian_binary("nginx"), vegeta="", litellm=None, py_spy=None)


def ensure(profile: bool, litellm: bool) -> Tools:
    missing = [n for n in ("wrk", "nginx") if not _debian_binary(n)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: run `bash hack/system-deps.sh bench` (make bench does)")
    env = {**os.environ, "BENCH_SKIP_LITELLM": "0" if litellm else "1"}
    args = ["bash", str(ROOT / "hack" / "tools" / "bench-tools.sh")] + (["profile"] if profile else [])
    # the build's progress goes to stderr (shown); the paths come back on stdout
    done = subprocess.run(args, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"hack/tools/bench-tools.sh failed with {done.returncode}")
    paths = parse_tool_lines(done.stdout)
    return Tools(
        wrk=_debian_binary("wrk"),
        nginx=_debian_binary("nginx"),
        vegeta=paths["VEGETA"],
        litellm=paths.get("LITELLM") if litellm else None,
        py_spy=paths.get("PY_SPY") if profile else None,
    )

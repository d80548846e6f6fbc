"""Where the gateway's CPU goes (``BENCH_PROFILE=1``): py-spy samples the gateway process while
wrk drives it at concurrency 16, and the collapsed stacks are summed per function: by own time
(the function on top of the stack, libraries included; the event loop's own C code shows as
``Runner.run``) and by total time for Atlas's own functions (anywhere on the stack)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter

# "frame;frame;frame 123": py-spy's raw (collapsed) format, one stack per line, root first
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# a frame: "function (file.py:line)" or, with --idle off and native frames, bare names
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


PROJECT_PATHS = ("atlas_gateway/", "atlas_core/")


def is_project(frame: str) -> bool:
    """A function of Atlas's, not its entry point (``<module>``/``main`` of __main__.py, on every
    stack of the main thread and so no news)."""
    m = _FRAME.match(frame.strip())
    if not m or m.group("file").endswith("__main__.py"):
        return False
    return any(p in m.group("file") for p in PROJECT_PATHS)


def frame_name(frame: str) -> str:
    """``send (uvicorn/protocols/http/httptools_impl.py:123)`` -> ``send (httptools_impl.py)``:
    the same function at different lines counts once."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('func')} ({m.group('file').rsplit('/', 1)[-1]})"


def top_functions(collapsed: str, limit: int = 20) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, [(function, own samples)], [(function, total samples)]), largest first."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m.group("count"))
        # --subprocesses puts a "process N:cmdline" frame at the root: not a function
        raw = [f for f in m.group("stack").split(";") if f and not f.startswith("process ")]
        if not raw:
            continue
        samples += count
        own[frame_name(raw[-1])] += count
        for name in {frame_name(f) for f in raw if is_project(f)}:
            total[name] += count
    return samples, own.most_common(limit), total.most_common(limit)


def record(py_spy: str, pid: int, seconds: int, out_path: str) -> subprocess.Popen:
    """Start sampling ``pid`` (and its worker processes) for ``seconds``; wait() on the result."""
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--nonblocking",
            "--subprocesses",
            "--format",
            "raw",
            "--output",
            out_path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def report(collapsed: str, limit: int = 20) -> str:
    samples, own, total = top_functions(collapsed, limit)
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples; own time (top of stack):"]
    lines += [f"    {100 * n / samples:5.1f} %  {name}" for name, n in own]
    lines.append("  total time of Atlas's functions (anywhere on the stack):")
    lines += [f"    {100 * n / samples:5.1f} %  {name}" for name, n in total]
    return "\n".join(lines)

"""Server processes of the bench (gateway, mock, nginx, LiteLLM) and what /proc says about them.

A :class:`Proc` is started in its own session on a free loopback port, waited for on a health
URL (a condition with a deadline, never a sleep), and stopped with its whole process group
(uvicorn workers, nginx workers), so a bench leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from typing import Sequence

from atlas_devstack.redis_server import free_port
from atlas_devstack.waiting import wait_for

__all__ = ["Proc", "free_port", "wait_http", "cpu_seconds", "rss_kb", "ProcError"]


class ProcError(RuntimeError):
    """A bench server did not come up (its log's last lines are in the message)."""


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers 2xx; ProcError at once if ``proc`` exits, or at the deadline."""

    def answers() -> bool:
        with urllib.request.urlopen(url, timeout=1.0):
            return True

    def exited() -> str | None:
        return f"{url}: process exited with {proc.returncode}" if proc is not None and proc.poll() is not None else None

    wait_for(f"{url} to answer", answers, timeout, interval=0.05, failed=exited, retry=(OSError,), error=ProcError)


class Proc:
    """A command run as a server on ``port`` (``{port}`` in its args is replaced), stopped on exit.

    Output goes to ``log`` (a file path) so that a failing start can say why."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        health: str = "/healthz",
        port: int | None = None,
        log: str | None = None,
        cwd: str | None = None,
        start_timeout: float = 30.0,
        unset: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
        self.health = health
        self.log = log or os.devnull
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> "Proc":
        out = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        try:
            wait_http(self.url + self.health, timeout=self.start_timeout, proc=self.proc)
        except ProcError as exc:
            self.__exit__(None, None, None)
            raise ProcError(f"{self.name} did not start: {exc}\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as fh:
                return b"".join(fh.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # the whole group: uvicorn's and nginx's workers are children of the pid we hold
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def parse_stat_cpu_ticks(stat_line: str) -> int:
    """utime + stime (clock ticks) from one /proc/<pid>/stat line."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def parse_stat_ppid(stat_line: str) -> int:
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def _read_stat(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's workers, nginx's, LiteLLM's), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            line = _read_stat(int(entry))
            if line:
                try:
                    parents.setdefault(parse_stat_ppid(line), []).append(int(entry))
                except (IndexError, ValueError):
                    pass
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its live descendants, from /proc/<pid>/stat.

    Sampled before and after a load run: the difference divided by the requests served is the
    CPU per request, a figure that barely depends on what else the machine is doing (unlike
    latency). Children that exit in between are not counted: bench servers keep theirs."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        line = _read_stat(p)
        if line:
            try:
                total += parse_stat_cpu_ticks(line)
            except (IndexError, ValueError):
                pass
    return total / tick


def rss_kb(pid: int) -> int:
    """Resident set of a process and its descendants in KiB (VmRSS of /proc/<pid>/status)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def per_request_us(cpu_before: float, cpu_after: float, requests: float) -> float:
    """CPU microseconds per request between two :func:`cpu_seconds` samples."""
    return (cpu_after - cpu_before) / max(1.0, requests) * 1e6

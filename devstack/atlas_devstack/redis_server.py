"""A real ``redis-server`` on a free loopback port, for tests, benchmarks and the dev stack.

Ephemeral mode (``dir=None``): a temporary directory, no RDB/AOF (``--save "" --appendonly no``),
removed on stop. Persistent mode (``dir=...``): RDB snapshots in that directory and a pidfile
there, so the dev stack can stop a Redis that an earlier ``make dev-up`` started.

Alone: ``python -m atlas_devstack.redis_server [--dir DIR] [--port N]`` prints
``export REDIS_URL=...`` once Redis answers and runs in the foreground until SIGTERM, SIGINT
or SIGHUP (Redis is stopped, exit 128+N) or until redis-server exits by itself (exit 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from . import processes
from .waiting import wait_for


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


class RedisServer:
    """Context manager around one ``redis-server`` process bound to 127.0.0.1.

    ``stop()`` followed by ``start()`` reuses the same port, which lets tests kill Redis and
    bring it back at the same address (the gateway must recover by itself).
    """

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        *,
        start_timeout: float = 10.0,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.persistent = dir is not None
        self.dir = Path(dir) if dir is not None else None
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.password = password  # --requirepass: clients must AUTH
        self.extra_args = tuple(extra_args)  # more redis-server options (e.g. cluster mode)
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def pidfile(self) -> Path | None:
        return self.dir / "redis.pid" if self.dir else None

    @property
    def logfile(self) -> Path:
        base = self.dir if self.dir else Path(self._tmpdir or tempfile.gettempdir())
        return base / "redis.log"

    # ------------------------------------------------------------------ lifecycle
    def _command(self, workdir: Path) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server not found: install it (make system-deps)")
        cmd = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(workdir),
            "--logfile",
            str(self.logfile),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        cmd += self.extra_args
        if self.persistent:
            cmd += ["--pidfile", str(self.pidfile), "--appendonly", "no", "--save", "60 1"]
        else:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd

    def start(self) -> "RedisServer":
        if self._proc is not None and self._proc.poll() is None:
            return self
        if self.persistent:
            assert self.dir is not None
            self.dir.mkdir(parents=True, exist_ok=True)
            workdir = self.dir
        else:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="atlas-redis-")
            workdir = Path(self._tmpdir)
        command = self._command(workdir)
        with processes.signals_held():  # recorded before a signal can land
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal must not reach it before we stop it
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        proc = self._proc

        def exited() -> str | None:
            if proc is not None and proc.poll() is not None:
                return f"redis-server exited with {proc.returncode} (see {self.logfile})"
            return None

        try:
            wait_for(
                f"redis-server on port {self.port}", self.ping, self.start_timeout, failed=exited, error=RuntimeError
            )
        except RuntimeError:
            if exited() is None:
                self.stop()
            raise

    def ping(self) -> bool:
        """One PING over a plain socket: redis-py would retry with back-off for seconds."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(b"AUTH %s\r\n" % self.password.encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The redis-server child while it runs (for processes.wait_any())."""
        return self._proc

    def stop(self, timeout: float = 10.0) -> None:
        with processes.signals_held():  # a second Ctrl-C must not cut the stop short
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stalled (paused) Redis cannot act on SIGTERM
            processes.stop_process(proc, timeout)  # SIGTERM: redis saves (persistent mode) and exits

    def pause(self) -> None:
        """Stall Redis (SIGSTOP): connections stay open, commands queue unanswered."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """End a stall (SIGCONT): Redis runs what queued up meanwhile."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Simulate a crash (SIGKILL): nothing is saved."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ------------------------------------------------------------------ persistent mode
    @staticmethod
    def stop_pidfile(pidfile: str | os.PathLike[str], timeout: float = 10.0) -> bool:
        """Stop a persistent Redis started earlier (maybe by another process) via its pidfile."""
        path = Path(pidfile)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return False
        # Only a pid that still runs redis-server (pids get reused).
        stopped = "redis-server" in processes.pid_cmdline(pid) and processes.terminate(pid, timeout)
        path.unlink(missing_ok=True)
        return stopped

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlas_devstack.redis_server", description="A redis-server on 127.0.0.1, in the foreground."
    )
    parser.add_argument(
        "--dir", help="keep RDB snapshots and a pidfile here (default: a temporary dir, removed on exit)"
    )
    parser.add_argument("--port", type=int, help="default: a free port")
    args = parser.parse_args(argv)

    def body(on_exit: processes.OnExit) -> int:
        server = RedisServer(dir=args.dir, port=args.port)
        on_exit(server.cleanup)
        server.start()
        print(f"export REDIS_URL={server.url}", flush=True)
        assert server.process is not None
        _, code = processes.wait_any({"redis-server": server.process})
        try:  # the log of an ephemeral Redis goes with its temporary dir: show its end now
            tail = "\n".join(server.logfile.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            tail = "(no log)"
        raise processes.ChildExited("redis-server", code, f"log {server.logfile}:\n{tail}")

    return processes.run("redis", body, errors=(FileNotFoundError, RuntimeError, TimeoutError))


if __name__ == "__main__":
    sys.exit(main())

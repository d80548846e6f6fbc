"""Child processes of the dev stack: start them, watch them, stop them. Every entry point
(``python -m atlas_devstack up|down``, ``.controlplane``, ``.redis_server``, ``.mock_upstream``)
and the test fixtures use these helpers, so a signal or a failure is handled the same way
everywhere.

An entry point looks like this (a new component only has to follow the same three rules):

    from atlas_devstack import processes

    def main() -> int:
        def body(on_exit: processes.OnExit) -> int:
            server = Thing()
            on_exit(server.stop)            # 1. register the stop BEFORE starting
            server.start()                  # 2. children started inside processes.signals_held()
            print("ready", flush=True)
            name, code = processes.wait_any(server.processes)   # 3. foreground: block
            raise processes.ChildExited(name, code)
        return processes.run("thing", body)

``run`` turns SIGTERM, SIGINT and SIGHUP into a ``processes.Interrupted`` exception raised
where the main thread is (a wait, a poll loop, a start-up step), so ``try/finally`` and
``except BaseException`` clean-ups run. Then it runs the ``on_exit`` callbacks (last
registered first) with signals held, so a second Ctrl-C cannot cut a stop short (each stop
has its own deadline: SIGTERM, then SIGKILL). Exit status: 0, 1 on a failure (a child that
exited, an exception), 128+N on signal N, as a shell reports it.

Why a spawn must be wrapped in ``signals_held()``: a signal landing between ``fork`` and the
line that records the child would raise before anyone knows the child's pid, and nothing
would ever stop it. Inside ``signals_held()`` the signal waits until the child is recorded.
Outside ``run`` (library use, tests) ``signals_held()`` costs nothing and changes nothing.

Children are started in their own session (``start_new_session=True``): a Ctrl-C typed at a
terminal reaches only the entry point, which then stops the children in order (the control
plane's kube-apiserver before its etcd) instead of all of them dying at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .waiting import WaitTimeout, wait_for

POLL_INTERVAL = 0.05  # seconds between checks while waiting for a process to go
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

OnExit = Callable[..., None]  # on_exit(fn, *args): call fn(*args) when the entry point ends


class Interrupted(BaseException):
    """A stop signal arrived (BaseException, like KeyboardInterrupt: `except Exception` in
    library code must not swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class ChildExited(RuntimeError):
    """A child the entry point depends on exited on its own."""

    def __init__(self, name: str, returncode: int | None, detail: str = "") -> None:
        self.name, self.returncode, self.detail = name, returncode, detail
        how = (
            f"was killed by {signal.Signals(-returncode).name}"
            if returncode is not None and returncode < 0
            else f"exited with {returncode}"
        )
        super().__init__(f"{name} {how}")


# --------------------------------------------------------------------------- signals


class _SignalState:
    installed = False
    stopping = False  # a stop is under way: later signals are ignored
    held = 0  # depth of signals_held() sections
    pending: int | None = None


_state = _SignalState()


def _on_signal(signum: int, frame: object) -> None:
    if _state.stopping:
        return
    if _state.held:
        _state.pending = signum
        return
    _state.stopping = True
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A signal arriving inside is delivered (raised) at the end of the section, not in it.

    For the few lines that start a child and record its pid, and for a stop that must run to
    its end. Nestable."""
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1
        if not _state.held and _state.pending is not None and not _state.stopping:
            signum, _state.pending = _state.pending, None
            _state.stopping = True
            raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[OnExit]:
    """Install the handlers; yield ``on_exit``; on the way out (normal return, exception or
    signal) run the registered callbacks last-first with every signal ignored, then restore
    the previous handlers. SIGHUP is left alone when it is ignored (``nohup``)."""
    if _state.installed:
        raise RuntimeError("stop_on_signals() is already active in this process")
    callbacks: list[tuple[Callable[..., None], tuple]] = []

    def on_exit(fn: Callable[..., None], *args: object) -> None:
        callbacks.append((fn, args))

    previous = {}
    for sig in HANDLED_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, _on_signal)
    _state.installed, _state.stopping, _state.held, _state.pending = True, False, 0, None
    try:
        yield on_exit
    finally:
        _state.stopping = True
        try:
            for fn, args in reversed(callbacks):
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - the other stops must still run
                    traceback.print_exc()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _state.installed, _state.stopping, _state.held, _state.pending = False, False, 0, None


def run(name: str, body: Callable[[OnExit], int | None], *, errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run an entry point's ``body(on_exit)`` under ``stop_on_signals``; return its exit code.

    ``errors``: exception types whose message is enough (no traceback), e.g. a start-up
    timeout. A child that exited and any other exception give 1, a signal 128+N."""
    try:
        with stop_on_signals() as on_exit:
            return body(on_exit) or 0
    except Interrupted as exc:
        _say(f"[{name}] {exc}: stopped")
        return exc.exit_code
    except ChildExited as exc:
        _say(f"[{name}] {exc}: stopped the rest" + (f"\n{exc.detail}" if exc.detail else ""))
        return 1
    except errors as exc:
        _say(f"[{name}] failed: {exc}")
        return 1
    except Exception:  # noqa: BLE001 - reported with its traceback
        traceback.print_exc()
        _say(f"[{name}] failed: stopped what it had started")
        return 1


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- waiting


def wait_any(procs: Mapping[str, subprocess.Popen]) -> tuple[str, int]:
    """Block until one of ``procs`` exits; return (its name, its return code).

    Sleeps in the kernel (pidfds), not in a poll loop; a signal interrupts it (inside ``run``
    that raises ``Interrupted``)."""
    if not procs:
        raise ValueError("wait_any() needs at least one process")
    fds: dict[int, str] = {}
    try:
        for name, proc in procs.items():
            if proc.poll() is not None:
                return name, proc.returncode
            fds[os.pidfd_open(proc.pid)] = name  # readable once the process has exited
        while True:
            ready, _, _ = select.select(list(fds), [], [])
            if ready:
                name = fds[ready[0]]
                return name, procs[name].wait()
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------- inspecting pids


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def pid_cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when gone): pidfiles are checked against it before a
    signal is sent, so a recycled pid never gets killed by mistake."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- stopping


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child (else a zombie lingers)
    except ChildProcessError:
        pass
    return not pid_alive(pid)


def _wait_gone(pid: int, timeout: float) -> bool:
    try:
        return wait_for(f"process {pid} to exit", lambda: _gone(pid), timeout, interval=POLL_INTERVAL)
    except WaitTimeout:
        return False


def terminate(pid: int, timeout: float = 10.0, *, group: bool = False) -> bool:
    """SIGTERM ``pid`` (its whole process group with ``group=True``), SIGKILL it if it is still
    there after ``timeout`` seconds; returns False when it was already gone. Works for any
    process (e.g. one found by pidfile), not only our own children."""
    send = os.killpg if group else os.kill
    try:
        send(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if not _wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            send(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    elif group:
        with contextlib.suppress(ProcessLookupError):  # the leader went; its group must too
            os.killpg(pid, signal.SIGKILL)
    return True


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a child we started, SIGKILL it if it is still there at the deadline."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def stop_group(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL whatever is left at the deadline."""
    terminate(pid, timeout, group=True)


class ServerProcess:
    """A devstack HTTP server (``python -m <MODULE>``) as a child process on a loopback port,
    started when its ``/healthz`` answers 200: the mock and the strict upstream share this.
    Subclasses set ``MODULE``, ``LABEL`` and, in ``__init__``, ``port``, ``args``, ``log_path``."""

    MODULE = ""
    LABEL = ""
    HOST_ARGS: tuple[str, ...] = ()  # what the module needs to listen on 127.0.0.1

    port: int
    args: list[str]
    log_path: str | None = None
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0):
        import urllib.request

        # the child holds its own descriptor of the log: the parent's is closed once it started
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.MODULE, *self.HOST_ARGS, "--port", str(self.port), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        proc = self._proc

        def healthy() -> bool:
            with urllib.request.urlopen(self.url + "/healthz", timeout=0.5) as resp:
                return resp.status == 200

        try:
            wait_for(
                f"{self.LABEL} /healthz",
                healthy,
                timeout,
                retry=(OSError,),
                error=RuntimeError,
                failed=lambda: f"{self.LABEL} exited with {proc.returncode}" if proc.poll() is not None else None,
            )
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

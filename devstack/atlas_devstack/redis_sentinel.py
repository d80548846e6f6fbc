"""A real Redis Sentinel deployment on loopback, for tests: one master, replicas, sentinels.

Every process is a plain ``redis-server`` (sentinel mode is ``redis-server <conf> --sentinel``,
which is all Debian's redis-sentinel package adds), each on a free 127.0.0.1 port. Sentinels are
tuned for tests (a master is down after ``down_after_ms``, default 1 s), not for production.

    with SentinelGroup(replicas=2, sentinels=3) as group:
        group.url                 # redis+sentinel://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/atlas
        group.kill_master()       # SIGKILL; the sentinels promote a replica
        group.wait_for_new_master(old_port)
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from .redis_server import RedisServer
from .waiting import wait_for


class ReplicaServer(RedisServer):
    """A redis-server that starts as a replica of ``master_port``."""

    def __init__(self, master_port: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.master_port = master_port

    def _command(self, workdir: Path) -> list[str]:
        cmd = super()._command(workdir) + ["--replicaof", "127.0.0.1", str(self.master_port)]
        if self.password:
            cmd += ["--masterauth", self.password]
        return cmd


class SentinelServer(RedisServer):
    """``redis-server sentinel.conf --sentinel`` monitoring one master (conf rewritten by it)."""

    def __init__(
        self,
        master_name: str,
        master_port: int,
        quorum: int,
        *,
        down_after_ms: int,
        master_password: str | None = None,
        sentinel_password: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(password=sentinel_password, **kwargs)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.master_password = master_password

    def _command(self, workdir: Path) -> list[str]:
        conf = workdir / "sentinel.conf"
        if not conf.exists():  # a restart keeps what the sentinel learned (it rewrites the file)
            lines = [
                "bind 127.0.0.1",
                f"port {self.port}",
                f"dir {workdir}",
                f"logfile {self.logfile}",
                "daemonize no",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {max(3000, 3 * self.down_after_ms)}",
                f"sentinel parallel-syncs {self.master_name} 1",
            ]
            if self.master_password:
                lines.append(f"sentinel auth-pass {self.master_name} {self.master_password}")
            if self.password:
                lines.append(f"requirepass {self.password}")
            conf.write_text("\n".join(lines) + "\n")
        return [super()._command(workdir)[0], str(conf), "--sentinel"]


def _command(port: int, *args: str, password: str | None = None, timeout: float = 1.0):
    """One command over a plain socket (RESP), reply parsed by hiredis; None when unreachable."""
    import hiredis

    def pack(parts):
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    reader = hiredis.Reader()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            if password:
                sock.sendall(pack([b"AUTH", password.encode()]))
            sock.sendall(pack([a.encode() for a in args]))
            replies: list[object] = []
            while len(replies) < (2 if password else 1):
                data = sock.recv(65536)
                if not data:
                    return None
                reader.feed(data)
                while (value := reader.gets()) is not False:
                    replies.append(value)
            return replies[-1]
    except OSError:
        return None


class SentinelGroup:
    def __init__(
        self,
        replicas: int = 2,
        sentinels: int = 3,
        *,
        master_name: str = "atlas",
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 1000,
        start_timeout: float = 20.0,
    ) -> None:
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.start_timeout = start_timeout
        self.master = RedisServer(password=password)
        self.replicas = [ReplicaServer(self.master.port, password=password) for _ in range(replicas)]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            SentinelServer(
                master_name,
                self.master.port,
                quorum,
                down_after_ms=down_after_ms,
                master_password=password,
                sentinel_password=sentinel_password,
            )
            for _ in range(sentinels)
        ]
        self.data_nodes = [self.master, *self.replicas]

    # ------------------------------------------------------------------ addresses
    def url(self, db: int = 0, *, tls: bool = False) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis{'s' if tls else ''}+sentinel://{auth}{hosts}/{self.master_name}/{db}{query}"

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels name it (None: no agreement yet)."""
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            reply = _command(
                sentinel.port, "SENTINEL", "get-master-addr-by-name", self.master_name, password=self.sentinel_password
            )
            if isinstance(reply, list) and len(reply) == 2:
                port = int(reply[1])
                votes[port] = votes.get(port, 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best and best[1] > len(self.sentinels) // 2 else None

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.data_nodes if n.port == port)

    def role(self, port: int) -> bytes | None:
        reply = _command(port, "ROLE", password=self.password)
        return reply[0] if isinstance(reply, list) and reply else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SentinelGroup":
        self.master.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait("replicas in sync", lambda: all(self._replica_synced(r.port) for r in self.replicas))
        # every sentinel has found the replicas and the other sentinels (else no quorum to fail over)
        self.wait("sentinels to discover each other and the replicas", self._sentinels_know_everyone)
        return self

    def _replica_synced(self, port: int) -> bool:
        reply = _command(port, "ROLE", password=self.password)
        return isinstance(reply, list) and reply[0] == b"slave" and reply[3] == b"connected"

    def _sentinels_know_everyone(self) -> bool:
        for sentinel in self.sentinels:
            reply = _command(sentinel.port, "SENTINEL", "master", self.master_name, password=self.sentinel_password)
            if not isinstance(reply, list):
                return False
            info = dict(zip(reply[::2], reply[1::2]))
            if (
                int(info.get(b"num-slaves", 0)) < len(self.replicas)
                or int(info.get(b"num-other-sentinels", 0)) < len(self.sentinels) - 1
            ):
                return False
        return True

    def wait(self, what: str, condition: Callable[[], object], timeout: float | None = None) -> None:
        """Until ``condition`` holds (the group's start-up timeout unless given)."""
        wait_for(what, condition, timeout or self.start_timeout, interval=0.05, error=TimeoutError)

    def kill_master(self) -> int:
        """SIGKILL the current master (a crash: nothing saved); returns its port."""
        port = self.master_port()
        assert port is not None, "no master agreed on by the sentinels"
        self.node(port).kill()
        return port

    def wait_for_new_master(self, old_port: int, timeout: float = 30.0) -> int:
        """Until a majority of sentinels names another master and that node reports ROLE master."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port or self.role(port) != b"master":
                return False
            found.append(port)
            return True

        self.wait("a replica to be promoted", promoted, timeout)
        return found[-1]

    def stop(self) -> None:
        for server in [*self.sentinels, *self.data_nodes]:
            server.cleanup()

    def __enter__(self) -> "SentinelGroup":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

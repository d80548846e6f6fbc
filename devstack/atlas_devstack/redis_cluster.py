"""A real Redis Cluster on loopback: ``masters`` redis-servers with ``--cluster-enabled yes``,
each with ``replicas`` replicas, joined by ``redis-cli --cluster create``. For the integration
and e2e tiers, benchmarks and ``REDIS_URL=... make dev-up``.

Readiness is a condition, not a delay: every node reports ``cluster_state:ok`` with all 16384
slots assigned and knows every other node, and every replica's link to its master is up.
``kill_master_of(slot)`` SIGKILLs the master serving a slot and ``wait_promoted`` waits for its
replica to take over (automatic failover after ``cluster-node-timeout``; ``force=True`` asks the
replica for ``CLUSTER FAILOVER TAKEOVER`` to skip the wait).

Alone: ``python -m atlas_devstack.redis_cluster`` prints ``export REDIS_URL=...`` and
``export ATLAS_REDIS_CLUSTER=true`` once the cluster is ok and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from . import processes
from .redis_server import RedisServer, free_port
from .waiting import wait_for


def sync_client(url: str):
    """redis-py for ``url`` (tests, bench): a RedisCluster when the server runs in cluster mode."""
    import redis

    probe = redis.Redis.from_url(url)
    try:
        on_cluster = bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    finally:
        probe.close()
    return redis.RedisCluster.from_url(url) if on_cluster else redis.Redis.from_url(url)


@dataclass
class NodeInfo:
    port: int
    node_id: str
    master: bool
    master_id: str | None  # a replica's master
    slots: list[tuple[int, int]]


def _command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command over a plain socket (inline protocol), the reply as text: only for commands
    answering a status, an integer or one bulk string (CLUSTER INFO/NODES, INFO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(head[1:]) + 2:
                    data = rest[: int(head[1:])]
                    break
    return data.decode(errors="replace")


def _free_port_pair() -> tuple[int, int]:
    """A client port and a cluster-bus port, both free a moment ago."""
    return free_port(), free_port()


class RedisCluster:
    def __init__(
        self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000, start_timeout: float = 30.0
    ) -> None:
        self.masters_wanted = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.start_timeout = start_timeout
        self.servers: dict[int, RedisServer] = {}

    @property
    def url(self) -> str:
        """A seed URL (any node will do: clients read the topology from it)."""
        return f"redis://127.0.0.1:{self.seed_port}/0"

    @property
    def seed_port(self) -> int:
        for port, server in self.servers.items():
            if server.ping():
                return port
        return next(iter(self.servers))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "RedisCluster":
        total = self.masters_wanted * (1 + self.replicas_per_master)
        try:
            for _ in range(total):
                port, bus = _free_port_pair()
                server = RedisServer(
                    port=port,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        str(bus),
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(self.node_timeout_ms),
                        # a replica takes over however long its link was down (tests kill masters)
                        "--cluster-replica-validity-factor",
                        "0",
                    ),
                )
                self.servers[port] = server.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise FileNotFoundError("redis-cli not found: install redis-tools (make system-deps)")
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.servers),
                    "--cluster-replicas",
                    str(self.replicas_per_master),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=self.start_timeout,
            )
            self.wait_ok(self.start_timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node: cluster_state:ok, all slots served, every node known; replicas synced."""
        wait_for("the Redis Cluster to reach cluster_state:ok", self._ok, timeout, interval=0.05, error=TimeoutError)

    def _ok(self) -> bool:
        live = [p for p, s in self.servers.items() if s.pid is not None]
        try:
            for port in live:
                info = _command(port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
                if f"cluster_known_nodes:{len(self.servers)}" not in info:
                    return False
            for node in self.nodes():
                if not node.master and node.port in live:
                    if "master_link_status:up" not in _command(node.port, "INFO", "replication"):
                        return False
        except (OSError, ValueError):
            return False
        return True

    def nodes(self) -> list[NodeInfo]:
        """The topology as a live node sees it (CLUSTER NODES); failed nodes left out."""
        for port in self.servers:
            if self.servers[port].pid is None:
                continue
            try:
                text = _command(port, "CLUSTER", "NODES")
            except OSError:
                continue
            out = []
            for line in text.strip().splitlines():
                fields = line.split()
                flags = fields[2].split(",")
                if "fail" in flags or "noaddr" in flags:
                    continue
                node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                slots = []
                for item in fields[8:]:
                    if item.startswith("["):
                        continue  # a slot in migration
                    lo, _, hi = item.partition("-")
                    slots.append((int(lo), int(hi or lo)))
                out.append(
                    NodeInfo(node_port, fields[0], "master" in flags, None if fields[3] == "-" else fields[3], slots)
                )
            return out
        return []

    def master_of(self, slot: int) -> NodeInfo:
        for node in self.nodes():
            if node.master and any(lo <= slot <= hi for lo, hi in node.slots):
                return node
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: NodeInfo) -> NodeInfo:
        for node in self.nodes():
            if not node.master and node.master_id == master.node_id:
                return node
        raise LookupError(f"master {master.port} has no replica")

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash: nothing saved, connections reset)."""
        self.servers[port].kill()

    def kill_master_of(self, slot: int) -> tuple[NodeInfo, NodeInfo]:
        """Crash the master serving ``slot``; returns (that master, its replica)."""
        master = self.master_of(slot)
        replica = self.replica_of(master)
        self.kill(master.port)
        return master, replica

    def wait_promoted(self, replica: NodeInfo, timeout: float = 30.0, *, force: bool = False) -> float:
        """Wait until ``replica`` is a master serving slots (and the cluster is ok again);
        returns the seconds it took. ``force``: CLUSTER FAILOVER TAKEOVER right away."""
        started = time.monotonic()
        if force:
            _command(replica.port, "CLUSTER", "FAILOVER", "TAKEOVER")

        def promoted() -> bool:
            role = _command(replica.port, "INFO", "replication")
            return "role:master" in role and "cluster_state:ok" in _command(replica.port, "CLUSTER", "INFO")

        wait_for(f"replica {replica.port} to be promoted", promoted, timeout, retry=(OSError,), error=TimeoutError)
        return time.monotonic() - started

    def cleanup(self) -> None:
        for server in self.servers.values():
            server.cleanup()
        self.servers.clear()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlas_devstack.redis_cluster", description="A Redis Cluster on 127.0.0.1, in the foreground."
    )
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, help="replicas per master")
    args = parser.parse_args(argv)

    def body(on_exit: processes.OnExit) -> int:
        cluster = RedisCluster(args.masters, args.replicas)
        on_exit(cluster.cleanup)
        cluster.start()
        print(f"export REDIS_URL={cluster.url}\nexport ATLAS_REDIS_CLUSTER=true", flush=True)
        procs = {f"redis-{p}": s.process for p, s in cluster.servers.items() if s.process is not None}
        name, code = processes.wait_any(procs)
        raise processes.ChildExited(name, code)

    return processes.run(
        "redis-cluster", body, errors=(FileNotFoundError, RuntimeError, TimeoutError, subprocess.CalledProcessError)
    )


if __name__ == "__main__":
    sys.exit(main())

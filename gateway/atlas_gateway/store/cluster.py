"""The hot-path client for a Redis Cluster: one :mod:`fastredis` connection per master, each
command sent to the master serving its slot.

It has FastRedis's interface (``execute``, ``execute_raw``, ``ping``, ``aclose``), so the script
runners and call sites do not change. The slot is read from the command itself: for EVALSHA the
first of its KEYS (every key of one Atlas script call carries one hash tag, see
core/atlas_core/contract.py), so admission stays one round trip to one node, pipelined with every
other call bound for that node.

Topology: the slot map comes from ``CLUSTER SLOTS`` (asked of any node that answers), at the
first call and again, in the background and at most every ``REFRESH_GAP`` seconds, whenever a
reply says the map is stale (``MOVED``) or a node cannot be reached (a master died: until its
replica is promoted the others still name it, so the refresh repeats while calls keep failing).
``MOVED`` and ``ASK`` mean the command did not run, so it is sent again where the reply points
(``ASK``: preceded by ``ASKING``, without changing the map); so does ``TRYAGAIN`` (a script
whose slot is in migration: its keys are partly moved), after a short back-off.

Durability: to a master with a connected replica, each write batch is followed by one
``WAIT 1 <wait_ms>`` and a call's reply is returned only after it (see ``_replicated_call``), so
an admission or settlement the gateway acted on survives the master's death.

Failures keep fastredis' meaning (failures.py): a lost connection or a timeout may have run the
command (the caller's recovery undoes it); ``NotSent`` certainly did not. ``CLUSTERDOWN`` and
``TRYAGAIN`` (no master for the slot yet, a slot in migration) are raised as ``NotSent``: the
command was refused unrun (TRYAGAIN: still, after the back-off), and "Redis unreachable"
(fail mode) is what the client should see,
not a 500. ``SCRIPT LOAD`` goes to every master (scripts are not replicated to a replica that
gets promoted; NOSCRIPT then loads it again).
"""

from __future__ import annotations

import asyncio
import logging

from atlas_core.cluster import SLOTS, key_slot

from .fastredis import FastRedis, NotSent, ReplyError, pack

log = logging.getLogger("atlas_gateway")

_ASKING = pack((b"ASKING",))
_SCRIPTS = (b"EVALSHA", b"EVAL", b"evalsha", b"eval")
_KEYLESS = frozenset({b"PING", b"SCRIPT", b"AUTH", b"SELECT", b"INFO", b"CLUSTER", b"ASKING", b"READONLY"})


def _bulk(command: bytes, pos: int) -> tuple[bytes, int]:
    """The bulk string at ``pos`` of a RESP-encoded command, and the position after it."""
    end = command.index(b"\r\n", pos)
    start = end + 2
    stop = start + int(command[pos + 1 : end])
    return command[start:stop], stop + 2


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def first_key(command: bytes) -> bytes | None:
    """The key a RESP-encoded command is routed by (None: any node will do)."""
    name, pos = _bulk(command, command.index(b"\r\n") + 2)
    if name in _SCRIPTS:
        _, pos = _bulk(command, pos)  # sha or source
        numkeys, pos = _bulk(command, pos)
        return None if numkeys == b"0" else _bulk(command, pos)[0]
    if name.upper() in _KEYLESS or pos >= len(command):
        return None
    return _bulk(command, pos)[0]


class ClusterFastRedis:
    REFRESH_GAP = 0.1  # seconds between two topology refreshes, at least
    REFRESH_EVERY = 30.0  # and at least this often while commands flow
    MAX_REDIRECTS = 5  # MOVED/ASK hops for one command (a resharding in progress)
    # TRYAGAIN: the slot of a multi-key call is being migrated (milliseconds per slot with
    # redis-cli --cluster reshard); wait a little before answering "unavailable"
    TRYAGAIN_BACKOFF = (0.02, 0.05, 0.1)
    SLOT_CACHE = 100_000  # hash tag (or untagged key) -> slot, bounded

    locator = None  # Sentinel does not front a Redis Cluster (failover.MasterWatch skips it)

    def __init__(self, url: str, timeout: float = 0.5, wait_ms: int = 100) -> None:
        self.url = url
        self.timeout = timeout
        # WAIT 1 <wait_ms> after every command to a master that has a replica (0: never)
        self.wait_ms = wait_ms
        self._wait = pack((b"WAIT", b"1", str(wait_ms).encode()))
        self._replicated: set[int] = set()  # id() of the masters with a connected replica (ROLE)
        self.unacked = 0  # WAITs that timed out without a replica's ack (diagnostics)
        seed = FastRedis(url, timeout)  # parses (and validates) auth, TLS and database once
        self.seeds = [(seed.host, seed.port)]
        self.nodes: dict[tuple[str, int], FastRedis] = {(seed.host, seed.port): seed}
        self.slots: list[FastRedis | None] | None = None  # None: no map yet
        self.refreshes = 0  # completed topology refreshes (tests, /metrics-free diagnostics)
        self._refresh_task: asyncio.Future | None = None
        self._last_refresh = float("-inf")
        self._slot_of: dict[bytes, int] = {}

    # ------------------------------------------------------------------ the FastRedis interface

    async def execute_raw(self, command: bytes):
        # Every Atlas key carries a hash tag and the header, the sha and the key count hold no
        # brace: the first "{...}" of a script call is its first key's tag (two C-level finds
        # instead of parsing the command: this is most of the routing cost)
        start = command.find(b"{")
        if start > 0:
            end = command.find(b"}", start)
            slot = self._slot_of.get(command[start : end + 1]) if end > start + 1 else None
            if slot is None:
                slot = self._slot(first_key(command))
        else:
            slot = self._slot(first_key(command))
        return await self._send(slot, command)

    async def execute(self, *args: bytes):
        if args[0].upper() == b"SCRIPT" and len(args) > 1 and args[1].upper() == b"LOAD":
            return await self._on_every_master(pack(args))
        if args[0] in _SCRIPTS:
            key = args[3] if args[2] != b"0" else None
        else:
            key = None if args[0].upper() in _KEYLESS or len(args) < 2 else args[1]
        return await self._send(self._slot(key), pack(args))

    async def ping(self) -> None:
        """Readiness: every master answers PING."""
        await self._on_every_master(pack((b"PING",)))

    async def aclose(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        for node in list(self.nodes.values()):
            await node.aclose()

    # ------------------------------------------------------------------ routing

    def _slot(self, key: bytes | None) -> int | None:
        """The slot of ``key``, cached by its hash tag (``{tag}``) or, untagged, by the key."""
        if key is None:
            return None
        start = key.find(b"{")
        end = key.find(b"}", start + 1) if start >= 0 else -1
        cache_key = key[start : end + 1] if end > start + 1 else key
        slot = self._slot_of.get(cache_key)
        if slot is None:
            if len(self._slot_of) >= self.SLOT_CACHE:
                self._slot_of.clear()
            slot = self._slot_of[cache_key] = key_slot(key)
        return slot

    def _node(self, address: str) -> FastRedis:
        host, _, port = address.rpartition(":")
        return self._node_at(host, int(port))

    def _node_at(self, host: str, port: int) -> FastRedis:
        node = self.nodes.get((host, port))
        if node is None:
            node = FastRedis(self.url, self.timeout)
            node.host, node.port = host, port
            self.nodes[(host, port)] = node
        return node

    async def _send(self, slot: int | None, command: bytes):
        slots = self.slots
        if slots is None:
            slots = await self._refresh_now()
        if asyncio.get_running_loop().time() - self._last_refresh > self.REFRESH_EVERY:
            self._stale()  # replicas come and go without a MOVED telling us
        node = slots[slot] if slot is not None else self._any_master()
        asking = False
        retries = iter(self.TRYAGAIN_BACKOFF)
        for _ in range(self.MAX_REDIRECTS + len(self.TRYAGAIN_BACKOFF)):
            if node is None:
                self._stale()
                raise NotSent(f"no master serves slot {slot} (cluster topology changing)")
            try:
                if asking:
                    return await self._asking(node, command)
                if self.wait_ms and id(node) in self._replicated:
                    return await self._replicated_call(node, command)
                return await node.execute_raw(command)
            except ReplyError as exc:
                text = str(exc)
                kind = text.split(" ", 1)[0]
                if kind == "MOVED":  # the slot lives elsewhere now: the command did not run
                    _, moved_slot, address = text.split(" ")
                    node, asking = self._node(address), False
                    if self.slots is not None:  # (a map exists: this request was routed by one)
                        self.slots[int(moved_slot)] = node
                    self._stale()
                    continue
                if kind == "ASK":  # a slot in migration: this key is already on the target
                    node, asking = self._node(text.split(" ")[2]), True
                    continue
                if kind == "TRYAGAIN":  # a multi-key call while its slot migrates: not run
                    delay = next(retries, None)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        node, asking = self.slots[slot] if slot is not None and self.slots is not None else node, False
                        continue
                if kind in ("CLUSTERDOWN", "TRYAGAIN"):
                    self._stale()
                    raise NotSent(text) from exc
                raise
            except (ConnectionError, TimeoutError, OSError):
                self._stale()  # a master may have died: look for its promoted replica
                raise
        raise NotSent(f"too many redirections for slot {slot}")

    async def _replicated_call(self, node: FastRedis, command: bytes):
        """The command, then ``WAIT 1 <wait_ms>``: its reply is returned once a replica has it
        too, so a master that dies right after answering cannot take an admission or settlement
        the gateway acted on with it (a failover would otherwise lose what the replica had not
        received yet: docs/benchmarks.md, "Figures behind the code"). The commands written in
        one event-loop iteration share one WAIT (moved behind the newest). A WAIT whose connection
        is lost fails the command like any lost reply ("may have run": undone); a WAIT that times
        out without an ack (a replica down or far behind) lets the reply through: availability
        over durability, counted in ``unacked``."""
        proto = node._proto
        if proto is None or proto.closed:
            proto = await node._ready()
        wait_entry = proto.atlas_wait
        if (
            wait_entry is not None
            and proto.outgoing
            and proto.outgoing[-1] is self._wait
            and proto.waiters
            and proto.waiters[-1] is wait_entry
        ):
            proto.outgoing.pop()  # still unsent: the batch's WAIT moves behind this command
            proto.waiters.pop()
            reply = proto.call(command)
            proto.outgoing.append(self._wait)
            proto.waiters.append(wait_entry)
        else:
            reply = proto.call(command)
            proto.call(self._wait)
            wait_entry = proto.atlas_wait = proto.waiters[-1]
        acked = wait_entry[0]
        try:
            result = await reply
        except BaseException:
            acked.add_done_callback(_retrieve)  # its outcome no longer matters to this call
            raise
        try:
            acks = int(await acked)
        except ReplyError:
            acks = 0  # WAIT refused: the command's own reply stands
        if acks < 1:
            self.unacked += 1
            self._stale()  # the replica may be gone: a refresh (ROLE) stops waiting for it
        return result

    async def _asking(self, node: FastRedis, command: bytes):
        proto = node._proto
        if proto is None or proto.closed:
            proto = await node._ready()
        asking, reply = proto.call(_ASKING), proto.call(command)  # one write, in this order
        result = (await asyncio.gather(asking, reply, return_exceptions=True))[1]
        if isinstance(result, BaseException):
            raise result
        return result

    def _masters(self) -> list[FastRedis]:
        seen: dict[int, FastRedis] = {}
        for node in self.slots or ():
            if node is not None:
                seen.setdefault(id(node), node)
        return list(seen.values())

    def _any_master(self) -> FastRedis | None:
        masters = self._masters()
        return masters[0] if masters else None

    async def _on_every_master(self, command: bytes):
        if self.slots is None:
            await self._refresh_now()
        masters = self._masters()
        if not masters:
            self._stale()
            raise NotSent("no cluster master known")
        try:
            results = await asyncio.gather(*(m.execute_raw(command) for m in masters))
        except (ConnectionError, TimeoutError, OSError):
            self._stale()
            raise
        return results[0]

    # ------------------------------------------------------------------ topology

    def _stale(self) -> None:
        """Refresh the slot map in the background (at most every REFRESH_GAP seconds)."""
        task = self._refresh_task
        if task is None or task.done():
            self._refresh_task = asyncio.ensure_future(self._refresh_soon())

    async def _refresh_soon(self) -> None:
        wait = self._last_refresh + self.REFRESH_GAP - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            await self._refresh()
        except NotSent as exc:
            log.warning("Redis Cluster topology refresh failed: %s", exc)

    async def _refresh_now(self) -> list[FastRedis | None]:
        """The first map (every caller waits for the same refresh)."""
        task = self._refresh_task
        if task is None or task.done():
            task = self._refresh_task = asyncio.ensure_future(self._refresh())
        await asyncio.shield(task)
        if self.slots is None:
            raise NotSent("no Redis Cluster node answered CLUSTER SLOTS")
        return self.slots

    async def _refresh(self) -> None:
        self._last_refresh = asyncio.get_running_loop().time()
        # known masters first (they are the likeliest to be alive), then every other node we know
        candidates = self._masters() + [n for n in self.nodes.values() if n not in self._masters()]
        errors: list[Exception] = []
        for node in candidates:
            try:
                reply = await node.execute(b"CLUSTER", b"SLOTS")
            except ReplyError as exc:
                if "cluster support disabled" in str(exc):
                    self.slots = [node] * SLOTS  # ATLAS_REDIS_CLUSTER=true against a single Redis
                    self.refreshes += 1
                    return
                errors.append(exc)
                continue
            except (OSError, TimeoutError) as exc:
                errors.append(exc)
                continue
            self._apply(node, reply)
            await self._probe_replicas()
            return
        raise NotSent(f"no Redis Cluster node answered CLUSTER SLOTS: {errors[-1] if errors else 'none known'}")

    async def _probe_replicas(self) -> None:
        """Which masters have a connected replica (ROLE): those get a WAIT after each command.
        Not from CLUSTER SLOTS, which leaves out a replica that has not replicated a write yet."""
        masters = self._masters()
        roles = await asyncio.gather(*(m.execute(b"ROLE") for m in masters), return_exceptions=True)
        self._replicated = {
            id(m) for m, role in zip(masters, roles) if isinstance(role, list) and len(role) > 2 and role[2]
        }

    def _apply(self, asked: FastRedis, reply: list) -> None:
        slots: list[FastRedis | None] = [None] * SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host in ("", "?"):  # "the node you asked" (an unknown endpoint)
                host = asked.host
            node = self._node_at(host, int(master[1]))
            slots[start : end + 1] = [node] * (end - start + 1)
            for replica in entry[3:]:  # known, so a refresh can ask it once its master is gone
                rhost = replica[0].decode() if isinstance(replica[0], bytes) else str(replica[0])
                self._node_at(rhost if rhost not in ("", "?") else asked.host, int(replica[1]))
        self.slots = slots
        self.refreshes += 1

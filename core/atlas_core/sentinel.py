"""Redis Sentinel: where the master is, for both planes.

A Sentinel deployment is named by one URL (``ATLAS_REDIS_URL``), in the form::

    redis+sentinel://[[user]:password@]host1:26379[,host2:26379,...]/<master-name>[/<db>][?query]
    rediss+sentinel://...    TLS to the sentinels and to the master alike

The user and password in the URL authenticate to the *master* (as in ``redis://``). Sentinels
with their own password (``requirepass`` in sentinel.conf) take ``sentinel_password`` (and
``sentinel_username``) as query parameters; ``db`` may also be a query parameter, and the TLS
parameters are those of ``rediss://`` (``ssl_ca_certs``, ``ssl_cert_reqs``, ...). Reserved
characters in passwords are percent-encoded.

Both Redis clients of the gateway follow the master through a failover:

* redis-py (config reads, ``/v1/usage``, the operator): its ``SentinelConnectionPool`` asks a
  :class:`MasterLocator` for the master on every new connection, and turns a ``READONLY`` reply
  (the master it is connected to was demoted) into a dropped connection and a
  ``ConnectionError``.
* the gateway's hot-path client (its store/fastredis.py) asks its own :class:`MasterLocator` on every
  (re)connect, then checks ``ROLE`` on the new connection before using it: a sentinel's view
  can lag a failover, and a demoted master must never receive an admission. Only this locator
  is fenced during a failover (the gateway's failover.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

from .redis_url import TlsOptions, query_value

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379


class MasterUnavailable(ConnectionError):
    """No sentinel named a usable master, or the address it named is not a master (yet): a
    transport failure (the command was never sent), so the fail mode applies."""


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    query: dict[str, list[str]] = field(default_factory=dict, hash=False, compare=False, repr=False)
    tls_options: TlsOptions | None = None  # rediss+sentinel://: the query's TLS parameters (redis_url.py)

    def redacted(self) -> str:
        """For logs: addresses and master name, never a password."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"sentinel {hosts} master {self.master} db {self.db}"


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"sentinel address {item!r} has no host")
    try:
        return host, int(port) if port else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"sentinel address {item!r} has a port that is not a number") from None


def parse(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` URL; ValueError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"not a Sentinel URL (expected {' or '.join(s + '://' for s in SCHEMES)})")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if secret else None
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item.strip())
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel host:port")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a Sentinel URL names the master after the hosts: redis+sentinel://host:26379/<master-name>")
    if len(path) > 2:
        raise ValueError("a Sentinel URL's path is /<master-name>[/<db>]")
    query = parse_qs(parts.query)
    raw_db = path[1] if len(path) == 2 else (query_value(query, "db") or "0")
    try:
        db = int(raw_db)
    except ValueError:
        raise ValueError(f"the database in a Sentinel URL must be a number, not {raw_db!r}") from None
    tls = parts.scheme.lower().startswith("rediss")
    return SentinelUrl(
        sentinels=sentinels,
        master=path[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=query_value(query, "sentinel_username") or None,
        sentinel_password=query_value(query, "sentinel_password") or None,
        tls=tls,
        query=query,
        tls_options=TlsOptions.from_query(query) if tls else None,
    )


def describe_url(url: str) -> str:
    """A Redis URL for logs: host(s), port(s), database; never a password, never the query."""
    if is_sentinel_url(url):
        try:
            return parse(url).redacted()
        except ValueError:
            return "an invalid Sentinel URL"
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}{parts.path or ''}"


def _tls_kwargs(config: SentinelUrl) -> dict[str, Any]:
    """redis-py connection options for TLS, from the same query parameters as ``rediss://``."""
    return config.tls_options.redis_py_kwargs() if config.tls_options is not None else {}


def sentinel_kwargs(config: SentinelUrl, timeout: float | None) -> dict[str, Any]:
    """redis-py connection options for a sentinel: its own credentials, the same TLS."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout or 5.0,
        **_tls_kwargs(config),
    }
    if config.sentinel_password is not None:
        kwargs["password"] = config.sentinel_password
        if config.sentinel_username:
            kwargs["username"] = config.sentinel_username
    return kwargs


def sentinel_manager(config: SentinelUrl, timeout: float) -> Sentinel:
    """A redis-py Sentinel client for the sentinels."""
    return Sentinel(list(config.sentinels), sentinel_kwargs=sentinel_kwargs(config, timeout))


class _LocatedSentinel(Sentinel):
    """redis-py's Sentinel manager, asking a :class:`MasterLocator` where the master is (its
    epoch rule, one lookup shared by concurrent connects) instead of taking the first
    sentinel's answer. Its own locator, never fenced: what redis-py does for the gateway (config
    and usage reads, the shed view) is harmless on a master being replaced."""

    def __init__(self, locator: "MasterLocator") -> None:
        super().__init__([], sentinel_kwargs={})
        self.locator = locator

    async def discover_master(self, service_name: str):
        try:
            return await self.locator.address()
        except MasterUnavailable as exc:
            raise MasterNotFoundError(str(exc)) from exc

    async def aclose(self) -> None:
        await self.locator.aclose()


def redis_from_url(url: str, **kwargs: Any) -> aioredis.Redis:
    """``redis.asyncio.from_url`` that also understands ``redis+sentinel://``: then a client whose
    pool follows the master the sentinels name (kwargs go to the master connections)."""
    if not is_sentinel_url(url):
        return aioredis.from_url(url, **kwargs)
    config = parse(url)
    timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout") or 5.0
    master_kwargs = {**kwargs, **_tls_kwargs(config), "db": config.db}
    if config.password is not None:
        master_kwargs["password"] = config.password
        if config.username:
            master_kwargs["username"] = config.username
    manager = _LocatedSentinel(MasterLocator(config, timeout))
    return manager.master_for(config.master, check_connection=True, **master_kwargs)


class MasterLocator:
    """The master's address for a client that manages its own connection (the gateway's store/fastredis.py)."""

    def __init__(self, config: SentinelUrl, timeout: float) -> None:
        self.config = config
        self.sentinels = sentinel_manager(config, timeout)
        # while a failover is under way (gateway failover.py), no master is handed out at all:
        # the old one may already have been replaced, and what it accepted would be lost
        self.fenced_until = 0.0
        # the replica a failover promoted, announced by its leader before the other sentinels
        # know it; used until the failover ends or for ``seconds`` at most
        self.promoted: tuple[str, int] | None = None
        self.promoted_until = 0.0
        self._lookup: asyncio.Future | None = None

    def fence(self, seconds: float) -> None:
        self.fenced_until = time.monotonic() + seconds

    def unfence(self, promoted: tuple[str, int] | None = None, seconds: float = 10.0) -> None:
        self.fenced_until = 0.0
        self.promoted = promoted
        self.promoted_until = time.monotonic() + seconds if promoted is not None else 0.0

    @property
    def fenced(self) -> bool:
        return time.monotonic() < self.fenced_until

    async def address(self) -> tuple[str, int]:
        """Where the master is now; concurrent callers share one lookup (see ``_look_up``)."""
        if self.fenced:
            raise MasterUnavailable(f"a failover of {self.config.master!r} is under way")
        if self.promoted is not None:  # until the failover ends (ROLE is checked on connecting)
            if time.monotonic() < self.promoted_until:
                return self.promoted
            self.promoted = None
        lookup = self._lookup
        if lookup is None or lookup.done():
            lookup = self._lookup = asyncio.ensure_future(self._look_up())
        return await asyncio.shield(lookup)

    async def _look_up(self) -> tuple[str, int]:
        """The master named with the highest configuration epoch by the sentinels that answer.

        Not the first sentinel's answer (redis-py's ``discover_master``): after a failover only
        its leader knows the new master at first, the others learn it from its hello messages
        (every 2 s) and meanwhile still name the old one, which may still be running and
        writable. The epoch orders their views, as Sentinel itself does. A sentinel that reports
        a failover in progress for this master means no master yet."""
        name = self.config.master
        states = await asyncio.gather(
            *(client.sentinel_master(name) for client in self.sentinels.sentinels), return_exceptions=True
        )
        best: tuple[int, str, int] | None = None
        in_progress: list[tuple[int, str, int]] = []  # the views with a failover under way
        errors = []
        for state in states:
            if isinstance(state, BaseException):
                if not isinstance(state, (redis_errors.RedisError, OSError, asyncio.TimeoutError)):
                    raise state
                errors.append(repr(state))
                continue
            if not isinstance(state, dict):  # (redis-py's type allows a bool: no master's view)
                errors.append(f"unexpected reply {state!r}")
                continue
            view = (int(state.get("config-epoch", 0)), str(state["ip"]), int(state["port"]))
            flags = state.get("flags", "")
            if "failover_in_progress" in (flags if isinstance(flags, (set, frozenset)) else str(flags).split(",")):
                in_progress.append(view)
            elif self.sentinels.check_master_state(state, name) and (best is None or view[0] > best[0]):
                best = view
        if best is None:
            raise MasterUnavailable(
                f"no sentinel names a master for {name!r}" + (f": {'; '.join(errors)}" if errors else "")
            )
        # A failover under way of the very master named (or on a newer configuration) means no
        # master yet. The leader reports its failover until it has reconfigured every replica,
        # while the others already name the promoted replica on the new epoch: that one is fine.
        for epoch, host, port in in_progress:
            if epoch > best[0] or (epoch == best[0] and (host, port) == best[1:]):
                raise MasterUnavailable(f"a failover of {name!r} is under way")
        return best[1], best[2]

    @staticmethod
    def check_role(reply: Any) -> None:
        """``ROLE`` on a fresh connection: anything but ``master`` (a demoted master, a replica a
        sentinel still names) means the address is stale."""
        role = reply[0] if isinstance(reply, (list, tuple)) and reply else reply
        if role not in (b"master", "master"):
            raise MasterUnavailable(f"the address the sentinels named is a {role!r}, not the master")

    async def aclose(self) -> None:
        await self.sentinels.aclose()

"""What a failed Redis call means, decided in one place.

Only a *transport* failure (no connection, a lost connection, a timeout) means "Redis
unreachable": the fail mode (closed: 503, open: pass unchecked) applies to it alone. An error
*reply* (a Lua error, ``OOM``, ``NOAUTH``, ``WRONGPASS``, ``READONLY``) means Redis answered and
refused: that is a 500 with its own metric, never traffic let through unmetered, whatever the
fail mode.

On a Redis Cluster, a refusal that means "no master serves this slot right now" (``CLUSTERDOWN``,
``TRYAGAIN`` after its retries, a slot not covered: a failover or a resharding in progress) is
unavailability, not a refusal: the command did not run, the fail mode applies (cluster.py
raises these as ``NotSent``; redis-py's RedisCluster as the exceptions below).
"""

from __future__ import annotations

import asyncio

from redis import exceptions as redis_errors

from .. import metrics
from ..http import errors
from .fastredis import NotSent, ReplyError

# redis-py's RedisCluster: no master for the slot (yet); RedisClusterException is no RedisError
_CLUSTER_UNAVAILABLE = (
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
)

# every exception a Redis call (hot-path client or redis-py) may raise
REDIS_FAILURES = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
    ReplyError,
    OSError,
    asyncio.TimeoutError,
)

# first word of an error reply -> metric label (bounded: anything else is "ERR")
_REPLY_KINDS = frozenset(
    {
        "ERR",
        "OOM",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
        "NOSCRIPT",
        "READONLY",
        "BUSY",
        "LOADING",
        "MASTERDOWN",
        "MISCONF",
        "WRONGTYPE",
        "EXECABORT",
        "CROSSSLOT",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "CLUSTERDOWN",
    }
)


def is_transport_failure(exc: BaseException) -> bool:
    if isinstance(exc, _CLUSTER_UNAVAILABLE):
        return True
    if isinstance(exc, (ReplyError, redis_errors.AuthenticationError, redis_errors.ResponseError)):
        return False  # redis-py raises NOAUTH/WRONGPASS as AuthenticationError (a ConnectionError)
    return isinstance(exc, (OSError, asyncio.TimeoutError, redis_errors.ConnectionError, redis_errors.TimeoutError))


def maybe_ran(exc: BaseException) -> bool:
    """Whether the command may have reached Redis (and so may run, or have run, without us)."""
    return is_transport_failure(exc) and not isinstance(exc, NotSent)


def reply_kind(exc: BaseException) -> str:
    if isinstance(exc, redis_errors.AuthenticationError):
        return "NOAUTH"
    word = str(exc).split(" ", 1)[0].upper()
    return word if word in _REPLY_KINDS else "ERR"


def reply_error(op: str, exc: BaseException) -> errors.GatewayError:
    """Count a refused Redis call and turn it into the 500 the client gets."""
    kind = reply_kind(exc)
    metrics.count_redis_reply_error(op, kind)
    return errors.redis_refused(kind)

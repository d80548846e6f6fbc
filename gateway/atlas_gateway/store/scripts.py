"""Running Lua scripts: EVALSHA, loading the script on NOSCRIPT (after a Redis restart).

Two runners with one interface, ``await runner(shape, dynamic, tail)``, where ``shape`` is a
:class:`CallShape` (KEYS and the fixed ARGV) and the script's ARGV is
``dynamic + shape.static + tail`` (the ledger's script_args.py builds all three for its scripts):
:class:`FastScript` (the gateway's hot path, over :mod:`fastredis`; it caches the RESP encoding
of the shape on the shape) and :class:`RedisPyScript` (any redis-py-compatible asyncio client,
e.g. fakeredis in unit tests).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Sequence

from .fastredis import FastRedis, ReplyError, pack_args

if TYPE_CHECKING:
    from .cluster import ClusterFastRedis


class CallShape:
    """KEYS and the fixed ARGV of one script call for one key (and day); ``encoded`` is the
    hot-path client's cache of their RESP form (see :class:`FastScript`)."""

    __slots__ = ("keys", "static", "encoded")

    def __init__(self, keys: Sequence[bytes], static: Sequence[bytes]) -> None:
        self.keys = list(keys)
        self.static = tuple(static)
        self.encoded: tuple[bytes, bytes] | None = None


class FastScript:
    def __init__(self, client: FastRedis | ClusterFastRedis, source: str) -> None:
        self.client = client
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    def encode(self, shape: CallShape, dynamic: Sequence[bytes], tail: Sequence[bytes] = ()) -> bytes:
        """The RESP command ``EVALSHA sha numkeys *keys *dynamic *static *tail``."""
        encoded = shape.encoded
        if encoded is None:
            head = pack_args((b"EVALSHA", self.sha, str(len(shape.keys)).encode(), *shape.keys))
            encoded = shape.encoded = (head, pack_args(shape.static))
        head, static = encoded
        count = 3 + len(shape.keys) + len(dynamic) + len(shape.static) + len(tail)
        command = b"*%d\r\n" % count + head + pack_args(dynamic) + static
        return command + pack_args(tail) if tail else command

    async def __call__(self, shape: CallShape, dynamic: Sequence[bytes], tail: Sequence[bytes] = ()) -> Any:
        command = self.encode(shape, dynamic, tail)
        try:
            return await self.client.execute_raw(command)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # NOSCRIPT: the script did not run, so running it now cannot double-count
        await self.client.execute(b"SCRIPT", b"LOAD", self.source)
        return await self.client.execute_raw(command)


class RedisPyScript:
    def __init__(self, client: Any, source: str) -> None:
        self._script = client.register_script(source)

    async def __call__(self, shape: CallShape, dynamic: Sequence[bytes], tail: Sequence[bytes] = ()) -> Any:
        return await self._script(keys=shape.keys, args=[*dynamic, *shape.static, *tail])

"""Running the Lua scripts: EVALSHA, loading the script on NOSCRIPT (after a Redis restart).

Two runners with one interface, ``await runner(keys, args)``:
:class:`FastScript` (the gateway's hot path, over :mod:`fastredis`) and :class:`RedisPyScript`
(any redis-py-compatible asyncio client, e.g. fakeredis in unit tests).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from .fastredis import FastRedis, ReplyError, pack, pack_args


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class FastScript:
    def __init__(self, client: FastRedis, source: str) -> None:
        self.client = client
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        tail = (str(len(keys)).encode(), *map(_b, keys), *map(_b, args))
        try:
            return await self.client.execute(b"EVALSHA", self.sha, *tail)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # NOSCRIPT: the script did not run, so running it now cannot double-count
        await self.client.execute(b"SCRIPT", b"LOAD", self.source)
        return await self.client.execute(b"EVALSHA", self.sha, *tail)


    def prefix(self, keys: Sequence[bytes], nargs: int) -> bytes:
        """The encoded start of an EVALSHA with these keys and ``nargs`` arguments."""
        head = pack((b"EVALSHA", self.sha, str(len(keys)).encode(), *keys))
        return b"*%d\r\n" % (3 + len(keys) + nargs) + head[head.index(b"\r\n") + 2:]

    async def call_encoded(self, prefix: bytes, dynamic: Sequence[bytes], suffix: bytes) -> Any:
        """EVALSHA from pre-encoded parts: ``prefix`` (command, sha, keys), the per-request
        arguments, then ``suffix`` (the pre-encoded constant arguments)."""
        command = prefix + pack_args(dynamic) + suffix
        try:
            return await self.client.execute_raw(command)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.client.execute(b"SCRIPT", b"LOAD", self.source)
        return await self.client.execute_raw(command)


class RedisPyScript:
    def __init__(self, client: Any, source: str) -> None:
        self._script = client.register_script(source)

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self._script(keys=list(keys), args=list(args))

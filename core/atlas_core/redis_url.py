"""Redis URLs, read one way by every client of both planes: ``redis://`` and ``rediss://`` with
redis-py's query parameters, whose TLS options a Sentinel URL (sentinel.py) shares.

The gateway runs two clients on one URL (its hot-path RESP client and redis-py), so both must
read it alike: the TLS options are parsed here once and rendered for each, as an
:class:`ssl.SSLContext` (the hot-path client) or as redis-py's connection options.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from .flags import parse_flag

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def query_value(query: dict[str, list[str]], name: str) -> str | None:
    """The last value of a query parameter (as redis-py reads a repeated one), or None."""
    values = query.get(name)
    return values[-1] if values else None


@dataclass(frozen=True)
class TlsOptions:
    """redis-py's ``rediss://`` query parameters: ``ssl_cert_reqs`` (none/optional/required,
    default required), ``ssl_ca_certs``, ``ssl_check_hostname`` (unset: on when certificates are
    required), ``ssl_certfile``/``ssl_keyfile``/``ssl_password`` (a client certificate)."""

    cert_reqs: str = "required"
    ca_certs: str | None = None
    check_hostname: bool | None = None
    certfile: str | None = None
    keyfile: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> "TlsOptions":
        """ValueError names a parameter with a value no client would accept."""
        cert_reqs = (query_value(query, "ssl_cert_reqs") or "required").lower()
        if cert_reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {cert_reqs!r}")
        try:
            check_hostname = parse_flag(query_value(query, "ssl_check_hostname"))
        except ValueError as exc:
            raise ValueError(f"ssl_check_hostname: {exc}") from None
        return cls(
            cert_reqs=cert_reqs,
            ca_certs=query_value(query, "ssl_ca_certs") or None,
            check_hostname=check_hostname,
            certfile=query_value(query, "ssl_certfile") or None,
            keyfile=query_value(query, "ssl_keyfile") or None,
            password=query_value(query, "ssl_password") or None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For a client that makes its own TLS connections (the gateway's hot-path client)."""
        verify = _CERT_REQS[self.cert_reqs]
        context = ssl.create_default_context(cafile=self.ca_certs)
        check = verify != ssl.CERT_NONE if self.check_hostname is None else self.check_hostname
        context.check_hostname = check and verify != ssl.CERT_NONE
        context.verify_mode = verify
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile, self.password)
        return context

    def redis_py_kwargs(self) -> dict[str, Any]:
        """redis-py's connection options (for connections it makes from a host and port, as a
        Sentinel client does; a ``rediss://`` URL given to redis-py reads the query itself)."""
        kwargs: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": self.cert_reqs}
        for name in ("ca_certs", "certfile", "keyfile", "password"):
            value = getattr(self, name)
            if value:
                kwargs[f"ssl_{name}"] = value
        if self.check_hostname is not None:
            kwargs["ssl_check_hostname"] = self.check_hostname
        return kwargs


@dataclass(frozen=True)
class RedisAddress:
    """A ``redis://`` or ``rediss://`` URL: where the server is and how to log in."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None  # rediss://

    @classmethod
    def parse(cls, url: str) -> "RedisAddress":
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", ""):
            raise ValueError(f"a Redis URL is redis://, rediss:// or redis+sentinel://, not {parsed.scheme}://")
        query = parse_qs(parsed.query)
        path = (parsed.path or "/").lstrip("/")
        return cls(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 6379,
            db=int(path) if path else int(query_value(query, "db") or 0),  # as redis-py: the path wins
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            tls=TlsOptions.from_query(query) if parsed.scheme == "rediss" else None,
        )

"""FastRedis reads the same Redis URLs as redis-py, ``rediss://`` query parameters included."""

from __future__ import annotations

import ssl

import pytest

from atlas_gateway.store.fastredis import FastRedis


def test_plain_url_has_no_tls_and_unquotes_credentials():
    client = FastRedis("redis://user:p%40ss@example:6380/3")
    assert (client.host, client.port, client.db, client.ssl) == ("example", 6380, 3, None)
    assert (client.username, client.password) == ("user", "p@ss")


def test_chart_rediss_url_verifies_the_ca_but_not_the_hostname(tmp_path):
    from tests.integration.test_redis_tls import _write_pki

    ca, _, _ = _write_pki(tmp_path)
    client = FastRedis(f"rediss://default:pw@redis.example:6379/0?ssl_ca_certs={ca}&ssl_check_hostname=false")
    assert client.ssl.verify_mode == ssl.CERT_REQUIRED
    assert client.ssl.check_hostname is False
    assert client.password == "pw"


def test_rediss_defaults_and_cert_reqs_none():
    strict = FastRedis("rediss://h:1/0")
    assert strict.ssl.verify_mode == ssl.CERT_REQUIRED and strict.ssl.check_hostname is True
    lax = FastRedis("rediss://h:1/0?ssl_cert_reqs=none")
    assert lax.ssl.verify_mode == ssl.CERT_NONE and lax.ssl.check_hostname is False
    assert FastRedis("rediss://h:1/0?ssl_cert_reqs=optional").ssl.verify_mode == ssl.CERT_OPTIONAL
    with pytest.raises(ValueError):
        FastRedis("rediss://h:1/0?ssl_cert_reqs=maybe")
    with pytest.raises(ValueError):
        FastRedis("unix:///tmp/redis.sock")

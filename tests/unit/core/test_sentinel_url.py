"""The Sentinel URL both planes read (atlas_core/sentinel.py), and what each client makes of it."""

from __future__ import annotations

import ssl

import pytest

from atlas_core import sentinel
from atlas_gateway.fastredis import FastRedis
from atlas_gateway.settings import Settings, SettingsError


def test_full_url():
    url = ("redis+sentinel://atlas:p%40ss@s0:26380,s1,[::1]:26381/mymaster/2"
           "?sentinel_password=s%26cret&sentinel_username=watcher")
    cfg = sentinel.parse(url)
    assert cfg.sentinels == (("s0", 26380), ("s1", 26379), ("::1", 26381))
    assert (cfg.master, cfg.db, cfg.tls) == ("mymaster", 2, False)
    assert (cfg.username, cfg.password) == ("atlas", "p@ss")
    assert (cfg.sentinel_username, cfg.sentinel_password) == ("watcher", "s&cret")
    assert "p@ss" not in repr(cfg) and "s&cret" not in repr(cfg)
    assert sentinel.describe_url(url) == "sentinel s0:26380,s1:26379,::1:26381 master mymaster db 2"


def test_minimal_url_and_db_in_the_query():
    cfg = sentinel.parse("redis+sentinel://s0/m")
    assert (cfg.sentinels, cfg.master, cfg.db, cfg.password, cfg.sentinel_password) == ((("s0", 26379),), "m", 0, None, None)
    assert sentinel.parse("redis+sentinel://s0/m?db=4").db == 4
    assert sentinel.parse("redis+sentinel://:pw@s0/m").password == "pw"


@pytest.mark.parametrize("url,message", [
    ("redis+sentinel://s0:26379", "names the master"),
    ("redis+sentinel:///m", "at least one sentinel"),
    ("redis+sentinel://s0:port/m", "not a number"),
    ("redis+sentinel://s0/m/x", "must be a number"),
    ("redis+sentinel://s0/m/1/2", "path is"),
    ("redis://s0/0", "not a Sentinel URL"),
])
def test_bad_urls_say_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=message):
        sentinel.parse(url)


def test_gateway_refuses_a_bad_sentinel_url_at_start_up():
    with pytest.raises(SettingsError, match="ATLAS_REDIS_URL: .*names the master"):
        Settings.from_env({"ATLAS_UPSTREAM_URL": "http://u", "ATLAS_REDIS_URL": "redis+sentinel://s0"})


def test_fast_client_takes_credentials_db_and_tls_from_a_sentinel_url():
    client = FastRedis("rediss+sentinel://u:pw@s0:1,s1:2/m/3?ssl_cert_reqs=none&sentinel_password=x", 0.5)
    assert client.locator is not None and client.locator.config.master == "m"
    assert (client.username, client.password, client.db) == ("u", "pw", 3)
    assert client.ssl.verify_mode == ssl.CERT_NONE
    assert FastRedis("redis://h:1/0").locator is None


def test_redis_py_client_follows_the_sentinels():
    client = sentinel.redis_from_url("redis+sentinel://:pw@s0:1,s1:2/m/3?sentinel_password=x", socket_timeout=0.5)
    pool = client.connection_pool
    assert pool.service_name == "m" and pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "pw"
    sentinels = pool.sentinel_manager.locator.sentinels.sentinels
    assert [s.connection_pool.connection_kwargs["password"] for s in sentinels] == ["x", "x"]


@pytest.mark.parametrize("reply,ok", [([b"master", 0, []], True), ([b"slave", b"h", 1, b"connected", 0], False),
                                      ([b"sentinel", []], False)])
def test_role_check(reply, ok):
    if ok:
        sentinel.MasterLocator.check_role(reply)
    else:
        with pytest.raises(sentinel.MasterUnavailable):
            sentinel.MasterLocator.check_role(reply)

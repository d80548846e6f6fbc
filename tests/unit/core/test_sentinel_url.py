"""The Sentinel URL both planes read (atlas_core/sentinel.py), and what each client makes of it."""

from __future__ import annotations

import ssl

import pytest

from atlas_core import sentinel
from atlas_gateway.settings import Settings, SettingsError
from atlas_gateway.store.fastredis import FastRedis


def test_full_url():
    url = (
        "redis+sentinel://atlas:p%40ss@s0:26380,s1,[::1]:26381/mymaster/2"
        "?sentinel_password=s%26cret&sentinel_username=watcher"
    )
    cfg = sentinel.parse(url)
    assert cfg.sentinels == (("s0", 26380), ("s1", 26379), ("::1", 26381))
    assert (cfg.master, cfg.db, cfg.tls) == ("mymaster", 2, False)
    assert (cfg.username, cfg.password) == ("atlas", "p@ss")
    assert (cfg.sentinel_username, cfg.sentinel_password) == ("watcher", "s&cret")
    assert "p@ss" not in repr(cfg) and "s&cret" not in repr(cfg)
    assert sentinel.describe_url(url) == "sentinel s0:26380,s1:26379,::1:26381 master mymaster db 2"


def test_minimal_url_and_db_in_the_query():
    cfg = sentinel.parse("redis+sentinel://s0/m")
    assert (cfg.sentinels, cfg.master, cfg.db, cfg.password, cfg.sentinel_password) == (
        (("s0", 26379),),
        "m",
        0,
        None,
        None,
    )
    assert sentinel.parse("redis+sentinel://s0/m?db=4").db == 4
    assert sentinel.parse("redis+sentinel://:pw@s0/m").password == "pw"


@pytest.mark.parametrize(
    "url,message",
    [
        ("redis+sentinel://s0:26379", "names the master"),
        ("redis+sentinel:///m", "at least one sentinel"),
        ("redis+sentinel://s0:port/m", "not a number"),
        ("redis+sentinel://s0/m/x", "must be a number"),
        ("redis+sentinel://s0/m/1/2", "path is"),
        ("redis://s0/0", "not a Sentinel URL"),
    ],
)
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


@pytest.mark.parametrize(
    "reply,ok", [([b"master", 0, []], True), ([b"slave", b"h", 1, b"connected", 0], False), ([b"sentinel", []], False)]
)
def test_role_check(reply, ok):
    if ok:
        sentinel.MasterLocator.check_role(reply)
    else:
        with pytest.raises(sentinel.MasterUnavailable):
            sentinel.MasterLocator.check_role(reply)


def _view(port: int, epoch: int, *flags: str) -> dict:
    flags = {"master", *flags}
    return {
        "ip": "10.0.0.1",
        "port": port,
        "config-epoch": epoch,
        "flags": ",".join(sorted(flags)),
        "is_master": True,
        "is_sdown": "s_down" in flags,
        "is_odown": "o_down" in flags,
        "num-other-sentinels": 2,
    }


class _FakeSentinel:
    def __init__(self, answer) -> None:
        self.answer = answer

    async def sentinel_master(self, name):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _locate(*answers):
    import asyncio

    locator = sentinel.MasterLocator(sentinel.parse("redis+sentinel://s0/m"), 0.5)
    locator.sentinels.sentinels = [_FakeSentinel(a) for a in answers]
    return asyncio.run(locator.address())


def test_the_highest_epoch_wins_and_a_failover_of_that_master_blocks():
    import redis

    # after a failover the others still name the old master for a while: the epoch decides
    assert _locate(_view(1, 0), _view(2, 1), redis.ConnectionError("down")) == ("10.0.0.1", 2)
    # the leader still finishing its failover of the old master, the others on the new epoch
    assert _locate(_view(1, 1, "s_down", "failover_in_progress"), _view(2, 1), _view(2, 1)) == ("10.0.0.1", 2)
    # before the promotion: a failover of the master everyone names (or on a newer epoch) = none yet
    with pytest.raises(sentinel.MasterUnavailable, match="under way"):
        _locate(_view(1, 0, "failover_in_progress"), _view(1, 0), _view(1, 0))
    with pytest.raises(sentinel.MasterUnavailable, match="under way"):
        _locate(_view(1, 1, "failover_in_progress"), _view(1, 0), _view(1, 0))
    # a master down (s_down) is no master; nobody answering either
    with pytest.raises(sentinel.MasterUnavailable, match="no sentinel names"):
        _locate(_view(1, 0, "s_down"), redis.TimeoutError("slow"))


def test_a_fence_holds_and_a_promotion_is_used_until_it_expires():
    import asyncio

    locator = sentinel.MasterLocator(sentinel.parse("redis+sentinel://s0/m"), 0.5)
    locator.sentinels.sentinels = [_FakeSentinel(_view(1, 0))]
    locator.fence(10)
    with pytest.raises(sentinel.MasterUnavailable, match="under way"):
        asyncio.run(locator.address())
    locator.unfence(promoted=("10.0.0.9", 7), seconds=10)
    assert asyncio.run(locator.address()) == ("10.0.0.9", 7)
    locator.promoted_until = 0  # expired without the failover's end: back to the sentinels
    assert asyncio.run(locator.address()) == ("10.0.0.1", 1)


def test_failover_events_fence_then_promote_then_end():
    from atlas_gateway.store.failover import MasterWatch

    fast = FastRedis("redis+sentinel://s0/atlas", 0.5)
    drops = []
    fast.disconnect = lambda: drops.append(1)
    watch = MasterWatch(fast, None, 0.5)
    locator = fast.locator
    watch.on_event("+try-failover", "master other 10.0.0.1 6379")  # another master: ignored
    assert not locator.fenced and not drops
    watch.on_event("+try-failover", "master atlas 10.0.0.1 6379")
    assert locator.fenced and drops == [1]
    watch.on_event("+promoted-slave", "slave 10.0.0.2:6380 10.0.0.2 6380 @ atlas 10.0.0.1 6379")
    assert not locator.fenced and locator.promoted == ("10.0.0.2", 6380) and drops == [1, 1]
    watch.on_event("+switch-master", "atlas 10.0.0.1 6379 10.0.0.2 6380")
    assert locator.promoted is None and not locator.fenced

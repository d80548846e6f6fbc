"""atlas_devstack.redis_server: ephemeral and persistent (pidfile) modes."""

from __future__ import annotations

import redis

from atlas_devstack.redis_server import RedisServer


def test_ephemeral_server_binds_loopback_without_persistence():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            config = client.config_get("*")
            assert config["bind"] == "127.0.0.1"
            assert config["save"] == "" and config["appendonly"] == "no"
        finally:
            client.close()
    assert not server.ping()


def test_persistent_server_keeps_data_and_stops_by_pidfile(tmp_path):
    server = RedisServer(dir=tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("atlas:test", "kept")
        client.close()
        assert server.pidfile.exists()
    finally:
        # another process (make dev-down) stops it by its pidfile
        assert RedisServer.stop_pidfile(server.pidfile)
    assert not server.ping()
    server._proc = None  # it was stopped from outside
    server.start()  # same dir and port: the RDB written at shutdown is loaded again
    try:
        client = redis.Redis.from_url(server.url)
        assert client.get("atlas:test") == b"kept"
        client.close()
    finally:
        server.stop()

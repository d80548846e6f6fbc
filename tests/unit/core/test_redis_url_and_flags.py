"""One reading of yes/no values and of Redis URLs' TLS options, for every client of both planes."""

from __future__ import annotations

import ssl

import pytest

from atlas_core import sentinel
from atlas_core.flags import parse_flag
from atlas_core.redis_url import RedisAddress, TlsOptions


@pytest.mark.parametrize(
    "raw, default, expected",
    [
        (None, True, True),
        ("", False, False),
        ("  ", None, None),
        ("1", False, True),
        (" TRUE ", False, True),
        ("yes", False, True),
        ("on", False, True),
        ("y", False, True),
        ("0", True, False),
        ("False", True, False),
        ("no", True, False),
        ("OFF", True, False),
        ("f", True, False),
    ],
)
def test_flags(raw, default, expected):
    assert parse_flag(raw, default) is expected


def test_a_value_that_is_neither_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'maybe'"):
        parse_flag("maybe")


def test_tls_options_read_alike_for_both_clients():
    query = {
        "ssl_cert_reqs": ["optional"],
        "ssl_ca_certs": ["/ca.pem"],
        "ssl_check_hostname": ["false"],
        "ssl_certfile": ["/c.pem"],
        "ssl_keyfile": ["/k.pem"],
    }
    tls = TlsOptions.from_query(query)
    assert tls.redis_py_kwargs() == {
        "ssl": True,
        "ssl_cert_reqs": "optional",
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_check_hostname": False,
    }
    assert TlsOptions.from_query({}).redis_py_kwargs() == {"ssl": True, "ssl_cert_reqs": "required"}
    context = TlsOptions.from_query({"ssl_cert_reqs": ["none"]}).ssl_context()
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)
    # a Sentinel URL's TLS options are the same parser's
    parsed = sentinel.parse("rediss+sentinel://s:26379/m?ssl_cert_reqs=optional&ssl_ca_certs=/ca.pem")
    assert parsed.tls_options == TlsOptions(cert_reqs="optional", ca_certs="/ca.pem")


@pytest.mark.parametrize(
    "query, message",
    [({"ssl_cert_reqs": ["maybe"]}, "ssl_cert_reqs"), ({"ssl_check_hostname": ["perhaps"]}, "ssl_check_hostname")],
)
def test_a_bad_tls_option_is_refused_naming_it(query, message):
    with pytest.raises(ValueError, match=message):
        TlsOptions.from_query(query)


def test_redis_address():
    address = RedisAddress.parse("rediss://u:p%40w@h:7000/2?db=5")
    assert (address.host, address.port, address.db, address.username, address.password) == ("h", 7000, 2, "u", "p@w")
    assert address.tls == TlsOptions()
    assert RedisAddress.parse("redis://h?db=3").db == 3 and RedisAddress.parse("redis://h").tls is None
    with pytest.raises(ValueError, match="unix://"):
        RedisAddress.parse("unix:///tmp/redis.sock")

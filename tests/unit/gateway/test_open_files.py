"""The open-file limit a gateway process needs for its connection cap (__main__._allow_connections):
two sockets per request held (the client's, the upstream's), raised to the hard limit, and the cap
lowered to what fits when the hard limit is too small."""

from __future__ import annotations

import resource

import pytest

from atlas_gateway.__main__ import FDS_BESIDES_CONNECTIONS, _allow_connections


@pytest.fixture
def limits(monkeypatch):
    state = {}

    def set_limit(kind, value):
        assert kind == resource.RLIMIT_NOFILE
        state["now"] = value

    monkeypatch.setattr(resource, "getrlimit", lambda kind: state["now"])
    monkeypatch.setattr(resource, "setrlimit", set_limit)
    return state


def test_the_soft_limit_is_raised_for_two_sockets_per_connection(limits):
    limits["now"] = (1024, 1_048_576)
    assert _allow_connections(12288, 12288) == 12288
    assert limits["now"] == (2 * 12288 + FDS_BESIDES_CONNECTIONS, 1_048_576)


def test_a_small_hard_limit_lowers_the_cap_to_what_fits(limits, capsys):
    limits["now"] = (1024, 20_000)
    fits = _allow_connections(12288, 12288)
    assert fits == (20_000 - FDS_BESIDES_CONNECTIONS) // 2 == 9872
    assert limits["now"] == (20_000, 20_000)
    assert "capping connections at 9872" in capsys.readouterr().err


def test_a_smaller_pool_needs_fewer_files(limits):
    limits["now"] = (1024, 20_000)
    assert _allow_connections(12288, 4096) == 12288  # 12,288 + 4,096 + 256 fit in 20,000

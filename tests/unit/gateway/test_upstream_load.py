"""Shedding by the upstream's own load (shedding/upstream_load.py, shedder.py): the gauges read
from a vLLM /metrics page, the shed decision, staleness and its fallback, the settings."""

from __future__ import annotations

import asyncio
import logging

import pytest

from atlas_gateway.settings import Settings, SettingsError
from atlas_gateway.shedding.shedder import Shedder
from atlas_gateway.shedding.upstream_load import NoLoadExported, UpstreamLoad, UpstreamQueue, display_url, parse_load

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 180.0
vllm:num_requests_running{engine="1",model_name="llama"} 76.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 12.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 9.0 1700000000000
vllm:num_requests_waiting_by_reason{reason="capacity"} 999
"""


def test_the_gauges_are_summed_over_engines():
    assert parse_load(VLLM_PAGE) == (256.0, 21.0)
    assert parse_load("vllm:num_requests_waiting 3\n") == (0.0, 3.0)


def test_a_page_without_the_gauges_exports_nothing():
    with pytest.raises(NoLoadExported):
        parse_load("# a plain OpenAI server\nprocess_cpu_seconds_total 1.5\n")


def test_a_metric_label_never_carries_credentials():
    assert display_url("http://user:secret@vllm.ns:8000/prefix") == "http://vllm.ns:8000/prefix"


def queue(waiting: int, thresholds=(16, 64, 256)) -> UpstreamQueue:
    q = UpstreamQueue("http://vllm", thresholds)
    q.waiting, q.fresh = waiting, True
    return q


@pytest.mark.parametrize(
    "waiting,shed",
    [
        (0, set()),
        (15, set()),
        (16, {"Sheddable"}),
        (64, {"Sheddable", "Standard"}),
        (256, {"Sheddable", "Standard", "Critical"}),
    ],
)
def test_classes_are_shed_from_the_bottom_as_the_queue_grows(waiting, shed):
    shedder = Shedder(10, 20, 30, pool=1000)
    shedder.inflight = 500  # far past every in-flight ceiling: a fresh reading decides instead
    assert {p for p in ("Critical", "Standard", "Sheddable") if shedder.should_shed(p, queue(waiting))} == shed


def test_a_zero_queue_threshold_never_sheds_that_class():
    shedder = Shedder(10, 20, 30)
    assert not shedder.should_shed("Critical", queue(10_000, (1, 2, 0)))


def test_the_in_flight_ceilings_apply_when_the_reading_is_not_fresh():
    shedder = Shedder(10, 20, 30)
    stale = queue(0)
    stale.fresh = False
    shedder.inflight = 10
    assert shedder.should_shed("Sheddable", stale) and shedder.should_shed("Sheddable", None)
    assert not shedder.should_shed("Standard", stale)


def test_the_pool_sheds_every_class_whatever_the_reading():
    shedder = Shedder(0, 0, 0, pool=8)
    shedder.inflight = 8
    assert shedder.should_shed("Critical", queue(0))


def test_an_idle_upstream_with_ten_thousand_in_flight_is_not_shed_by_default():
    s = Settings.from_env({"ATLAS_UPSTREAM_URL": "http://u"})
    local, shared = s.shed_limits()
    shedder = Shedder(*local, shared=shared, pool=s.upstream_pool_size)
    shedder.inflight = 10_000
    idle = UpstreamQueue("http://u", s.queue_thresholds)
    assert not any(shedder.should_shed(p, idle) for p in ("Critical", "Standard", "Sheddable"))  # unread
    idle.fresh = True
    assert not any(shedder.should_shed(p, idle) for p in ("Critical", "Standard", "Sheddable"))


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_an_unreadable_upstream_goes_stale_and_is_logged_once(caplog):
    pages = [VLLM_PAGE.encode()]

    async def fetch(url: str) -> bytes:
        assert url == "http://vllm/metrics"
        if not pages:
            raise ConnectionRefusedError
        return pages.pop()

    q = UpstreamQueue("http://vllm", (16, 64, 256))
    load = UpstreamLoad([q], fetch, interval=0.001)
    caplog.set_level(logging.WARNING, "atlas_gateway")
    run(load.read(q))
    assert q.fresh and (q.running, q.waiting) == (256, 21)
    for _ in range(3):
        run(load.read(q))
        run(asyncio.sleep(0.002))  # (a real clock: staleness is 3 intervals of 1 ms)
    assert not q.fresh
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1
    pages.append(b"vllm:num_requests_waiting 2\n")
    run(load.read(q))
    assert q.fresh and q.waiting == 2
    assert any("readable again" in r.getMessage() for r in caplog.records)


def test_a_failure_within_the_staleness_bound_keeps_the_last_reading():
    async def fail(url: str) -> bytes:
        raise ConnectionResetError

    q = queue(20)
    q.read_at = float("inf")  # read "just now", for any clock
    run(UpstreamLoad([q], fail, interval=60).read(q))
    assert q.fresh and q.waiting == 20


def test_per_upstream_thresholds_and_their_validation():
    s = Settings.from_env(
        {
            "ATLAS_UPSTREAM_URL": "http://a",
            "ATLAS_SHED_QUEUE_THRESHOLD_STANDARD": "40",
            "ATLAS_UPSTREAM_SHEDDING": '{"http://b/v1": {"Sheddable": 2, "metrics": false}}',
        }
    )
    assert s.queue_thresholds == (16, 40, 256)
    entry = s.upstream_shedding["http://b/v1"]
    assert entry.queue_thresholds == (2, 40, 256) and not entry.read_metrics
    with pytest.raises(SettingsError, match="lower classes shed first"):
        Settings.from_env({"ATLAS_UPSTREAM_URL": "http://a", "ATLAS_SHED_QUEUE_THRESHOLD": "100"})
    with pytest.raises(SettingsError, match="ATLAS_UPSTREAM_SHEDDING"):
        Settings.from_env({"ATLAS_UPSTREAM_URL": "http://a", "ATLAS_UPSTREAM_SHEDDING": '{"http://b": {"Urgent": 1}}'})


def test_the_runtime_gives_each_upstream_its_own_thresholds():
    from atlas_gateway.runtime import Runtime

    rt = Runtime(
        Settings.from_env(
            {
                "ATLAS_UPSTREAM_URL": "http://a/v1",
                "ATLAS_UPSTREAM_MODELS": '{"q*": "http://b"}',
                "ATLAS_UPSTREAM_SHEDDING": '{"http://b/v1": {"Sheddable": 2, "Standard": 3, "Critical": 4}}',
            }
        )
    )
    assert rt.upstream_load.queue_for(rt.upstreams.base_for("qwen")).limits == {
        "Sheddable": 2,
        "Standard": 3,
        "Critical": 4,
    }
    assert rt.upstream_load.queue_for(rt.upstreams.base_for("llama")).limits["Sheddable"] == 16

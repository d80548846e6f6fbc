"""AtlasPriceList status (price_list_status.py) and its triggers in the runtime: Ready and
observedGeneration at once, the models it prices, who names it, re-pricing only on a new spec."""

from __future__ import annotations

from datetime import datetime, timezone

from atlas_operator import conditions as cond
from atlas_operator.price_list_status import USED_BY_SHOWN, desired_status, reconcile_price_list
from atlas_operator.settings import KEYS, PRICE_LISTS, QUOTAS
from atlas_operator.views import ObjectView

from .test_runtime import index_key, index_quota, make_runtime

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
PRICES = {
    "currency": "USD",
    "prices": [{"model": "llama-*", "input": 0.1, "output": 0.2}, {"model": "qwen*", "input": 0.2, "output": 0.4}],
}


def index_price_list(rt, kube, name):
    rt.indexes.setdefault("atlaspricelist_views", {})[("team", name)] = [ObjectView.of(kube.get(PRICE_LISTS, name))]


def test_status_names_the_models_and_who_uses_it():
    view = ObjectView.of({"metadata": {"namespace": "team", "name": "p", "generation": 3}, "spec": PRICES})
    status = desired_status(view, ["k2", "k1"], ["q"], NOW)
    assert status["observedGeneration"] == 3 and status["models"] == ["llama-*", "qwen*"]
    assert (status["pricesOtherModels"], status["keys"], status["quotas"]) == (False, 2, 1)
    assert status["usedBy"] == {"keys": ["k1", "k2"], "quotas": ["q"]}
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"], ready["observedGeneration"]) == (
        cond.READY,
        "True",
        cond.ACTIVE,
        3,
    )


def test_used_by_lists_a_bounded_number_of_names_but_counts_all():
    view = ObjectView.of({"metadata": {"namespace": "team", "name": "p", "generation": 1}, "spec": PRICES})
    status = desired_status(view, [f"k{i:05d}" for i in range(10_000)], [], NOW)
    assert status["keys"] == 10_000 and len(status["usedBy"]["keys"]) == USED_BY_SHOWN


def test_prices_the_operator_cannot_read_are_stalled():
    view = ObjectView.of(
        {
            "metadata": {"namespace": "team", "name": "p", "generation": 1},
            "spec": {"currency": "USD", "prices": [{"model": "x", "input": "lots", "output": 1}]},
        }
    )
    conditions = {c["type"]: c for c in desired_status(view, [], [], NOW)["conditions"]}
    assert conditions[cond.READY]["status"] == "False" and conditions[cond.STALLED]["status"] == "True"
    assert conditions[cond.STALLED]["reason"] == cond.PRICES_INVALID


async def test_reconcile_writes_once_then_nothing(kube):
    kube.add(PRICE_LISTS, "p", PRICES)
    assert await reconcile_price_list(ObjectView.of(kube.get(PRICE_LISTS, "p")), kube=kube, keys=[], quotas=[], now=NOW)
    assert not await reconcile_price_list(
        ObjectView.of(kube.get(PRICE_LISTS, "p")), kube=kube, keys=[], quotas=[], now=NOW
    )
    assert kube.get(PRICE_LISTS, "p")["status"]["observedGeneration"] == 1


async def test_runtime_reprices_users_only_when_the_spec_changes(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(PRICE_LISTS, "p", PRICES)
    index_price_list(rt, kube, "p")
    kube.add(QUOTAS, "q", {"priceListRef": "p"})
    index_quota(rt, kube, "q")
    kube.add(KEYS, "k", {"priceListRef": "p"})
    index_key(rt, kube, "k")
    await rt.price_list_event(kube.get(PRICE_LISTS, "p"), None)  # the initial listing: status only
    assert not [p for p in kube.patches if p[0] != PRICE_LISTS]
    status = kube.get(PRICE_LISTS, "p")["status"]
    assert (status["keys"], status["quotas"], status["usedBy"]) == (1, 1, {"keys": ["k"], "quotas": ["q"]})
    # our own status patch echoing back (same generation): nothing re-priced, nothing written
    patches = len(kube.patches)
    index_price_list(rt, kube, "p")
    await rt.price_list_event(kube.get(PRICE_LISTS, "p"), "MODIFIED")
    assert len(kube.patches) == patches
    # a new spec: its users are re-reconciled (the key gets its status written now)
    kube.update_spec(PRICE_LISTS, "p", {**PRICES, "default": {"input": 1, "output": 2}})
    index_price_list(rt, kube, "p")
    await rt.price_list_event(kube.get(PRICE_LISTS, "p"), "MODIFIED")
    assert {p[0] for p in kube.patches[patches:]} == {KEYS, QUOTAS, PRICE_LISTS}
    status = kube.get(PRICE_LISTS, "p")["status"]
    assert status["observedGeneration"] == 2 and status["pricesOtherModels"] is True


async def test_the_write_back_cycle_follows_who_names_it(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(PRICE_LISTS, "p", PRICES)
    index_price_list(rt, kube, "p")
    assert await rt.price_lists_once() == 1 and kube.get(PRICE_LISTS, "p")["status"]["keys"] == 0
    kube.add(KEYS, "k", {"priceListRef": "p"})
    index_key(rt, kube, "k")
    index_price_list(rt, kube, "p")
    assert await rt.price_lists_once() == 1 and kube.get(PRICE_LISTS, "p")["status"]["keys"] == 1
    index_price_list(rt, kube, "p")
    assert await rt.price_lists_once() == 0  # nothing changed: nothing written

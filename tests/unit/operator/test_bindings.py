"""spec.subjects -> bindings in Redis (fakeredis): one AtlasKey per subject, the later claimant in
conflict, releases on removal and deletion, ServiceAccount UIDs following the account."""

from __future__ import annotations

from datetime import datetime, timezone

from atlas_core import contract
from atlas_core.contract import TokenSubject
from atlas_operator import bindings
from atlas_operator import conditions as cond
from atlas_operator.bindings import Claimant, subjects_of
from atlas_operator.keys import reconcile_key
from atlas_operator.settings import KEYS

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
SA = TokenSubject("ServiceAccount", "batch-runner", "jobs")
ALICE = TokenSubject("User", "alice@example.com")


class Claims:
    """What the kopf index keys_by_subject would hold, and the ServiceAccount UIDs index."""

    def __init__(self) -> None:
        self.by_subject: dict[TokenSubject, list[Claimant]] = {}
        self.uids: dict[tuple[str, str], str] = {}

    def claim(self, ref: str, created: str, *subjects: TokenSubject, deleting: bool = False) -> None:
        for claimants in self.by_subject.values():
            claimants[:] = [c for c in claimants if c.ref != ref]
        for subject in subjects:
            self.by_subject.setdefault(subject, []).append(Claimant(created, ref, deleting))

    def of(self, subject: TokenSubject) -> list[Claimant]:
        return self.by_subject.get(subject, [])

    def uid(self, subject: TokenSubject) -> str | None:
        return self.uids.get((subject.namespace, subject.name))

    async def bind(self, redis, ref: str, *subjects: TokenSubject) -> bindings.Bound:
        return await bindings.bind(redis, ref, list(subjects), self.of, self.uid)


async def binding(redis, subject: TokenSubject) -> str | None:
    raw = await redis.hget(contract.IDENTITY_BINDINGS, subject.encode())
    return raw.decode() if raw else None


async def account_uid(redis, subject: TokenSubject) -> str | None:
    raw = await redis.hget(contract.IDENTITY_SERVICE_ACCOUNTS, subject.account_ref)
    return raw.decode() if raw else None


def test_subjects_resolve_the_service_account_namespace_and_drop_duplicates():
    spec = {
        "subjects": [
            {"kind": "ServiceAccount", "name": "runner"},
            {"kind": "ServiceAccount", "name": "runner", "namespace": "team"},
            {"kind": "ServiceAccount", "name": "runner", "namespace": "jobs"},
            {"kind": "User", "name": "alice"},
            {"kind": "Group", "name": "search"},
        ]
    }
    assert subjects_of("team", spec) == [
        TokenSubject("ServiceAccount", "runner", "team"),
        TokenSubject("ServiceAccount", "runner", "jobs"),
        TokenSubject("User", "alice"),
        TokenSubject("Group", "search"),
    ]
    assert [s.encode() for s in subjects_of("team", spec)] == [
        "ServiceAccount:team/runner",
        "ServiceAccount:jobs/runner",
        "User:alice",
        "Group:search",
    ]


def test_the_holder_keeps_a_subject_while_it_claims_it_else_the_earliest_claimant_gets_it():
    early, late = Claimant("2026-01-01T00:00:00Z", "a/early"), Claimant("2026-02-01T00:00:00Z", "b/late")
    assert bindings.holder([late, early], None) == "a/early"
    assert bindings.holder([late, early], "b/late") == "b/late"  # held: kept
    assert bindings.holder([late, early], "c/gone") == "a/early"  # holder no longer claims it
    assert bindings.holder([Claimant(early.created, early.ref, deleting=True), late], "a/early") == "b/late"
    assert bindings.holder([], None) is None


async def test_bind_publishes_the_subject_and_the_service_account_uid(redis):
    claims = Claims()
    claims.uids[("jobs", "batch-runner")] = "uid-1"
    claims.claim("team/search", "2026-01-01T00:00:00Z", SA, ALICE)
    bound = await claims.bind(redis, "team/search", SA, ALICE)
    assert bound.held == [SA, ALICE] and not bound.conflicts and bound.written and bound.problem is None
    assert await binding(redis, SA) == "team/search" and await binding(redis, ALICE) == "team/search"
    assert await account_uid(redis, SA) == "uid-1"
    again = await claims.bind(redis, "team/search", SA, ALICE)
    assert not again.written  # nothing differs: no write


async def test_a_later_claimant_is_in_conflict_and_takes_over_once_released(redis):
    claims = Claims()
    claims.claim("team/first", "2026-01-01T00:00:00Z", SA)
    await claims.bind(redis, "team/first", SA)
    claims.claim("other/second", "2026-03-01T00:00:00Z", SA)
    second = await claims.bind(redis, "other/second", SA)
    assert second.conflicts == [(SA, "team/first")] and not second.held
    assert "ServiceAccount jobs/batch-runner is bound by AtlasKey team/first" in second.problem
    assert await binding(redis, SA) == "team/first"

    claims.claim("team/first", "2026-01-01T00:00:00Z")  # removed from its spec
    first = await claims.bind(redis, "team/first")
    assert first.released == [SA] and await binding(redis, SA) is None
    second = await claims.bind(redis, "other/second", SA)
    assert second.held == [SA] and await binding(redis, SA) == "other/second"


async def test_an_earlier_key_adding_a_held_subject_does_not_take_it(redis):
    claims = Claims()
    claims.claim("b/newer", "2026-03-01T00:00:00Z", ALICE)
    await claims.bind(redis, "b/newer", ALICE)
    claims.claim("a/older", "2026-01-01T00:00:00Z", ALICE)  # an old key edited to claim it
    older = await claims.bind(redis, "a/older", ALICE)
    assert older.conflicts == [(ALICE, "b/newer")]


async def test_release_all_frees_only_what_the_key_still_holds(redis):
    claims = Claims()
    claims.uids[("jobs", "batch-runner")] = "uid-1"
    claims.claim("team/a", "2026-01-01T00:00:00Z", SA, ALICE)
    await claims.bind(redis, "team/a", SA, ALICE)
    await redis.hset(contract.IDENTITY_BINDINGS, ALICE.encode(), "team/b")  # taken over meanwhile
    released = await bindings.release_all(redis, "team/a")
    assert set(released) == {SA, ALICE}
    assert await binding(redis, SA) is None and await account_uid(redis, SA) is None
    assert await binding(redis, ALICE) == "team/b"


async def test_a_deleted_or_recreated_service_account_changes_its_published_uid(redis):
    claims = Claims()
    claims.uids[("jobs", "batch-runner")] = "uid-1"
    claims.claim("team/a", "2026-01-01T00:00:00Z", SA)
    await claims.bind(redis, "team/a", SA)
    assert await bindings.account_changed(redis, SA, None)
    assert await account_uid(redis, SA) is None
    assert await bindings.account_changed(redis, SA, "uid-2")
    assert await account_uid(redis, SA) == "uid-2"
    assert not await bindings.account_changed(redis, SA, "uid-2")
    unbound = TokenSubject("ServiceAccount", "someone-else", "jobs")
    assert not await bindings.account_changed(redis, unbound, "uid-9")
    assert await account_uid(redis, unbound) is None  # only bound accounts are published


async def test_a_bound_service_account_that_does_not_exist_has_no_uid(redis):
    claims = Claims()
    claims.claim("team/a", "2026-01-01T00:00:00Z", SA)
    await redis.hset(contract.IDENTITY_SERVICE_ACCOUNTS, SA.account_ref, "uid-old")
    await claims.bind(redis, "team/a", SA)
    assert await account_uid(redis, SA) is None


def test_unusable_subjects_say_why():
    def watches(ns):
        return ns == "team"

    assert bindings.unusable(SA, True, watches, 1).startswith("namespace 'jobs' is not one the operator watches")
    assert "not trusted" in bindings.unusable(SA, False, watches, 1)
    assert "no OIDC issuer is configured" in bindings.unusable(ALICE, True, watches, 0)
    assert bindings.unusable(TokenSubject("ServiceAccount", "x", "team"), True, watches, 0) is None
    assert bindings.unusable(ALICE, True, watches, 1) is None


async def test_self_healing_rewrites_bindings_uids_and_the_held_index(redis):
    claims = {
        SA: [Claimant("2026-02-01T00:00:00Z", "b/late"), Claimant("2026-01-01T00:00:00Z", "a/early")],
        ALICE: [Claimant("2026-01-01T00:00:00Z", "a/early", deleting=True)],
    }
    bound, uids = bindings.desired_bindings(claims, {}, lambda s: "uid-7")
    assert bound == {SA.encode(): "a/early"} and uids == {SA.account_ref: "uid-7"}
    for command in bindings.rewrite_commands(bound, uids):
        await redis.execute_command(*command)
    assert await binding(redis, SA) == "a/early" and await account_uid(redis, SA) == "uid-7"
    released = await bindings.release_all(redis, "a/early")  # the held index came back too
    assert released == [SA]


async def test_reconcile_shows_a_conflict_on_the_later_key_whose_secret_still_works(kube, redis):
    claims = Claims()
    kube.add(KEYS, "first", {"subjects": [{"kind": "User", "name": "alice@example.com"}]})
    kube.add(KEYS, "second", {"subjects": [{"kind": "User", "name": "alice@example.com"}]})
    claims.claim("team/first", "2026-01-01T00:00:00Z", ALICE)
    claims.claim("team/second", "2026-02-01T00:00:00Z", ALICE)

    async def binder(namespace, name, spec):
        return await bindings.bind(redis, f"{namespace}/{name}", subjects_of(namespace, spec), claims.of, claims.uid)

    for name in ("second", "first"):  # the later key reconciled first must not win
        await reconcile_key(
            kube.get(KEYS, name),
            kube=kube,
            redis=redis,
            quota_exists=lambda ns, q: False,
            now=NOW,
            bind_subjects=binder,
        )
    first = kube.get(KEYS, "first")["status"]["conditions"]
    second = kube.get(KEYS, "second")["status"]["conditions"]
    assert cond.find(first, cond.READY)["status"] == "True" and cond.find(first, cond.STALLED) is None
    ready, stalled = cond.find(second, cond.READY), cond.find(second, cond.STALLED)
    assert (ready["status"], ready["reason"]) == ("False", cond.SUBJECT_CONFLICT)
    assert (stalled["status"], stalled["reason"]) == ("True", cond.SUBJECT_CONFLICT)  # kstatus: Failed at once
    assert cond.find(second, cond.SERVING)["status"] == "True"  # its Secret's key still works
    assert "User 'alice@example.com' is bound by AtlasKey team/first" in stalled["message"]
    assert "the key's Secret and its other subjects work as declared" in stalled["message"]
    assert [e[1:3] for e in kube.events if e[0] == "second"][-1] == ("Warning", cond.SUBJECT_CONFLICT)
    assert await binding(redis, ALICE) == "team/first"
    second_key = kube.secret_value("second-api-key")
    assert await redis.get(contract.key_config_key(contract.hash_api_key(second_key))) is not None

"""spec.subjects -> which AtlasKey each token subject authenticates as, published into Redis
(contract.IDENTITY_BINDINGS, and IDENTITY_SERVICE_ACCOUNTS for the bound ServiceAccounts' UIDs).

One AtlasKey per subject, never ambiguous. When several claim one, the one that holds it keeps
it for as long as it claims it; an unheld subject goes to the earliest created claimant (then by
namespace/name). Every other claimant is in conflict: it serves its Secret's key and its other
subjects, and shows the conflict (a configuration error) until the holder lets go, when it is
reconciled again and takes the subject over.

``index:key-subjects`` (operator-only) remembers what each AtlasKey holds, so that a subject
removed from its spec, or an AtlasKey deleted, releases exactly what it held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from atlas_core import contract
from atlas_core.contract import TokenSubject

HELD_INDEX = contract.CONFIG_PREFIX + "index:key-subjects"


@dataclass(frozen=True, order=True)
class Claimant:
    """An AtlasKey naming a subject, as the kopf index keeps it."""

    created: str  # metadata.creationTimestamp (RFC 3339 in UTC: sorts as text)
    ref: str  # namespace/name
    deleting: bool = False


def subjects_of(namespace: str, spec: Mapping[str, Any] | None) -> list[TokenSubject]:
    """spec.subjects with each ServiceAccount's namespace resolved, without duplicates."""
    out: list[TokenSubject] = []
    for entry in (spec or {}).get("subjects") or ():
        kind, name = entry.get("kind"), entry.get("name")
        if kind not in contract.SUBJECT_KINDS or not name:
            continue  # the CRD refuses these; an object stored before it did is not ours to guess
        subject = TokenSubject(kind, name, (entry.get("namespace") or namespace) if kind == "ServiceAccount" else "")
        if subject not in out:
            out.append(subject)
    return out


def holder(claimants: Iterable[Claimant], current: str | None) -> str | None:
    """Which claimant a subject binds: its current holder while it still claims it, else the
    earliest created live claimant; None when no live AtlasKey claims it."""
    live = sorted(c for c in claimants if not c.deleting)
    if current is not None and any(c.ref == current for c in live):
        return current
    return live[0].ref if live else None


@dataclass
class Bound:
    """What binding one AtlasKey's subjects did."""

    held: list[TokenSubject] = field(default_factory=list)
    conflicts: list[tuple[TokenSubject, str]] = field(default_factory=list)  # (subject, AtlasKey holding it)
    released: list[TokenSubject] = field(default_factory=list)  # held before, not any more
    unusable: list[tuple[TokenSubject, str]] = field(default_factory=list)  # (subject, why no token can match it)
    written: bool = False

    @property
    def problem(self) -> str | None:
        """What is wrong with spec.subjects (a configuration error), or None."""
        parts = [f"subject {_shown(s)} is bound by AtlasKey {ref}, which claimed it first" for s, ref in self.conflicts]
        parts += [f"subject {_shown(s)}: {why}" for s, why in self.unusable]
        return "; ".join(parts) or None


def unusable(
    subject: TokenSubject, service_account_tokens: bool, watches: Callable[[str], bool], oidc_issuers: int
) -> str | None:
    """Why no token can ever authenticate as ``subject`` with this operator's settings, or None."""
    if subject.kind == "ServiceAccount":
        if not service_account_tokens:
            return "ServiceAccount tokens are not trusted (workloadIdentity.serviceAccountTokens is off)"
        if not watches(subject.namespace):
            return f"namespace {subject.namespace!r} is not one the operator watches (watchNamespaces)"
    elif not oidc_issuers:
        return f"no OIDC issuer is configured (workloadIdentity.jwt) whose tokens could name a {subject.kind}"
    return None


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _held(raw: Any) -> list[TokenSubject]:
    text = _text(raw)
    out = []
    for line in (text or "").split("\n"):
        try:
            out.append(TokenSubject.decode(line))
        except ValueError:
            continue
    return out


async def bind(
    redis: Any,
    ref: str,
    subjects: list[TokenSubject],
    claimants_of: Callable[[TokenSubject], Iterable[Claimant]],
    uid_of: Callable[[TokenSubject], str | None],
) -> Bound:
    """Make Redis bind to ``ref`` each of ``subjects`` it holds (and only those), with the UIDs
    of its ServiceAccounts; writes only a difference. ``subjects`` empty: release everything."""
    outcome = Bound()
    encoded = [s.encode() for s in subjects]
    pipe = redis.pipeline(transaction=False)
    pipe.hget(HELD_INDEX, ref)
    if encoded:
        pipe.hmget(contract.IDENTITY_BINDINGS, encoded)
    replies = await pipe.execute()
    before = _held(replies[0])
    owners = [_text(o) for o in replies[1]] if encoded else []
    for subject, owner in zip(subjects, owners):
        winner = holder(claimants_of(subject), owner)
        if winner in (ref, None):  # None: the index has not seen this AtlasKey yet
            outcome.held.append(subject)
        else:
            outcome.conflicts.append((subject, winner))
    outcome.released = [s for s in before if s not in outcome.held]
    outcome.written = await _write(redis, ref, outcome, before, dict(zip(subjects, owners)), uid_of)
    return outcome


async def _write(
    redis: Any,
    ref: str,
    outcome: Bound,
    before: list[TokenSubject],
    owners: dict[TokenSubject, str | None],
    uid_of: Callable[[TokenSubject], str | None],
) -> bool:
    accounts = [s for s in outcome.held if s.kind == "ServiceAccount"]
    current_uids = (
        await redis.hmget(contract.IDENTITY_SERVICE_ACCOUNTS, [s.account_ref for s in accounts]) if accounts else []
    )
    set_uids, drop_uids = {}, []
    for subject, current in zip(accounts, current_uids):
        uid = uid_of(subject)
        if uid is None and current is not None:
            drop_uids.append(subject.account_ref)  # deleted: its tokens are refused
        elif uid is not None and _text(current) != uid:
            set_uids[subject.account_ref] = uid
    bindings = {s.encode(): ref for s in outcome.held if owners.get(s) != ref}
    if not (bindings or set_uids or drop_uids or outcome.released or before != outcome.held):
        return False
    tx = redis.pipeline(transaction=True)
    if bindings:
        tx.hset(contract.IDENTITY_BINDINGS, mapping=bindings)
    if set_uids:
        tx.hset(contract.IDENTITY_SERVICE_ACCOUNTS, mapping=set_uids)
    if drop_uids:
        tx.hdel(contract.IDENTITY_SERVICE_ACCOUNTS, *drop_uids)
    if outcome.held:
        tx.hset(HELD_INDEX, ref, "\n".join(s.encode() for s in outcome.held))
    else:
        tx.hdel(HELD_INDEX, ref)
    if outcome.released:  # only what is still ours: a subject another AtlasKey took over stays its own
        args = [a for s in outcome.released for a in (s.encode(), s.account_ref if s.kind == "ServiceAccount" else "")]
        tx.eval(_UNBIND_IF_HELD, 2, contract.IDENTITY_BINDINGS, contract.IDENTITY_SERVICE_ACCOUNTS, ref, *args)
    await tx.execute()
    return True


# ARGV: the AtlasKey, then (binding field, ServiceAccount field or "") per released subject
_UNBIND_IF_HELD = """
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    if ARGV[i + 1] ~= '' then redis.call('HDEL', KEYS[2], ARGV[i + 1]) end
  end
end
return 0
"""


async def release_all(redis: Any, ref: str) -> list[TokenSubject]:
    """A deleted AtlasKey lets go of everything it held; returns what that was."""
    outcome = await bind(redis, ref, [], lambda s: (), lambda s: None)
    return outcome.released


async def account_changed(redis: Any, subject: TokenSubject, uid: str | None) -> bool:
    """A bound ServiceAccount was created, deleted or recreated: publish its UID now (or drop
    it), so that a token of the account it was is refused."""
    if _text(await redis.hget(contract.IDENTITY_BINDINGS, subject.encode())) is None:
        return False
    current = _text(await redis.hget(contract.IDENTITY_SERVICE_ACCOUNTS, subject.account_ref))
    if current == uid:
        return False
    if uid is None:
        await redis.hdel(contract.IDENTITY_SERVICE_ACCOUNTS, subject.account_ref)
    else:
        await redis.hset(contract.IDENTITY_SERVICE_ACCOUNTS, subject.account_ref, uid)
    return True


def _shown(subject: TokenSubject) -> str:
    if subject.kind == "ServiceAccount":
        return f"ServiceAccount {subject.namespace}/{subject.name}"
    return f"{subject.kind} {subject.name!r}"


def desired_bindings(
    claims: Mapping[TokenSubject, Iterable[Claimant]],
    current: Mapping[str, str],
    uid_of: Callable[[TokenSubject], str | None],
) -> tuple[dict[str, str], dict[str, str]]:
    """Every binding (and bound ServiceAccount UID) the indexes imply, for self-healing after
    Redis lost its data: ``current`` (what was held, when known) keeps each holder."""
    bindings: dict[str, str] = {}
    uids: dict[str, str] = {}
    for subject, claimants in claims.items():
        winner = holder(claimants, current.get(subject.encode()))
        if winner is None:
            continue
        bindings[subject.encode()] = winner
        uid = uid_of(subject) if subject.kind == "ServiceAccount" else None
        if uid is not None:
            uids[subject.account_ref] = uid
    return bindings, uids


def rewrite_commands(bound: Mapping[str, str], uids: Mapping[str, str]) -> list[tuple[str, ...]]:
    """The Redis commands writing :func:`desired_bindings`' result, with each holder's
    ``index:key-subjects`` entry (self-healing: Redis lost its data)."""
    held: dict[str, list[str]] = {}
    for subject, ref in sorted(bound.items()):
        held.setdefault(ref, []).append(subject)
    commands: list[tuple[str, ...]] = []
    for key, mapping in (
        (contract.IDENTITY_BINDINGS, bound),
        (contract.IDENTITY_SERVICE_ACCOUNTS, uids),
        (HELD_INDEX, {ref: "\n".join(subjects) for ref, subjects in held.items()}),
    ):
        if mapping:
            commands.append(("HSET", key, *(part for item in sorted(mapping.items()) for part in item)))
    return commands

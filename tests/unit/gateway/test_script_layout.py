"""The Lua scripts, ledger/script_args.py and the contract agree: the usage-hash field names the scripts
write are the contract's (Lua keeps them as literals), and the KEYS script_args.py builds are where
each script reads them."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from importlib import resources

from atlas_core import contract
from atlas_gateway.ledger.script_args import ScriptCalls
from tests.unit.gateway.conftest import make_principal

# per script: the KEYS positions (per subject, 1-based after the subject's offset `k`) of its
# day and month usage hashes, and the local names the script gives them
USAGE_KEYS = {
    "admit.lua": ({"KEYS[k + 5]", "dk"}, {"KEYS[k + 6]"}),
    "settle.lua": ({"KEYS[k + 4]"}, {"KEYS[k + 5]"}),
    "undo.lua": ({"KEYS[k + 4]"}, {"KEYS[k + 5]"}),
}
HASH_CALL = re.compile(r"redis\.call\('(H[A-Z]+)', (KEYS\[k \+ \d\]|\w+), '(\w+)'")


def fields_used(script: str) -> tuple[set[str], set[str]]:
    source = resources.files("atlas_gateway.ledger").joinpath(script).read_text()
    day_keys, month_keys = USAGE_KEYS[script]
    day, month = set(), set()
    for _, key, field in HASH_CALL.findall(source):
        if key in day_keys:
            day.add(field)
        elif key in month_keys:
            month.add(field)
    return day, month


def test_the_scripts_write_exactly_the_contracts_usage_fields():
    day, month = set(), set()
    for script in USAGE_KEYS:
        d, m = fields_used(script)
        assert d <= set(contract.DAY_USAGE_FIELDS), (script, d)
        assert m <= set(contract.MONTH_USAGE_FIELDS), (script, m)
        day |= d
        month |= m
    # and every field the contract (so the operator) reads is one a script writes
    assert day == set(contract.DAY_USAGE_FIELDS)
    assert month == set(contract.MONTH_USAGE_FIELDS)


def test_parse_usage_reads_the_contract_fields():
    day = {
        contract.USAGE_SETTLED.encode(): b"7",
        contract.USAGE_REQUESTS.encode(): b"2",
        contract.USAGE_LAST.encode(): b"1700000000000",
        contract.USAGE_COST.encode(): b"5",
    }
    month = {contract.USAGE_SETTLED.encode(): b"70", contract.USAGE_COST.encode(): b"50"}
    usage = contract.parse_usage(day, month, datetime.now(timezone.utc))
    assert (usage.tokens_today, usage.requests_today, usage.tokens_this_month) == (7, 2, 70)
    assert (usage.cost_today, usage.cost_this_month, usage.last_request_ms) == (5, 50, 1700000000000)


def test_calls_put_the_usage_hashes_where_the_scripts_read_them():
    principal = make_principal(contract.Limits(tokens_per_day=10), contract.Limits(tokens_per_month=10))
    calls = ScriptCalls(60)
    admit, settle = calls.shapes(principal, "2026-12-01", "2026-12")
    undo = calls.undo_shape(principal, "2026-12-01", "2026-12")
    for i, subject in enumerate(principal.subjects):
        day = contract.day_usage_key(subject, "2026-12-01", principal.tag).encode()
        month = contract.month_usage_key(subject, "2026-12", principal.tag).encode()
        assert admit.keys[i * 8 + 4 : i * 8 + 6] == [day, month]  # KEYS[k + 5], KEYS[k + 6]
        assert settle.keys[i * 7 + 3 : i * 7 + 5] == [day, month]  # KEYS[k + 4], KEYS[k + 5]
        assert undo.keys[i * 7 + 3 : i * 7 + 5] == [day, month]
        totals = contract.lease_sum_key(subject, principal.tag).encode()
        assert admit.keys[i * 8 + 7] == settle.keys[i * 7 + 6] == undo.keys[i * 7 + 6] == totals
    tombstones = contract.undone_key(principal.subjects[0], principal.tag).encode()
    assert admit.keys[-1] == undo.keys[-1] == tombstones  # KEYS[n*8+1] / KEYS[n*7+1]
    # ARGV: admit's per-request part, then its fixed part (lease TTL, subjects, day TTL, month TTL,
    # then PER per subject from BASE on), as admit.lua declares them
    source = resources.files("atlas_gateway.ledger").joinpath("admit.lua").read_text()
    base, per = (int(re.search(rf"^local {name} = (\d+)$", source, re.M).group(1)) for name in ("BASE", "PER"))
    dynamic = calls.admit_args("r", 1, 2, 3, 1, 0, (b"0", b"0"), True)
    assert base == len(dynamic) + 4 and re.search(
        rf"^local lease_ttl = tonumber\(ARGV\[{len(dynamic) + 1}\]\)$", source, re.M
    )
    assert admit.static[:2] == (b"60000", b"2") and len(admit.static) == 4 + 2 * per
    assert settle.static[0] == b"2" and len(settle.static) == 3 + 2 * 2
    assert undo.static == (*settle.static, b"60000")  # + the tombstone TTL
    assert len(calls.settle_args("r", 1, 2, (b"0", b"0"))) == 5

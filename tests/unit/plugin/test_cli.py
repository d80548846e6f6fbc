"""The plugin's argument handling, tables and rotation report (no API server: tests/cluster/plugin
runs it through kubectl against a real one)."""

from __future__ import annotations

import pytest

from atlas_kubectl import cli, keys, table


def test_connection_flags_work_before_and_after_the_subcommand():
    args = cli.parser().parse_args(["-n", "before", "usage", "--context", "c"])
    assert (args.namespace, args.context) == ("before", "c")
    args = cli.parser().parse_args(["usage", "-n", "after", "-A", "--sort-by", "percent"])
    assert (args.namespace, args.all_namespaces, args.sort_by) == ("after", True, "percent")
    args = cli.parser().parse_args(["key", "rotate", "k", "--wait=false", "--timeout", "2m"])
    assert (args.name, args.wait, args.timeout, args.force) == ("k", False, 120.0, False)


def test_an_unknown_sort_column_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parser().parse_args(["usage", "--sort-by", "colour"])
    assert exit_.value.code == 2
    assert "invalid choice: 'colour'" in capsys.readouterr().err


def test_tables_look_like_kubectl_get():
    out = table.render(["NAME", "USED%"], [["a-long-name", "1.0%"], ["b", None]])
    assert out.splitlines() == ["NAME          USED%", "a-long-name   1.0%", "b             <none>"]
    assert table.render(["NAME"], [["x"]], no_headers=True) == "x"


@pytest.mark.parametrize("grace,expect", [("10m", "keeps working for 10m"), ("", "refused as soon as")])
def test_the_rotation_report_says_what_happens_to_the_old_key(grace, expect):
    report = keys.Rotation("k", "k-api-key", "aaaaaaaa", "bbbbbbbb", grace, labelled=False).report()
    assert "key aaaaaaaa replaced by bbbbbbbb" in report and expect in report


def test_the_report_after_waiting_names_the_grace_deadline_from_status():
    status = {"keyId": "bbbbbbbb", "previousKey": {"keyId": "aaaaaaaa", "expiresAt": "2026-11-27T10:10:00Z"}}
    report = keys.Rotation("k", "k-api-key", "aaaaaaaa", "bbbbbbbb", "10m", False, status).report()
    assert "accepts both until 2026-11-27T10:10:00Z (rotationGracePeriod 10m)" in report
    report = keys.Rotation("k", "k-api-key", "aaaaaaaa", "bbbbbbbb", "", False, {"keyId": "bbbbbbbb"}).report()
    assert "accepts only bbbbbbbb now (no rotationGracePeriod)" in report

"""The packages' import rules (.importlinter at the repository root, one line each), checked
with import-linter as kopf checks its own: a change that makes the ledger read request bodies,
metering do I/O or two modules import each other fails here, naming the import."""

from __future__ import annotations

from pathlib import Path

from importlinter import cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_import_rule_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # import-linter resolves the packages from the installed checkout
    status = cli.lint_imports(config_filename=str(REPO_ROOT / ".importlinter"), cache_dir=str(tmp_path), no_logo=True)
    report = capsys.readouterr().out
    assert status == cli.EXIT_STATUS_SUCCESS, report
    assert "0 broken" in report and " kept" in report


def test_the_rules_cover_every_gateway_package():
    """A new package of the gateway gets its own rule (and its place among the layers)."""
    config = (REPO_ROOT / ".importlinter").read_text()
    gateway = REPO_ROOT / "gateway" / "atlas_gateway"
    packages = sorted(p.name for p in gateway.iterdir() if (p / "__init__.py").is_file())
    assert packages, "no packages found"
    for package in packages:
        assert f"[importlinter:contract:{package}]" in config, f"no rule for atlas_gateway.{package}"
    modules = sorted(p.stem for p in gateway.glob("*.py") if p.stem != "__init__")
    layers = config.split("[importlinter:contract:gateway-layers]")[1].split("[importlinter:")[0]
    for name in packages + modules:
        assert any(name in line.split() for line in layers.splitlines() if not line.startswith("name")), name

"""Helpers for the chart tier: the built helm, rendering charts/atlas, parsing manifests.

helm runs with private HOME-style dirs (no repo config or cache of the user leaks in) and
without any cluster unless a test hands it a kubeconfig.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

from atlas_devstack.tools import REPO_ROOT, ToolNotFound, find_tool
from tests.fixtures.ci import in_ci

CHART = REPO_ROOT / "charts" / "atlas"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "atlas"
RELEASE_NAMESPACE = "atlas-system"


def require_tool(name: str) -> Path:
    """The built binary, or skip (fail under CI) telling how to build it."""
    try:
        return find_tool(name)
    except ToolNotFound as exc:
        msg = f"{exc} (run `make tools`)"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


class Helm:
    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        else:
            env.pop("KUBECONFIG", None)
        res = subprocess.run(
            [str(self.binary), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr}\n{res.stdout[-2000:]}"
            )
        return res

    def template(
        self,
        *values_files: Path,
        sets: Iterable[str] = (),
        namespace: str = RELEASE_NAMESPACE,
        release: str = RELEASE,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        args = ["template", release, str(CHART), "--namespace", namespace]
        for f in values_files:
            args += ["--values", str(f)]
        for s in sets:
            args += ["--set", s]
        return self.run(*args, check=check)

    def render(
        self, *values_files: Path, sets: Iterable[str] = (), namespace: str = RELEASE_NAMESPACE, release: str = RELEASE
    ) -> "Manifests":
        return Manifests.parse(self.template(*values_files, sets=sets, namespace=namespace, release=release).stdout)


class Manifests(list):
    """The rendered objects, with lookups by kind (and name)."""

    @classmethod
    def parse(cls, text: str) -> "Manifests":
        return cls(doc for doc in yaml.safe_load_all(text) if doc)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [o for o in self.of(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self}

    def dump(self) -> str:
        return yaml.safe_dump_all(list(self), sort_keys=False)


def ci_values(name: str) -> Path:
    path = CHART / "ci" / f"{name}-values.yaml"
    assert path.is_file(), path
    return path

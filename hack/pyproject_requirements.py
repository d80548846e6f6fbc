"""Print the requirements one Atlas image installs, read from pyproject.toml: the build system's
(setuptools, wheel), the base dependencies and the named extras. Used by the Dockerfile so each
image's dependency layer depends on pyproject.toml alone and survives source edits.

    python hack/pyproject_requirements.py gateway > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    doc = tomllib.loads(pyproject.read_text())
    project = doc["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    found = list(doc["build-system"]["requires"]) + list(project["dependencies"])
    for extra in extras:
        found += optional[extra]
    return found


if __name__ == "__main__":
    print("\n".join(requirements(Path("pyproject.toml"), sys.argv[1:])))

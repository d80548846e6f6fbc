"""The container images, checked without a Docker engine: parse the Dockerfiles, check the
rules they must follow, and build the wheel their install step builds from the same context."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from atlas_devstack.tools import REPO_ROOT

IMAGES = {  # Dockerfile -> the module its ENTRYPOINT runs
    "gateway/Dockerfile": "atlas_gateway",
    "operator/Dockerfile": "atlas_operator",
}
PINNED_PYTHON = re.compile(r"^python:3\.\d+\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def stages(instrs):
    """Split at FROM: [(from_args, [instructions...]), ...]; ARGs before the first FROM kept apart."""
    result, current = [], None
    for op, args in instrs:
        if op == "FROM":
            current = (args, [])
            result.append(current)
        elif current is not None:
            current[1].append((op, args))
    return result


def global_args(instrs) -> dict[str, str]:
    found = {}
    for op, args in instrs:
        if op == "FROM":
            break
        if op == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            found[key] = value
    return found


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent dir) decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pat == "**" or any(re.fullmatch(regex, c) for c in candidates) or \
                (pat.startswith("**/") and any(re.fullmatch(fnmatch.translate(pat[3:]), p) for p in parts)):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_rules(dockerfile):
    instrs = instructions(REPO_ROOT / dockerfile)
    args = global_args(instrs)
    all_stages = stages(instrs)
    assert len(all_stages) >= 2, "multi-stage: a build stage and a runtime stage"

    # Every base is the same pinned slim Python (never `latest`, never an unpinned tag).
    for from_args, _ in all_stages:
        image = from_args.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        assert "latest" not in image
        assert PINNED_PYTHON.match(image), f"{dockerfile}: base {image!r} is not an exact python x.y.z-slim tag"

    final_from, final = all_stages[-1]
    final_ops = [op for op, _ in final]
    # Nothing installs or compiles in the runtime stage; it only copies the venv from the build.
    runs = [a for op, a in final if op == "RUN"]
    assert not runs, f"{dockerfile}: RUN in the final stage: {runs}"
    copies = [a for op, a in final if op == "COPY"]
    assert copies and all(a.startswith("--from=build ") for a in copies), copies

    # Non-root numeric USER, set before the entrypoint.
    users = [a for op, a in final if op == "USER"]
    assert users, f"{dockerfile}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0)), users[-1]
    assert final_ops.index("USER") < final_ops.index("ENTRYPOINT")

    # The entrypoint runs the module the chart expects, and that module exists.
    entry = [a for op, a in final if op == "ENTRYPOINT"][-1]
    assert entry == f'["python", "-m", "{IMAGES[dockerfile]}"]', entry
    package_dir = {"atlas_gateway": "gateway", "atlas_operator": "operator"}[IMAGES[dockerfile]]
    assert (REPO_ROOT / package_dir / IMAGES[dockerfile] / "__main__.py").is_file(), \
        f"{IMAGES[dockerfile]}/__main__.py is missing"

    # The build stage installs non-editable into /opt/atlas and drops pip from the result.
    build_runs = " ".join(a for op, a in all_stages[0][1] if op == "RUN")
    assert "pip install" in build_runs and " -e " not in build_runs
    assert "pip uninstall -y pip" in build_runs


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_copy_sources_exist_and_survive_dockerignore(dockerfile):
    patterns = dockerignore_patterns()
    for op, args in instructions(REPO_ROOT / dockerfile):
        if op != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for src in sources:
            path = REPO_ROOT / src
            assert path.exists(), f"{dockerfile}: COPY source {src} does not exist"
            rel = src.rstrip("/")
            assert not dockerignore_excludes(rel, patterns), f"{src} is excluded by .dockerignore"
    # ...and what must stay out of the context does.
    for private in (".venv/bin/python", "bin/helm", ".dev/env", "tests/conftest.py",
                    "gateway/atlas_gateway/__pycache__/x.pyc", ".git/config"):
        assert dockerignore_excludes(private, patterns), f"{private} would be sent to the daemon"


def _build_context(dest: Path) -> Path:
    """Copy what the Dockerfiles COPY, honouring .dockerignore, into dest."""
    patterns = dockerignore_patterns()
    for top in ("pyproject.toml", "README.md", "core", "gateway", "operator", "devstack"):
        src = REPO_ROOT / top
        files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(REPO_ROOT).as_posix()
            if dockerignore_excludes(rel, patterns):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / rel)
    return dest


def test_install_step_builds_a_wheel_with_both_entrypoints(tmp_path):
    """`pip install .` in the build stage = build a wheel from the filtered context."""
    context = _build_context(tmp_path / "context")
    assert (context / "README.md").is_file(), "pyproject.toml's readme README.md must exist"
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(wheels), str(context)],
        capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = wheels.glob("atlas-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("atlas_gateway/__main__.py", "atlas_operator/__main__.py", "atlas_core/contract.py"):
        assert module in names, f"{module} missing from the wheel"
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "atlas-gateway = atlas_gateway.__main__:main" in text
    assert "atlas-operator = atlas_operator.__main__:main" in text

"""The container images, checked without a Docker engine: parse the Dockerfile, check the rules
its targets must follow, and build the wheels their install steps build from the same context.
tests/images/ builds the images and runs them as the chart runs them."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from atlas_devstack.tools import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
# target -> (the module its ENTRYPOINT runs, the pyproject extra it installs, the package
# folders its build stage copies). gateway/operator are product images; mock-upstream is the
# deploy tier's test fixture.
TARGETS = {
    "gateway": ("atlas_gateway", "gateway", {"core", "gateway"}),
    "operator": ("atlas_operator", "operator", {"core", "operator"}),
    "mock-upstream": ("atlas_devstack.mock_upstream", "mock-upstream", {"devstack"}),
}
PRODUCT_TARGETS = ("gateway", "operator")
PACKAGE_DIRS = {
    "core": "atlas_core",
    "gateway": "atlas_gateway",
    "operator": "atlas_operator",
    "plugin": "atlas_kubectl",
    "devstack": "atlas_devstack",
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


def stages(instrs) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Split at FROM: {stage name: (base, [instructions...])}, in file order; ARGs before the
    first FROM kept apart. Unnamed stages are named by their index."""
    result: dict[str, tuple[str, list]] = {}
    for op, args in instrs:
        if op == "FROM":
            words = args.split()
            name = words[words.index("AS") + 1] if "AS" in words else str(len(result))
            result[name] = (words[0], [])
        elif result:
            result[next(reversed(result))][1].append((op, args))
    return result


def lineage(all_stages, name: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [name]
    while all_stages[chain[-1]][0] in all_stages:
        chain.append(all_stages[chain[-1]][0])
    return chain


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
        if (
            pat == "**"
            or any(re.fullmatch(regex, c) for c in candidates)
            or (pat.startswith("**/") and any(re.fullmatch(fnmatch.translate(pat[3:]), p) for p in parts))
        ):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_every_base_is_the_pinned_python_or_an_earlier_stage():
    instrs = instructions(DOCKERFILE)
    args = global_args(instrs)
    all_stages = stages(instrs)
    seen = set()
    for name, (base, _) in all_stages.items():
        if base not in seen:
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
            assert "latest" not in image
            assert PINNED_PYTHON.match(image), f"stage {name}: base {image!r} is not an exact python x.y.z-slim tag"
        seen.add(name)
    # A `# syntax=` directive makes BuildKit pull its frontend from Docker Hub: offline builds fail.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M | re.I)
    # The last stage is what a plain `docker build .` makes: the gateway.
    assert list(all_stages)[-1] == "gateway"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_rules(target):
    module, extra, copied = TARGETS[target]
    all_stages = stages(instructions(DOCKERFILE))
    assert target in all_stages, f"no `FROM ... AS {target}` stage"
    chain = lineage(all_stages, target)
    final = [instr for name in chain for instr in all_stages[name][1]]
    final_ops = [op for op, _ in all_stages[target][1]]
    build = f"{target}-build"

    # Nothing installs or compiles in the runtime stages; they only copy the venv from the build.
    runs = [a for op, a in final if op == "RUN"]
    assert not runs, f"{target}: RUN in the runtime stages {chain}: {runs}"
    copies = [a for op, a in final if op == "COPY"]
    assert copies == [f"--from={build} /opt/atlas /opt/atlas"], copies

    # Non-root numeric USER, set before the entrypoint; HOME writable without a passwd entry.
    users = [a for op, a in all_stages[target][1] if op == "USER"]
    assert users, f"{target}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0)), users[-1]
    assert final_ops.index("USER") < final_ops.index("ENTRYPOINT")
    env = " ".join(a for op, a in final if op == "ENV")
    assert re.search(r"\bHOME=/tmp\b", env), "HOME must point at the chart's writable /tmp volume"

    # The entrypoint runs the module the chart (or the deploy tier) expects, and it exists.
    entry = [a for op, a in all_stages[target][1] if op == "ENTRYPOINT"][-1]
    assert entry == f'["python", "-m", "{module}"]', entry
    top = module.split(".")[0]
    folder = next(d for d, pkg in PACKAGE_DIRS.items() if pkg == top)
    path = REPO_ROOT / folder / Path(*module.split("."))
    assert (path / "__main__.py").is_file() or path.with_suffix(".py").is_file(), f"{module} is missing"

    # Its build stage installs its own extra, non-editable, into /opt/atlas, copies only the
    # package folders its process runs, and drops pip from the result.
    assert build in all_stages, f"no `FROM ... AS {build}` stage"
    build_instrs = [i for name in lineage(all_stages, build) for i in all_stages[name][1]]
    build_runs = " ".join(a for op, a in build_instrs if op == "RUN")
    assert f"pyproject_requirements.py {extra} " in build_runs
    assert "pip install" in build_runs and " -e " not in build_runs
    assert "pip uninstall -y pip" in build_runs
    sources = {a.split()[0].rstrip("/") for op, a in build_instrs if op == "COPY" and not a.startswith("--from=")}
    assert sources & set(PACKAGE_DIRS) == copied, sources
    if target in PRODUCT_TARGETS:
        assert not sources & {"devstack", "benchmarks", "tests"}, sources


def test_each_image_extra_exists_and_the_base_dependencies_stay_small():
    doc = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    optional = doc["project"]["optional-dependencies"]
    for _module, extra, _copied in TARGETS.values():
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
    base = " ".join(doc["project"]["dependencies"])
    for heavy in ("fastapi", "uvicorn", "kopf", "kubernetes", "aiohttp", "pyyaml", "openai", "httpx"):
        assert heavy not in base, f"{heavy} in the base dependencies: every image would install it"
    assert "kopf" not in " ".join(optional["gateway"]) and "fastapi" not in " ".join(optional["operator"])
    assert "fastapi" not in " ".join(optional["gateway"])  # the gateway runs no framework (docs/gateway.md)
    # `make venv` (.[dev]) still installs everything.
    assert any(
        r.replace(" ", "").startswith("atlas[") and all(e in r for e in ("gateway", "operator", "mock-upstream"))
        for r in optional["dev"]
    )


def test_copy_sources_exist_and_survive_dockerignore():
    patterns = dockerignore_patterns()
    for op, args in instructions(DOCKERFILE):
        if op != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for src in sources:
            path = REPO_ROOT / src
            assert path.exists(), f"COPY source {src} does not exist"
            rel = src.rstrip("/")
            assert not dockerignore_excludes(rel, patterns), f"{src} is excluded by .dockerignore"
    # ...and what must stay out of the context does.
    for private in (
        ".venv/bin/python",
        "bin/helm",
        ".dev/env",
        ".images/gateway.tar",
        "tests/conftest.py",
        "benchmarks/__main__.py",
        "hack/images.sh",
        "gateway/atlas_gateway/__pycache__/x.pyc",
        ".git/config",
    ):
        assert dockerignore_excludes(private, patterns), f"{private} would be sent to the daemon"


def _build_context(dest: Path, folders) -> Path:
    """Copy what a build stage COPYs (pyproject.toml, README.md and the given package folders),
    honouring .dockerignore, into dest."""
    patterns = dockerignore_patterns()
    for top in ("pyproject.toml", "README.md", *folders):
        src = REPO_ROOT / top
        files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(REPO_ROOT).as_posix()
            if dockerignore_excludes(rel, patterns):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / rel)
    return dest


def _wheel(tmp_path: Path, folders) -> zipfile.ZipFile:
    context = _build_context(tmp_path / "context", folders)
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(context)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = wheels.glob("atlas-*.whl")
    return zipfile.ZipFile(wheel)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_install_step_builds_a_wheel_of_only_what_the_target_copies(target, tmp_path):
    """`pip install .` in a build stage = build a wheel from the folders that stage copies."""
    module, _extra, copied = TARGETS[target]
    names = set(_wheel(tmp_path, sorted(copied)).namelist())
    packages = {n.split("/")[0] for n in names if not n.startswith("atlas-")}
    assert packages == {PACKAGE_DIRS[d] for d in copied}, packages
    assert f"{module.replace('.', '/')}{'/__main__.py' if '.' not in module else '.py'}" in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    if target == "gateway":
        assert {
            "atlas_gateway/ledger/admit.lua",
            "atlas_gateway/ledger/settle.lua",
            "atlas_gateway/shedding/inflight.lua",
        } <= names, "Lua scripts missing"


def test_the_full_checkout_builds_a_wheel_with_every_package_and_every_entrypoint(tmp_path):
    wheel = _wheel(tmp_path, sorted(PACKAGE_DIRS))
    names = set(wheel.namelist())
    for module in (
        "atlas_gateway/__main__.py",
        "atlas_operator/__main__.py",
        "atlas_core/contract.py",
        "atlas_kubectl/cli.py",
        "atlas_devstack/mock_upstream.py",
    ):
        assert module in names, f"{module} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = wheel.read(entry_points).decode()
    assert "atlas-gateway = atlas_gateway.__main__:main" in text
    assert "atlas-operator = atlas_operator.__main__:main" in text
    assert "kubectl-atlas = atlas_kubectl.cli:main" in text

"""The node's own images, written as OCI archives (atlas_devstack.oci) for `ctr images import`.

* pause: the pod sandbox, from kubernetes' pause.c (`make node-tools`), under the name
  containerd's config pins (registry.k8s.io/pause:<PAUSE_VERSION>).
* CoreDNS: the binary built from source, non-root, port 1053 (no capability needed).
* Redis for the chart's bundled StatefulSet: Debian's redis-server and redis-cli (installed by
  hack/system-deps.sh) with the shared libraries they link, nothing else. The chart's default
  image (docker.io/library/redis) cannot be pulled here; the deploy values point at this one.

Images are tagged `atlas.local/...` (never a public registry's name) and used with
`imagePullPolicy: Never` or `IfNotPresent`: nothing is ever pulled.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .oci import ImageFile, write_image_archive
from .tools import find_tool, pinned_versions


def pause_image() -> str:
    """The sandbox image's name, as containerd's config pins it (node.py)."""
    return f"registry.k8s.io/pause:{pinned_versions()['PAUSE_VERSION']}"


def coredns_image() -> str:
    return f"atlas.local/coredns:{pinned_versions()['COREDNS_VERSION']}"


def redis_version() -> str:
    # By its own name: Debian's redis-server is a link whose target acts on argv[0].
    out = subprocess.run(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.search(r"v=(\S+)", out).group(1)


def redis_image() -> tuple[str, str]:
    """(repository, tag) of the node's Redis image."""
    return "atlas.local/redis", f"{redis_version()}-debian"


def _redis_server() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    return str(Path(path).resolve())  # Debian: a link to redis-check-rdb (argv[0] picks the mode)


def _shared_libraries(binary: str) -> list[Path]:
    """The libraries `binary` loads (ldd), including the dynamic loader."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def write_pause(out: Path) -> Path:
    write_image_archive(
        out, pause_image(), [ImageFile(find_tool("pause"), "/pause")], entrypoint=["/pause"], user="65535:65535"
    )
    return out


def write_coredns(out: Path) -> Path:
    write_image_archive(
        out,
        coredns_image(),
        [ImageFile(find_tool("coredns"), "/coredns")],
        entrypoint=["/coredns"],
        user="65532:65532",
        exposed_ports=["1053/udp", "1053/tcp"],
    )
    return out


def write_redis(out: Path) -> Path:
    server, cli = _redis_server(), str(Path(shutil.which("redis-cli") or "/usr/bin/redis-cli").resolve())
    files = [ImageFile(Path(server), "/usr/bin/redis-server"), ImageFile(Path(cli), "/usr/bin/redis-cli")]
    seen = set()
    for lib in _shared_libraries(server) + _shared_libraries(cli):
        if lib in seen:
            continue
        seen.add(lib)
        # Keep the path the binary asks for (e.g. /lib64/ld-linux-x86-64.so.2), content resolved.
        files.append(ImageFile(lib.resolve(), str(lib), 0o755))
    repo, tag = redis_image()
    write_image_archive(
        out,
        f"{repo}:{tag}",
        files,
        entrypoint=[],
        cmd=["redis-server"],
        user="999:999",
        env={"PATH": "/usr/bin:/bin"},
        exposed_ports=["6379/tcp"],
    )
    return out

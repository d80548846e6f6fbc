"""Single-layer OCI image archives from local files, for the node's own images.

The node needs images no registry can give it here: the pod sandbox (`pause`, built from
kubernetes' pause.c), CoreDNS (built from source) and the bundled Redis (Debian's). Each is a
binary or two in an otherwise empty file system (what `FROM scratch` + `COPY` would make),
so a few lines of tar and JSON do it without a Docker engine. `ctr images import` loads the archive (OCI image layout, with the
image name in the index's `io.containerd.image.name` annotation).

The archive is reproducible: fixed mtimes and owners, sorted JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class ImageFile:
    source: Path  # file on this machine
    path: str  # absolute path inside the image
    mode: int = 0o755


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int) -> None:
    info = tarfile.TarInfo(name.lstrip("/"))
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    info.mode = mode
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _layer(files: list[ImageFile]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(f.path).parent.relative_to("/")) for f in files} - {"."})
        seen: set[str] = set()
        for d in dirs:  # every parent directory before its entries
            parts = Path(d).parts
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub not in seen:
                    seen.add(sub)
                    _tar_member(tar, sub + "/", None, 0o755)
        for f in sorted(files, key=lambda f: f.path):
            _tar_member(tar, f.path, f.source.read_bytes(), f.mode)
    return buf.getvalue()


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def write_image_archive(
    out: Path,
    ref: str,
    files: list[ImageFile],
    *,
    entrypoint: list[str],
    cmd: list[str] | None = None,
    user: str | None = None,
    env: dict[str, str] | None = None,
    exposed_ports: Sequence[str] = (),
) -> str:
    """Write an OCI image layout tarball for `ref` (e.g. registry.k8s.io/pause:3.10.2) to
    `out`; returns the manifest digest."""
    layer_digest, layer = _blob(_layer(files))
    image_config: dict = {"Entrypoint": entrypoint} if entrypoint else {}
    if cmd:
        image_config["Cmd"] = cmd
    if user:
        image_config["User"] = user
    if env:
        image_config["Env"] = [f"{k}={v}" for k, v in env.items()]
    if exposed_ports:
        image_config["ExposedPorts"] = {p: {} for p in exposed_ports}
    config_digest, config = _blob(
        _json(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": image_config,
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                "history": [{"created_by": "atlas_devstack.oci: " + ", ".join(f.path for f in files)}],
            }
        )
    )
    manifest_digest, manifest = _blob(
        _json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": len(layer)}],
            }
        )
    )
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_MEDIA_TYPE,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
                }
            ],
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}), 0o644)
        _tar_member(tar, "index.json", index, 0o644)
        _tar_member(tar, "blobs/", None, 0o755)
        _tar_member(tar, "blobs/sha256/", None, 0o755)
        for digest, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            _tar_member(tar, "blobs/sha256/" + digest.split(":", 1)[1], data, 0o644)
    tmp.replace(out)
    return manifest_digest

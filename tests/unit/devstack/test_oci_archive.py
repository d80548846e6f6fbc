"""atlas_devstack.oci: the node's image archives are valid OCI image layouts that name the image."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from atlas_devstack.oci import ImageFile, write_image_archive


def _read(archive) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_archive_is_an_oci_layout_with_matching_digests(tmp_path):
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    out = tmp_path / "pause.tar"
    digest = write_image_archive(
        out,
        "registry.k8s.io/pause:3.10.2",
        [ImageFile(binary, "/pause")],
        entrypoint=["/pause"],
        user="65535:65535",
        env={"PATH": "/"},
    )
    files = _read(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    entry = index["manifests"][0]
    assert entry["digest"] == digest
    assert entry["annotations"]["io.containerd.image.name"] == "registry.k8s.io/pause:3.10.2"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "3.10.2"
    for name, data in files.items():  # every blob is stored under its own digest
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    blob = lambda d: files["blobs/sha256/" + d.split(":", 1)[1]]  # noqa: E731
    manifest = json.loads(blob(digest))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert config["config"] == {"Entrypoint": ["/pause"], "User": "65535:65535", "Env": ["PATH=/"]}
    layer = blob(manifest["layers"][0]["digest"])
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]  # uncompressed layer
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.getmember("pause")
        assert member.mode == 0o755 and member.uid == 0 and member.mtime == 0
        assert tar.extractfile(member).read() == binary.read_bytes()


def test_nested_paths_get_their_parent_directories_and_the_archive_is_reproducible(tmp_path):
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"lib")
    files = [ImageFile(lib, "/usr/lib/x86_64-linux-gnu/libx.so", 0o644)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert write_image_archive(a, "atlas.local/x:1", files, entrypoint=[], cmd=["x"]) == write_image_archive(
        b, "atlas.local/x:1", files, entrypoint=[], cmd=["x"]
    )
    assert a.read_bytes() == b.read_bytes()
    blobs = _read(a)
    manifest_digest = json.loads(blobs["index.json"])["manifests"][0]["digest"]
    manifest = json.loads(blobs["blobs/sha256/" + manifest_digest.split(":")[1]])
    layer = blobs["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        names = tar.getnames()
    assert names == ["usr", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/libx.so"]

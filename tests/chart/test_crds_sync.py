"""crds/ is the one source of truth; the chart renders a generated copy that must not drift."""

from __future__ import annotations

from atlas_devstack.tools import REPO_ROOT

from .helmlib import CHART


def test_chart_crd_copy_is_byte_identical_to_crds_dir():
    canonical = {p.name: p.read_bytes() for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))}
    copy = {p.name: p.read_bytes() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert canonical, "no CRDs in crds/"
    assert copy.keys() == canonical.keys(), "run `bash hack/sync-chart-crds.sh` (make chart-crds)"
    drifted = [name for name in canonical if copy[name] != canonical[name]]
    assert not drifted, f"{drifted} differ from crds/: run `bash hack/sync-chart-crds.sh` (make chart-crds)"

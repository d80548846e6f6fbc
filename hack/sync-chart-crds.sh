#!/usr/bin/env bash
# Copy the canonical CRDs (crds/) into the chart (charts/atlas/files/crds/), which helm can
# only read from inside the chart directory. crds/ is the one source of truth; the copy is
# generated, and tests/chart/test_crds_sync.py fails when it drifts. Run after editing crds/:
#   bash hack/sync-chart-crds.sh        (or: make chart-crds)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dst="$root/charts/atlas/files/crds"
mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$root"/crds/*.yaml "$dst"/
echo "synced $(ls "$dst" | wc -l) CRD file(s) into charts/atlas/files/crds/"

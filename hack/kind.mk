# Targets for users with Docker and kind: run Atlas in a local kind cluster with the images
# `make images` builds (hack/images.sh, tagged with the chart's default references).
# Included by the top-level Makefile (`include hack/kind.mk`); docs/deploy.md walks through them.
#   make kind-up images-load helm-install
# Nothing here runs in `make test`; tests/chart checks the pieces, tests/images runs the images.

KIND ?= kind
KIND_CLUSTER ?= atlas
# The references the chart's defaults use (values.yaml repository : Chart.yaml appVersion).
IMAGE_REFS := $(shell bash hack/images.sh tags)
GATEWAY_IMAGE ?= $(word 1,$(IMAGE_REFS))
OPERATOR_IMAGE ?= $(word 2,$(IMAGE_REFS))
ATLAS_NAMESPACE ?= atlas-system
HELM_RELEASE ?= atlas
KIND_VALUES ?= charts/atlas/ci/kind-values.yaml
# The helm and kubectl built by `make tools` when present, else whatever is on PATH.
KIND_HELM ?= $(if $(wildcard bin/helm),bin/helm,helm)
KIND_KUBECTL ?= $(if $(wildcard bin/kubectl),bin/kubectl,kubectl)

.PHONY: kind-up kind-down images-load helm-install helm-uninstall chart-crds

kind-up:  ## create the kind cluster of kind-config.yaml (gateway on http://127.0.0.1:8080)
	@$(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' \
	  && echo "kind cluster $(KIND_CLUSTER) already exists" \
	  || $(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml

kind-down:  ## delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

images-load: images  ## load both images into the kind cluster's node
	$(KIND) load docker-image --name $(KIND_CLUSTER) $(GATEWAY_IMAGE) $(OPERATOR_IMAGE)

helm-install:  ## helm upgrade --install the chart into kind with charts/atlas/ci/kind-values.yaml
	$(KIND_HELM) upgrade --install $(HELM_RELEASE) charts/atlas \
	  --namespace $(ATLAS_NAMESPACE) --create-namespace \
	  --values $(KIND_VALUES) \
	  $(if $(ATLAS_UPSTREAM_URL),--set gateway.upstream.url=$(ATLAS_UPSTREAM_URL)) \
	  --wait --timeout 5m
	$(KIND_KUBECTL) get pods -n $(ATLAS_NAMESPACE)

helm-uninstall:  ## remove the release (CRDs and keys stay: crds.keep)
	$(KIND_HELM) uninstall $(HELM_RELEASE) --namespace $(ATLAS_NAMESPACE)

chart-crds:  ## copy crds/ into charts/atlas/files/crds/ (run after editing a CRD)
	@bash hack/sync-chart-crds.sh

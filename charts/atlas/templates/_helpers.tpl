{{/* Names: <release>-atlas unless the release name already contains "atlas". */}}
{{- define "atlas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "atlas.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Component names leave room for the suffix within 63 characters. */}}
{{- define "atlas.operator.fullname" -}}{{ include "atlas.fullname" . | trunc 54 | trimSuffix "-" }}-operator{{- end -}}
{{- define "atlas.gateway.fullname" -}}{{ include "atlas.fullname" . | trunc 55 | trimSuffix "-" }}-gateway{{- end -}}
{{- define "atlas.redis.fullname" -}}{{ include "atlas.fullname" . | trunc 57 | trimSuffix "-" }}-redis{{- end -}}

{{- define "atlas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "atlas.labels" -}}
helm.sh/chart: {{ include "atlas.chart" . }}
app.kubernetes.io/name: {{ include "atlas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: atlas
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "atlas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atlas.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "atlas.componentLabels" -}}
{{ include "atlas.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "atlas.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "atlas.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "atlas.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "atlas.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "atlas.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* True ("true") when the gateway runs more than one pod at some point: then it gets a PDB. */}}
{{- define "atlas.gateway.multiReplica" -}}
{{- if or .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/*
Redis connection for both processes. The URL is built from env vars so that a password from a
Secret never appears in the pod spec: Kubernetes expands $(ATLAS_REDIS_PASSWORD) (and
$(ATLAS_REDIS_SENTINEL_PASSWORD)) in later env values. Passwords must be URL-safe
(percent-encode reserved characters in the Secret). Three shapes: one Redis (url), a Redis
Cluster (url names a seed node, ATLAS_REDIS_CLUSTER=true), Sentinel (sentinel.addresses).
*/}}
{{- define "atlas.redis.env" -}}
{{- if eq .Values.redis.mode "bundled" }}
- name: ATLAS_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "atlas.redis.fullname" .) | quote }}
{{- else }}
{{- $ext := .Values.redis.external }}
{{- $sentinel := $ext.sentinel }}
{{- $auth := "" }}
{{- if $ext.passwordSecret.name }}
- name: ATLAS_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ext.passwordSecret.name }}
      key: {{ $ext.passwordSecret.key }}
{{- $auth = printf "%s:$(ATLAS_REDIS_PASSWORD)@" $ext.username }}
{{- else if $ext.username }}
{{- $auth = printf "%s@" $ext.username }}
{{- end }}
{{- $query := list }}
{{- $tls := false }}
{{- if $sentinel.addresses }}
{{- /* Sentinel: redis+sentinel://[auth@]host:port,.../<master>/<db>; the sentinels' own
       password goes in the query, expanded from its Secret like the master's */}}
{{- if $ext.cluster }}{{ fail "redis.external.cluster and redis.external.sentinel.addresses exclude each other" }}{{ end }}
{{- $master := required "redis.external.sentinel.masterName is required with sentinel addresses" $sentinel.masterName }}
{{- if $sentinel.passwordSecret.name }}
- name: ATLAS_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sentinel.passwordSecret.name }}
      key: {{ $sentinel.passwordSecret.key }}
{{- $query = append $query "sentinel_password=$(ATLAS_REDIS_SENTINEL_PASSWORD)" }}
{{- if $sentinel.username }}{{ $query = append $query (printf "sentinel_username=%s" $sentinel.username) }}{{ end }}
{{- end }}
{{- $tls = $sentinel.tls }}
{{- if $tls }}
{{- if $ext.tls.caSecret.name }}{{ $query = append $query "ssl_ca_certs=/etc/atlas/redis-ca/ca.crt" }}{{ end }}
{{- if not $ext.tls.checkHostname }}{{ $query = append $query "ssl_check_hostname=false" }}{{ end }}
{{- end }}
- name: ATLAS_REDIS_URL
  value: {{ printf "%s+sentinel://%s%s/%s/%d%s" (ternary "rediss" "redis" $tls) $auth (join "," $sentinel.addresses) $master (int $sentinel.db) (ternary (printf "?%s" (join "&" $query)) "" (gt (len $query) 0)) | quote }}
{{- else }}
{{- $url := required "redis.external.url (or redis.external.sentinel.addresses) is required when redis.mode is external" $ext.url }}
{{- $parts := urlParse $url }}
{{- if $parts.query }}{{ $query = append $query $parts.query }}{{ end }}
{{- if eq $parts.scheme "rediss" }}
{{- if $ext.tls.caSecret.name }}{{ $query = append $query "ssl_ca_certs=/etc/atlas/redis-ca/ca.crt" }}{{ end }}
{{- if not $ext.tls.checkHostname }}{{ $query = append $query "ssl_check_hostname=false" }}{{ end }}
{{- end }}
- name: ATLAS_REDIS_URL
  value: {{ printf "%s://%s%s%s%s" $parts.scheme $auth $parts.host $parts.path (ternary (printf "?%s" (join "&" $query)) "" (gt (len $query) 0)) | quote }}
{{- if $ext.cluster }}
- name: ATLAS_REDIS_CLUSTER
  value: "true"
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "atlas.redis.caVolumeMount" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls.caSecret.name }}
- name: redis-ca
  mountPath: /etc/atlas/redis-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "atlas.redis.caVolume" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls.caSecret.name }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.external.tls.caSecret.name }}
    items:
      - key: {{ .Values.redis.external.tls.caSecret.key }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/*
OTEL_RESOURCE_ATTRIBUTES of the gateway: the pod's name and namespace (expanded by the kubelet
from the env vars above it), then gateway.tracing.resourceAttributes in name order.
*/}}
{{- define "atlas.gateway.resourceAttributes" -}}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" -}}
{{- range $name, $value := .resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $name $value) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end -}}

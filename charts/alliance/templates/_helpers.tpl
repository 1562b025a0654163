{{/* The chart name, or nameOverride. */}}
{{- define "alliance.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: <release>-<chart>, or the release name alone when it already
contains the chart name (release "alliance" gives "alliance", "alliance-minio", ...). Truncated
so that the longest suffix ("-operator-metrics") still fits a DNS label.
*/}}
{{- define "alliance.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart name and version, for the helm.sh/chart label. */}}
{{- define "alliance.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the chart. */}}
{{- define "alliance.labels" -}}
helm.sh/chart: {{ include "alliance.chart" . }}
{{ include "alliance.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alliance
{{- end }}

{{/* The labels a selector matches on (add app.kubernetes.io/component per workload). */}}
{{- define "alliance.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alliance.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "alliance.operator.fullname" -}}
{{- printf "%s-operator" (include "alliance.fullname" .) }}
{{- end }}

{{- define "alliance.minio.fullname" -}}
{{- printf "%s-minio" (include "alliance.fullname" .) }}
{{- end }}

{{- define "alliance.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "alliance.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to the chart's appVersion. Arg: (list image root). */}}
{{- define "alliance.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* True ("true") when the operator watches the whole cluster. */}}
{{- define "alliance.watchAll" -}}
{{- if not .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/* The namespaces where member pods may run and that the chart can reach: JSON list. */}}
{{- define "alliance.memberNamespaces" -}}
{{- if include "alliance.watchAll" . }}
{{- list .Release.Namespace | toJson }}
{{- else }}
{{- .Values.operator.watchNamespaces | uniq | toJson }}
{{- end }}
{{- end }}

{{/* "true" when the chart's MinIO serves https. */}}
{{- define "alliance.minio.tls" -}}
{{- if and .Values.minio.enabled .Values.minio.tls.enabled }}true{{ end }}
{{- end }}

{{/* The Secret holding MinIO's certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "alliance.minio.tlsSecretName" -}}
{{- printf "%s-tls" (include "alliance.minio.fullname" .) }}
{{- end }}

{{/*
The names MinIO's certificate is valid for, as JSON {"dns": [...], "ips": [...]}: the Service's
in-cluster names, then minio.tls.extraSANs (those written as IP addresses go to "ips").
*/}}
{{- define "alliance.minio.sans" -}}
{{- $svc := include "alliance.minio.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $ips := list }}
{{- range .Values.minio.tls.extraSANs }}
{{- if or (regexMatch "^[0-9]{1,3}(\\.[0-9]{1,3}){3}$" .) (contains ":" .) }}
{{- $ips = append $ips . }}
{{- else }}
{{- $dns = append $dns . }}
{{- end }}
{{- end }}
{{- dict "dns" ($dns | uniq) "ips" ($ips | uniq) | toJson }}
{{- end }}

{{/* The store as the Alliance, the test pod and the NetworkPolicies see it. */}}
{{- define "alliance.store.endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "%s://%s.%s.svc:9000" (ternary "https" "http" .Values.minio.tls.enabled) (include "alliance.minio.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.externalStore.endpoint | trimSuffix "/" }}
{{- end }}
{{- end }}

{{- define "alliance.store.secretName" -}}
{{- if .Values.minio.enabled }}
{{- default (include "alliance.minio.fullname" .) .Values.minio.auth.existingSecret }}
{{- else }}
{{- .Values.externalStore.existingSecret }}
{{- end }}
{{- end }}

{{/* The Secret and key of the store's CA, as JSON {"name", "key"}; {}: none (the system's CAs). */}}
{{- define "alliance.store.caSecret" -}}
{{- if include "alliance.minio.tls" . }}
{{- dict "name" (include "alliance.minio.tlsSecretName" .) "key" "ca.crt" | toJson }}
{{- else if and (not .Values.minio.enabled) .Values.externalStore.caSecret.name }}
{{- pick .Values.externalStore.caSecret "name" "key" | toJson }}
{{- else }}{}
{{- end }}
{{- end }}

{{- define "alliance.store.accessKeyKey" -}}
{{- if .Values.minio.enabled }}accessKey{{ else }}{{ .Values.externalStore.accessKeyKey }}{{ end }}
{{- end }}

{{- define "alliance.store.secretKeyKey" -}}
{{- if .Values.minio.enabled }}secretKey{{ else }}{{ .Values.externalStore.secretKeyKey }}{{ end }}
{{- end }}

{{/* The external store's port: networkPolicy.externalStorePort, else the endpoint's. */}}
{{- define "alliance.externalStore.port" -}}
{{- if .Values.networkPolicy.externalStorePort }}
{{- .Values.networkPolicy.externalStorePort }}
{{- else }}
{{- $url := urlParse .Values.externalStore.endpoint }}
{{- $host := $url.host }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- regexFind "[0-9]+$" $host }}
{{- else if eq $url.scheme "https" }}443
{{- else }}80
{{- end }}
{{- end }}
{{- end }}

{{/*
Settings that no schema can check (they depend on each other); rendering fails with a message
saying what to change.
*/}}
{{- define "alliance.validate" -}}
{{- if .Values.minio.enabled }}
{{- if or .Values.externalStore.endpoint .Values.externalStore.existingSecret .Values.externalStore.caSecret.name }}
{{- fail "externalStore is set while minio.enabled is true: set minio.enabled=false to use the external store, or clear externalStore" }}
{{- end }}
{{- else }}
{{- if not .Values.externalStore.endpoint }}
{{- fail "minio.enabled is false: set externalStore.endpoint (e.g. https://s3.example.org)" }}
{{- end }}
{{- if not .Values.externalStore.existingSecret }}
{{- fail "minio.enabled is false: set externalStore.existingSecret, a Secret in the release namespace holding the store's keys" }}
{{- end }}
{{- if .Values.minio.auth.existingSecret }}
{{- fail "minio.auth.existingSecret is set while minio.enabled is false: name the external store's Secret in externalStore.existingSecret" }}
{{- end }}
{{- end }}
{{- if and .Values.minio.tls.certManager.issuerRef.name (not .Values.minio.tls.enabled) }}
{{- fail "minio.tls.certManager.issuerRef.name is set while minio.tls.enabled is false: enable TLS, or clear the issuer" }}
{{- end }}
{{- if and .Values.minio.service.nodePort (eq .Values.minio.service.type "ClusterIP") }}
{{- fail "minio.service.nodePort is set while minio.service.type is ClusterIP: set the type to NodePort or LoadBalancer" }}
{{- end }}
{{- if and .Values.alliance.create (not (include "alliance.watchAll" .)) (not (has .Release.Namespace .Values.operator.watchNamespaces)) }}
{{- fail (printf "alliance.create puts the Alliance in the release namespace %q, which operator.watchNamespaces does not list: add it, or set alliance.create=false" .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* The restricted security context of every container of the chart. */}}
{{- define "alliance.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* A pod security context for uid/gid/fsGroup (arg: the uid). */}}
{{- define "alliance.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "alliance.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The selector of the pods the operator starts for Members (agents) and Alliances (init). */}}
{{- define "alliance.memberPodSelector" -}}
matchLabels:
  app.kubernetes.io/managed-by: alliance-operator
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values:
      - member
      - init
{{- end }}

{{/* A namespaceSelector for the namespaces member pods run in. */}}
{{- define "alliance.memberNamespaceSelector" -}}
{{- if include "alliance.watchAll" . }}
namespaceSelector: {}
{{- else }}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: In
      values:
        {{- toYaml (include "alliance.memberNamespaces" . | fromJsonArray) | nindent 8 }}
{{- end }}
{{- end }}

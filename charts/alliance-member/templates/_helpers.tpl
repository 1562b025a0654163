{{/* The chart name, or nameOverride. */}}
{{- define "member.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: <release>-<chart>, or the release name alone when it already
contains the chart name. Truncated so that the longest suffix ("-store") still fits a DNS label.
*/}}
{{- define "member.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart name and version, for the helm.sh/chart label. */}}
{{- define "member.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A label value of at most 63 characters that ends with a letter or digit. */}}
{{- define "member.labelValue" -}}
{{- regexReplaceAll "[-._]+$" (. | trunc 63) "" }}
{{- end }}

{{/* Labels of every object of the chart. */}}
{{- define "member.labels" -}}
helm.sh/chart: {{ include "member.chart" . }}
{{ include "member.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alliance
alliance.dev/alliance: {{ include "member.labelValue" .Values.alliance | quote }}
alliance.dev/member: {{ include "member.labelValue" .Values.member | quote }}
{{- end }}

{{/* The labels a selector matches on (add app.kubernetes.io/component per workload). */}}
{{- define "member.selectorLabels" -}}
app.kubernetes.io/name: {{ include "member.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "member.secretName" -}}
{{- printf "%s-store" (include "member.fullname" .) }}
{{- end }}

{{- define "member.claimName" -}}
{{- default (printf "%s-data" (include "member.fullname" .)) .Values.data.existingClaim }}
{{- end }}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "member.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The store's URL as the agent gets it: no trailing slash. */}}
{{- define "member.store.endpoint" -}}
{{- .Values.store.endpoint | trimSuffix "/" }}
{{- end }}

{{/* The store's port: the endpoint's explicit port, else 443 for https and 80 for http. */}}
{{- define "member.store.port" -}}
{{- $host := (urlParse .Values.store.endpoint).host }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- regexFind "[0-9]+$" $host }}
{{- else if hasPrefix "https://" .Values.store.endpoint }}443
{{- else }}80
{{- end }}
{{- end }}

{{/* Where the agent and the test pod find store.caCert (ALLIANCE_S3_CA_FILE). */}}
{{- define "member.caDir" -}}/etc/alliance/store-ca{{- end }}
{{- define "member.caFile" -}}{{ include "member.caDir" . }}/ca.crt{{- end }}

{{/* The restricted security context of every container of the chart. */}}
{{- define "member.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* The pod security context: uid, gid and fsGroup 10001, the member image's user. */}}
{{- define "member.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
# Re-own the data volume only when its root is not already ours: a recursive chown of a large
# dataset on every start would be slow.
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "member.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The CA volume of the agent and the test pod (only when store.caCert is set). */}}
{{- define "member.caVolume" -}}
- name: store-ca
  secret:
    secretName: {{ include "member.secretName" . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}

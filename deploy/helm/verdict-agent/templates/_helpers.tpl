{{/* Name of the chart. */}}
{{- define "verdict-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it contains the chart name. */}}
{{- define "verdict-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "verdict-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "verdict-agent.labels" -}}
helm.sh/chart: {{ include "verdict-agent.chart" . }}
{{ include "verdict-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: verdict-agent
{{- end }}

{{/* Selector labels of the agent pods (immutable: never add to them). */}}
{{- define "verdict-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "verdict-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "verdict-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "verdict-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "verdict-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Capabilities added to the agent container (see docs/operations.md). */}}
{{- define "verdict-agent.capabilities" -}}
- BPF
- PERFMON
{{- if .Values.legacyKernelCapabilities }}
- SYS_ADMIN
{{- end }}
{{- if or .Values.legacyKernelCapabilities .Values.memlockCapability }}
- SYS_RESOURCE
{{- end }}
{{- end }}

{{/*
The ConfigMap holding the critical-flow override: the chart's own when
agent.criticalFlows.inline is set, else agent.criticalFlows.configMap; empty
when there is no override.
*/}}
{{- define "verdict-agent.criticalFlowsConfigMap" -}}
{{- $cf := .Values.agent.criticalFlows }}
{{- if and $cf.inline $cf.configMap }}
{{- fail "agent.criticalFlows: set inline or configMap, not both" }}
{{- else if $cf.inline }}
{{- printf "%s-critical-flows" (include "verdict-agent.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else if $cf.configMap }}
{{- $cf.configMap }}
{{- end }}
{{- end }}

{{/* The pre-1.30 AppArmor annotation value for an appArmorProfile. */}}
{{- define "verdict-agent.appArmorAnnotation" -}}
{{- if eq .type "Unconfined" -}}unconfined
{{- else if eq .type "RuntimeDefault" -}}runtime/default
{{- else -}}localhost/{{ .localhostProfile }}
{{- end -}}
{{- end }}

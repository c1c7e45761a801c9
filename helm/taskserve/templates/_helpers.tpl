{{/* Names: "<release>-taskserve", or the release name alone when it already holds the chart name. */}}
{{- define "taskserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "taskserve.fullname" -}}
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

{{/* "-headless" must fit too: the headless Service name is at most 63 characters. */}}
{{- define "taskserve.headlessName" -}}
{{- printf "%s-headless" (include "taskserve.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "taskserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taskserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "taskserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "taskserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "taskserve.image" -}}
{{- $default := ternary (printf "%s-demo" .Chart.AppVersion) .Chart.AppVersion (eq .Values.modelRepository.source "image") }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default $default) }}
{{- end }}

{{- define "taskserve.initImage" -}}
{{- $img := .Values.modelRepository.init.image }}
{{- printf "%s:%s" $img.repository ($img.tag | default (printf "%s-exporter" .Chart.AppVersion)) }}
{{- end }}

{{/*
Pod termination grace: preStop sleep + drain delay + the server's shutdown grace + time to unload.
An explicit value must leave the server its drain delay and whole shutdown grace after the preStop sleep.
*/}}
{{- define "taskserve.terminationGrace" -}}
{{- $grace := add (.Values.server.shutdownGrace | ceil | int) (.Values.server.drainDelay | ceil | int) }}
{{- $preStop := .Values.preStopSleepSeconds | int }}
{{- $set := .Values.terminationGracePeriodSeconds }}
{{- if or (kindIs "invalid" $set) (eq (toString $set) "") }}
{{- add $preStop $grace 15 }}
{{- else if le (int $set) (add $preStop $grace) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + server.drainDelay + server.shutdownGrace (%d + %d)" (int $set) $preStop $grace) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

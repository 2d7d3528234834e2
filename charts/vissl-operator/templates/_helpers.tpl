{{/* Name of the release's objects. */}}
{{- define "vissl-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vissl-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vissl-operator.labels" -}}
{{ include "vissl-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vissl-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vissl-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vissl-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The namespace the operator watches ("" = the whole cluster); one namespace or all. */}}
{{- define "vissl-operator.watchNamespace" -}}
{{- $ns := .Values.watchNamespace | toString | trim -}}
{{- if contains "," $ns -}}
{{- fail "watchNamespace: the operator watches one namespace or the whole cluster (leave it empty), not a list" -}}
{{- end -}}
{{- $ns -}}
{{- end -}}

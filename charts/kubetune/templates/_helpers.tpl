{{/*
Names and labels shared by every template.
*/}}

{{/* The chart's name, overridable for forks. */}}
{{- define "kubetune.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release's full name: "<release>-kubetune", or just the release name when it already contains
"kubetune" (so `helm install kubetune ...` gives objects named "kubetune", not "kubetune-kubetune").
*/}}
{{- define "kubetune.fullname" -}}
{{- if contains (include "kubetune.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kubetune.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* "kubetune-0.1.0", the value of the helm.sh/chart label. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels that select the operator's pods. They never change across upgrades: a Deployment's
selector is immutable.
*/}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
Labels of every object of the chart. managed-by is "Helm", never "kubetune": the operator's own
children carry app.kubernetes.io/managed-by=kubetune and its watches select on that.
*/}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "<repository>:<tag>", the tag defaulting to the chart's appVersion. Call with (list . .Values.x). */}}
{{- define "kubetune.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}

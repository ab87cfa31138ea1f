{{/* Chart name, overridable. */}}
{{- define "leap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "leap.fullname" -}}
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

{{- define "leap.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "leap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "leap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "leap.labels" -}}
helm.sh/chart: {{ include "leap.chart" . }}
{{ include "leap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: leap
{{- end }}

{{- define "leap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "leap.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces served in namespace-scoped mode (the release namespace when none are listed). */}}
{{- define "leap.watchNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- join "," .Values.watch.namespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Names of cluster-scoped objects (ClusterRole, ClusterRoleBinding, ClusterKopfPeering): Helm
     release names are unique per namespace only, so two releases of the same name in two
     namespaces must not share (and overwrite) them. */}}
{{- define "leap.clusterScopedName" -}}
{{- printf "%s-%s" (include "leap.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "leap.peeringName" -}}
{{- default (include "leap.clusterScopedName" .) .Values.peering.name }}
{{- end }}

{{- define "leap.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "leap.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled: true (kopf peering keeps one replica active)" }}
{{- end }}
{{- if eq (int .Values.operator.metricsPort) (int .Values.operator.livenessPort) }}
{{- fail "operator.metricsPort and operator.livenessPort must differ" }}
{{- end }}
{{- end }}

{{/* Name of the release's objects. */}}
{{- define "omnimri-node.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Common labels. */}}
{{- define "omnimri-node.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of the node. */}}
{{- define "omnimri-node.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{/* Selector labels of Triton. */}}
{{- define "omnimri-node.tritonSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end }}

{{/* Selector labels of the release's PostgreSQL. */}}
{{- define "omnimri-node.postgresqlSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: postgresql
{{- end }}

{{/* "true" when the replicas share one PostgreSQL and one spool (scale-out mode), else "". */}}
{{- define "omnimri-node.scaleOut" -}}
{{- if or .Values.database.url .Values.database.existingSecret .Values.postgresql.enabled -}}
true
{{- end -}}
{{- end }}

{{/* storage.database URL without the password (libpq takes PGPASSWORD from a Secret). */}}
{{- define "omnimri-node.databaseUrl" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "postgresql://%s@%s-postgresql:5432/%s" .Values.postgresql.username (include "omnimri-node.fullname" .) .Values.postgresql.database -}}
{{- else -}}
{{- .Values.database.url -}}
{{- end -}}
{{- end }}

{{/* Refuse settings that would split one logical node. */}}
{{- define "omnimri-node.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not (include "omnimri-node.scaleOut" .)) -}}
{{- fail "replicas > 1 needs one PostgreSQL for all replicas (database.url, database.existingSecret or postgresql.enabled) and a ReadWriteMany spool: SQLite replicas would each complete, route and dispatch on their own" -}}
{{- end -}}
{{- if and (include "omnimri-node.scaleOut" .) (not .Values.persistence.existingClaim) (not (has "ReadWriteMany" .Values.persistence.accessModes)) -}}
{{- fail "the scale-out mode (PostgreSQL) shares one spool: set persistence.accessModes [ReadWriteMany] (and a storageClassName that offers it) or persistence.existingClaim" -}}
{{- end -}}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.auth.existingSecret) -}}
{{- fail "postgresql.enabled needs postgresql.auth.existingSecret (a Secret with key \"password\")" -}}
{{- end -}}
{{- end }}

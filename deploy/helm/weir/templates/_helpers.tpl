{{/* Names and labels shared by every template. */}}
{{- define "weir.fullname" -}}
{{- if contains "weir" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-weir" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "weir.labels" -}}
app.kubernetes.io/name: weir
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* An engine's name: release, model and version, DNS-safe. Call with (dict "root" $ "model" $m "version" $v). */}}
{{- define "weir.engineName" -}}
{{- printf "%s-%s-%s" (include "weir.fullname" .root) .model.name .version.version | lower | replace "." "-" | replace "_" "-" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "weir.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "weir.fullname" .) -}}
{{- else -}}
{{- required "redis.url is required when redis.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "weir.secretName" -}}
{{- default (printf "%s-keys" (include "weir.fullname" .)) .Values.gateway.existingSecret -}}
{{- end -}}

{{- define "weir.weightsVolume" -}}
- name: models
{{- if .Values.engines.weights.hostPath }}
  hostPath:
    path: {{ .Values.engines.weights.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.engines.weights.persistentVolumeClaim }}
    readOnly: true
{{- end }}
{{- end -}}

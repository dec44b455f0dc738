{{/* The retrieval docstore's URL, without its password (PGPASSWORD from the Secret). */}}
{{- define "weir.retrievalDatabaseUrl" -}}
{{- if .Values.retrieval.postgres.enabled -}}
postgresql://weir@{{ include "weir.fullname" . }}-postgres:5432/weir
{{- else -}}
{{- required "retrieval.postgres.url is needed when retrieval.postgres.enabled is false" .Values.retrieval.postgres.url -}}
{{- end -}}
{{- end -}}

{{/* The env of a process that opens the docstore: the database password. */}}
{{- define "weir.retrievalEnv" -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "weir.secretName" . }}, key: retrieval-database-password}
{{- end -}}

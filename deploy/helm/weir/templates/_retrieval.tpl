{{/* Whether the release needs a PostgreSQL: retrieval's docstore, the Batch API's store,
or both (one database, shared). */}}
{{- define "weir.usesDatabase" -}}
{{- if or .Values.retrieval.enabled .Values.batches.enabled -}}true{{- end -}}
{{- end -}}

{{/* The PostgreSQL's URL (retrieval's docstore and the batch store), without its
password (PGPASSWORD from the Secret). */}}
{{- define "weir.databaseUrl" -}}
{{- if .Values.retrieval.postgres.enabled -}}
postgresql://weir@{{ include "weir.fullname" . }}-postgres:5432/weir
{{- else -}}
{{- required "retrieval.postgres.url is needed when retrieval.postgres.enabled is false" .Values.retrieval.postgres.url -}}
{{- end -}}
{{- end -}}

{{/* The env of a process that opens the PostgreSQL (its password). */}}
{{- define "weir.databaseEnv" -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "weir.secretName" . }}, key: retrieval-database-password}
{{- end -}}

{{/* The env of a process that opens the docstore (the database password) and that
scatters searches or answers them (the token gateways and index workers share). */}}
{{- define "weir.retrievalEnv" -}}
{{ include "weir.databaseEnv" . }}
- name: WEIR_RETRIEVAL__WORKER_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "weir.secretName" . }}, key: retrieval-worker-token}
{{- end -}}

{{/* The index workers' token: retrieval.workerToken, else the one the release's Secret
holds already (an upgrade keeps it), else 48 random characters. */}}
{{- define "weir.retrievalWorkerToken" -}}
{{- $given := .Values.retrieval.workerToken -}}
{{- if $given -}}
{{- if lt (len $given) 16 -}}
{{- fail "retrieval.workerToken needs at least 16 characters" -}}
{{- end -}}
{{- $given -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "weir.secretName" .) | default dict -}}
{{- $kept := dig "data" "retrieval-worker-token" "" $existing -}}
{{- if $kept -}}
{{- $kept | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A version's engine autoscaling: engines.autoscaling with the version's own
`autoscaling` laid over it. Call with (dict "root" $ "version" $v). */}}
{{- define "weir.engineScaling" -}}
{{- toYaml (merge (deepCopy (default (dict) .version.autoscaling)) (deepCopy .root.Values.engines.autoscaling)) -}}
{{- end -}}

{{/* "true" when KEDA scales the version's Deployment (it then owns `replicas`). */}}
{{- define "weir.engineScaled" -}}
{{- $scale := include "weir.engineScaling" . | fromYaml -}}
{{- if and $scale.enabled (eq (int (default 1 .version.pipelineParallel)) 1) -}}true{{- end -}}
{{- end -}}

{{/*
Names follow the usual Helm conventions, trimmed to 52 characters: object names end up in label values
(max 63) with room for the suffixes added here (-smoke-test, -discovery).
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; the selector labels are the stable subset (a Deployment's selector is immutable). */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The trainer pods' default image (the operator itself runs the slim finetune-operator.image): the CUDA
build unless trainerImage.tag names another (docs/images.md). */}}
{{- define "finetune-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.trainerImage.tag) }}
{{- end }}

{{/*
The operator's config file: .Values.policy with the two conveniences values.yaml documents resolved here, so
the operator only ever sees values its config model accepts:
  - defaults.image "" -> the trainer image (trainerImage.repository:trainerImage.tag);
  - limits.maxCpu / limits.maxMemory "" -> null (no limit). Helm deletes keys set to null, which would bring
    back the operator's built-in limit instead of lifting it, so "" is the way to say "unlimited".
*/}}
{{- define "finetune-operator.policy" -}}
{{- $policy := deepCopy .Values.policy }}
{{- if not $policy.defaults.image }}
{{- $_ := set $policy.defaults "image" (include "finetune-operator.trainerImage" .) }}
{{- end }}
{{- $allLimits := list $policy.limits }}
{{- range $tenant := values (default dict $policy.tenants) }}
{{- if $tenant.limits }}{{ $allLimits = append $allLimits $tenant.limits }}{{ end }}
{{- end }}
{{- range $limits := $allLimits }}
{{- range $key := list "maxCpu" "maxMemory" }}
{{- if and (hasKey $limits $key) (eq (toString (index $limits $key)) "") }}
{{- $_ := set $limits $key nil }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $policy }}
{{- end }}

{{/* Where the smoke test's FineTuneJob goes: a namespace the operator serves. */}}
{{- define "finetune-operator.testNamespace" -}}
{{- if .Values.test.namespace }}
{{- .Values.test.namespace }}
{{- else if and .Values.watchNamespaces (not (has .Release.Namespace .Values.watchNamespaces)) }}
{{- first .Values.watchNamespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "finetune-operator.testImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.test.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.test.image.tag) }}
{{- end }}

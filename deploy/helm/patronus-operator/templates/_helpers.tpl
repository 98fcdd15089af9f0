{{/*
Names and labels, in the layout `helm create` uses.
*/}}
{{- define "patronus-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name; at most 52 characters, so that a suffix
such as "-controller-ca" still fits a 63-character name.
*/}}
{{- define "patronus-operator.fullname" -}}
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

{{- define "patronus-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "patronus-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "patronus-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "patronus-operator.labels" -}}
helm.sh/chart: {{ include "patronus-operator.chart" . }}
{{ include "patronus-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: patronus
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "patronus-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "patronus-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: the name of an existing ServiceAccount (serviceAccount.create is false)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "patronus-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if hasPrefix "@" $tag }}
{{- printf "%s%s" .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding the controller API key. */}}
{{- define "patronus-operator.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "patronus-operator.fullname" .)) .Values.controller.apiKey.secretName }}
{{- end }}

{{/* The ConfigMap/Secret holding the controller's certificate; empty: none. */}}
{{- define "patronus-operator.caName" -}}
{{- if .Values.controller.ca.name }}
{{- .Values.controller.ca.name }}
{{- else if .Values.controller.ca.create }}
{{- printf "%s-controller-ca" (include "patronus-operator.fullname" .) }}
{{- end }}
{{- end }}

{{/* The namespaces served when not cluster-wide: the list, or the release's. */}}
{{- define "patronus-operator.namespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
What the operator does with the Kubernetes API, and nothing more (kopf in
standalone mode with annotation storage and resource/namespace scanning off;
see this chart's README, "RBAC", for the kopf source behind each rule):
- list, watch: kopf's watch stream per resource (a LIST, then WATCH from its
  resourceVersion);
- patch: finalizers (JSON patch), progress and diff-base annotations under
  sdwan.patronus.dev (merge patch) on the resource itself;
- patch on sites/status and policies/status: conditions, observedGeneration and the controller's live
  state, which go through the status subresource;
- events create: kopf posts one core/v1 Event per handler outcome (POST only).
No get, update, create or delete on sites and policies (kopf never issues
them), no Secrets, no CRDs, no namespaces, no peering resources.
*/}}
{{- define "patronus-operator.rules" -}}
- apiGroups: ["sdwan.patronus.dev"]
  resources: ["sites", "policies"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["sdwan.patronus.dev"]
  resources: ["sites/status", "policies/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "vlm-captioner-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: fullnameOverride, else <release>-<chart> (once). */}}
{{- define "vlm-captioner-operator.fullname" -}}
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

{{- define "vlm-captioner-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods; stable across upgrades. */}}
{{- define "vlm-captioner-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vlm-captioner-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "vlm-captioner-operator.labels" -}}
helm.sh/chart: {{ include "vlm-captioner-operator.chart" . }}
{{ include "vlm-captioner-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: vlm-captioner
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "vlm-captioner-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vlm-captioner-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "vlm-captioner-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The vlm-server image captioners default to. */}}
{{- define "vlm-captioner-operator.defaultServerImage" -}}
{{- printf "%s:%s" .Values.defaultServerImage.repository (default .Chart.AppVersion .Values.defaultServerImage.tag) }}
{{- end }}

{{/*
The namespaced-mode namespaces. The operator binary takes one `--namespace` today, so more
than one is refused at render time rather than silently watching only the first.
*/}}
{{- define "vlm-captioner-operator.watchNamespaces" -}}
{{- join "," .Values.watchNamespaces }}
{{- end }}

{{/*
The operator's rules on captioners and their children: exactly the calls in operator/src.
Shared by the ClusterRole (all namespaces) and the per-namespace Roles (watchNamespaces).
*/}}
{{- define "vlm-captioner-operator.clusterRules" -}}
# nv-ingest namespaces chosen by `spec.nvIngest.namespaceSelector` (cluster mode only; a
# namespaced operator refuses the selector): listed by label and watched, metadata only.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "vlm-captioner-operator.rules" -}}
# The captioners: watched by the controller.
# patch: the `captioning.dev/nv-ingest-wiring` finalizer (JSON patch on metadata.finalizers).
- apiGroups: ["captioning.dev"]
  resources: ["vlmcaptioners"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written with server-side apply (PATCH on the status subresource).
- apiGroups: ["captioning.dev"]
  resources: ["vlmcaptioners/status"]
  verbs: ["patch"]
# Children carry a controller ownerReference with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin allows only with update on finalizers.
- apiGroups: ["captioning.dev"]
  resources: ["vlmcaptioners/finalizers"]
  verbs: ["update"]
# Owned children, applied with server-side apply (PATCH) and watched via Controller::owns.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The same verbs cover the nv-ingest copies published with `spec.nvIngest`: applied, watched
# by their `captioning.dev/owner-name` label (metadata only) and pruned by label.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# API-key Secrets: read and watched (a key rotation rolls the server pods). Written only as
# the `<name>-nv-ingest` copy published for nv-ingest (`spec.nvIngest`, labelled as ours).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Scale and availability children: a PDB always, an HPA with `spec.autoscaling`.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["create", "patch", "delete"]
# A ServiceMonitor when the Prometheus Operator's API exists (discovered, optional).
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["create", "patch", "delete"]
# Model PVCs: `model.pvc` is checked for existence; `model.download` creates `<name>-model`.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create"]
# The `model.download` Job (owned, watched; replaced when the snapshot changes).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Transition events (kube's Recorder writes events.k8s.io/v1 and patches repeats into a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

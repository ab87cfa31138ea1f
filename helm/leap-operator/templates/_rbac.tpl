{{/* RBAC rule lists, shared by the ClusterRole and the per-namespace Roles. */}}
{{/* What the operator does in a namespace it serves. */}}
{{- define "leap.namespacedRules" -}}
# TrainingRuns: watch them, keep kopf's bookkeeping (annotations, finalizers), write status,
# and delete finished runs whose runPolicy.ttlSecondsAfterFinished has passed.
- apiGroups: ["leap.dev"]
  resources: ["trainingruns"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
- apiGroups: ["leap.dev"]
  resources: ["trainingruns/status"]
  verbs: ["get", "patch", "update"]
# Owner references with blockOwnerDeletion on the children need this.
- apiGroups: ["leap.dev"]
  resources: ["trainingruns/finalizers"]
  verbs: ["update"]
# The children: one indexed Job per attempt and a headless Service.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Worker pods are read only: phase, restarts, IPs for progress.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events: kopf's and the operator's own.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]  # list: the Job controller's FailedCreate Events
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
{{/* kopf peering in a namespace (namespace-scoped mode). */}}
{{- define "leap.namespacedPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{/* What kopf needs cluster-wide in every mode: discovery of CRDs and namespaces. */}}
{{- define "leap.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

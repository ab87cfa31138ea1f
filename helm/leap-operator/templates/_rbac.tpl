{{/* RBAC rule lists, shared by the ClusterRole and the per-namespace Roles.
     Exactly what the operator and kopf call (tests/test_real_rbac.py compares these rules with the
     API server's audit log of the operator's requests over a whole run lifecycle). */}}
{{/* What the operator does in a namespace it serves. */}}
{{- define "leap.namespacedRules" -}}
# TrainingRuns: kopf lists and watches them and patches its finalizer and annotations onto them;
# the operator deletes finished runs whose runPolicy.ttlSecondsAfterFinished has passed.
- apiGroups: ["leap.dev"]
  resources: ["trainingruns"]
  verbs: ["list", "watch", "patch", "delete"]
# Phase, conditions, progress.
- apiGroups: ["leap.dev"]
  resources: ["trainingruns/status"]
  verbs: ["patch"]
# Not a request: creating children whose ownerReference sets blockOwnerDeletion needs it where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift; the test control plane).
- apiGroups: ["leap.dev"]
  resources: ["trainingruns/finalizers"]
  verbs: ["update"]
# One indexed Job per attempt: watched (kopf index), created, suspended and resumed (patch),
# deleted on a gang restart and with the run; read back when a create finds it exists (409).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The workers' headless Service: created with the run, deleted with it; read back on a 409.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "delete"]
# Worker pods are read only: watched (kopf index) for phase, restarts and IPs.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events: kopf posts core/v1 Events, one per transition (never patched).
- apiGroups: [""]
  resources: ["events"]
  # list: the Job controller's FailedCreate Events on a Job that cannot create its pods.
  verbs: ["create", "list"]
# Kueue: a queued run is suspended and resumed through its Workload's spec.active.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- end }}
{{/* kopf peering in a namespace (namespace-scoped mode). */}}
{{- define "leap.namespacedPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{/* What kopf needs cluster-wide in every mode: it watches CRDs to notice the TrainingRun CRD
     change. In namespace-scoped mode it also lists and watches namespaces (to know which of the
     served ones exist); serving every namespace it does not. */}}
{{- define "leap.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .Values.watch.allNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

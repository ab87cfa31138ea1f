"""Names the operator owns: API group, labels, annotations, operator metric names.

Environment variable and training metric names live in leap_trainer.contract, the one
source shared with the training runtime.
"""

GROUP = "leap.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
# `tr` is Tekton's TaskRun: on a cluster with both, `kubectl get tr` is ambiguous. `ltr` (Leap
# TrainingRun) is used by no well-known CRD. Category `leap`: `kubectl get leap` lists every Leap
# object. Not `all`: `kubectl delete all --all` is a routine namespace clean-up and must not take
# hours of training with it; a run's Jobs and pods already show in `kubectl get all`.
SHORT_NAMES = ["ltr"]
CATEGORIES = ["leap"]

# Labels on every child object.
LABEL_RUN = "leap.dev/run"
LABEL_ATTEMPT = "leap.dev/attempt"
# On a Job: render.shape_hash() of the spec it was rendered from. Not under "leap.dev/", which kopf
# owns here (its progress storage prefix) and strips from the bodies it hands over.
ANNOTATION_SHAPE = "shape.leap.dev/hash"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGER = "leap-operator"

# Operator metrics (prometheus_client appends _total/_bucket where it should).
OM_RECONCILES = "leap_operator_reconciles_total"          # counter {result}
OM_RECONCILE_SECONDS = "leap_operator_reconcile_seconds"  # histogram
OM_RUNS = "leap_operator_runs"                            # gauge {phase}
OM_RESTARTS = "leap_operator_restarts_total"              # counter
OM_API_ERRORS = "leap_operator_api_errors_total"          # counter {verb, resource}
OM_GOODPUT_RATIO = "leap_operator_run_goodput_ratio"      # gauge {namespace, run}: status.goodput.ratio
OM_GOODPUT_SECONDS = "leap_operator_run_goodput_seconds"  # gauge {namespace, run, part}: status.goodput's parts
OM_RUN_STALLED = "leap_operator_run_stalled_since_seconds"  # gauge {namespace, run}: only while Stalled

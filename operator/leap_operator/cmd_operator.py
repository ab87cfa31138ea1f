"""`leap operator`: run the TrainingRun operator (kopf).

Credentials: in-cluster service account, else kubeconfig ($KUBECONFIG or ~/.kube/config).
Before starting, it checks what would otherwise fail later in kopf's retry loops, and says so in
one line: no credentials (exit 2), a KUBECONFIG naming missing files (2), a port taken (2), an API
server it cannot reach (1). Its liveness probe (/healthz) fails while the API server is
unreachable, so the kubelet restarts an operator that lost its cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import sys

from leap_trainer.contract import EXIT_FAILED, EXIT_INVALID

DEFAULT_METRICS_PORT = 8080
DEFAULT_LIVENESS_PORT = 8081


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeat for more; glob patterns like 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help=f"serve the operator's Prometheus metrics on :PORT/metrics (0: off; default {DEFAULT_METRICS_PORT})")
    parser.add_argument("--liveness-port", type=int, default=DEFAULT_LIVENESS_PORT,
                        help=f"serve kopf's liveness probe on :PORT/healthz (0: off; default {DEFAULT_LIVENESS_PORT})")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME", default=None,
                         help="HA: coordinate with other replicas through kopf peering object NAME; only the "
                              "highest-priority live replica acts (needs kopf's peering CRDs)")
    peering.add_argument("--standalone", action="store_true", help="no peering: this replica acts alone (default)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica (default 0)")
    parser.add_argument("--peering-lifetime", type=int, default=60, metavar="SECONDS",
                        help="HA: a replica that stopped renewing its peering entry for this long counts as dead, "
                             "and the next replica takes over (default 60)")
    parser.add_argument("--restart-backoff", type=float, default=_float_env("LEAP_RESTART_BACKOFF_SECONDS", 10.0),
                        help="delay before the first gang restart, doubled per restart (default 10s; env LEAP_RESTART_BACKOFF_SECONDS)")
    parser.add_argument("--restart-backoff-max", type=float, default=_float_env("LEAP_RESTART_BACKOFF_MAX_SECONDS", 300.0),
                        help="cap of the restart delay (default 300s)")
    parser.add_argument("--progress-interval", type=float, default=_float_env("LEAP_PROGRESS_INTERVAL_SECONDS", 5.0),
                        help="seconds between scrapes of rank 0's metrics while Running (default 5)")
    parser.add_argument("--workers", type=int, default=20, help="kopf's thread pool for sync handlers (default 20)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


_ROUTINE_SUCCESS = re.compile(r"^(Handler|Indexer) '[^']*' succeeded\.$")


def _drop_routine_successes(record: logging.LogRecord) -> bool:
    """kopf logs every successful handler call at INFO: with 1,000 runs, hundreds of lines a
    second that say nothing (failures, retries and Leap's own transitions still log)."""
    return not _ROUTINE_SUCCESS.match(record.getMessage())


def _one_line_probe_failures(record: logging.LogRecord) -> bool:
    """A failed liveness probe (the API server is away) is one log line, not two tracebacks: kopf's
    own line keeps its message, and aiohttp's "Error handling request" for the 500 it answers goes."""
    if record.name == "aiohttp.server" and record.exc_info and record.exc_info[0] is not None \
            and record.exc_info[0].__name__ == "ActivityError":
        return False
    if record.name.startswith("kopf.activities.prob"):
        record.exc_info, record.exc_text = None, None
    return True


def make_settings(args: argparse.Namespace):
    import kopf

    from leap_operator.handlers import FINALIZER

    settings = kopf.OperatorSettings()
    # Only the events the operator posts on purpose (one per transition); no log-line events.
    settings.posting.enabled = True
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # Coalesce bursts of watch events per object, but keep create->Job latency low.
    settings.batching.batch_window = 0.01
    settings.batching.idle_timeout = 30.0
    settings.batching.exit_timeout = 2.0
    settings.execution.max_workers = args.workers
    # A deleted run's loop removes its children before it ends: wait for that (a few requests)
    # right away rather than re-checking only after the daemon's cancellation backoff.
    settings.background.instant_exit_timeout = 3.0
    # Our finalizer and kopf's bookkeeping under leap.dev, nothing in status.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="leap.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="leap.dev")
    # Jobs and pods are watched only if they carry the run label, filtered by the API server:
    # the handlers' own label filters run in the client, after every pod of the cluster has been
    # sent, decoded and kept in kopf's memory.
    from kopf._cogs.structs.references import Selector
    from leap_operator.names import LABEL_RUN
    settings.watching.label_selectors[Selector("batch", "v1", "jobs")] = LABEL_RUN
    settings.watching.label_selectors[Selector("", "v1", "pods")] = LABEL_RUN
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.peering.standalone = args.peering is None
    if args.peering:
        settings.peering.name = args.peering
        settings.peering.mandatory = True
        settings.peering.priority = args.priority
        settings.peering.lifetime = args.peering_lifetime
    return settings


SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
PROBE_TIMEOUT = 5.0


class StartError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def connection_info():
    """kopf's ConnectionInfo for this environment, or StartError saying what is missing."""
    import kopf

    settings = kopf.OperatorSettings()
    if not os.path.exists(SERVICE_ACCOUNT_TOKEN):
        kubeconfig = os.environ.get("KUBECONFIG", "")
        paths = [os.path.expanduser(p) for p in kubeconfig.split(os.pathsep) if p.strip()]
        if paths and not any(os.path.exists(p) for p in paths):
            raise StartError(f"KUBECONFIG names {', '.join(paths)}, which does not exist; point KUBECONFIG at a "
                             "kubeconfig file (the one kubectl uses) or unset it", EXIT_INVALID)
        if not paths and not os.path.exists(os.path.expanduser("~/.kube/config")):
            raise StartError("no Kubernetes credentials: this is not a pod with a service account, KUBECONFIG is "
                             "unset and ~/.kube/config does not exist; run the operator in the cluster "
                             "(docs/install.md) or point KUBECONFIG at a kubeconfig", EXIT_INVALID)
    try:
        info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    except Exception as exc:  # a malformed kubeconfig: kopf's parser says what
        raise StartError(f"cannot use the kubeconfig ({os.environ.get('KUBECONFIG') or '~/.kube/config'}): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                         "fix it (kubectl config view shows it) or point KUBECONFIG at another", EXIT_INVALID) from None
    if info is None or not info.server:
        raise StartError("the kubeconfig names no cluster server (no current-context?); "
                         "`kubectl config use-context NAME` picks one", EXIT_INVALID)
    return info


async def probe_api(info, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """(HTTP status of GET /api, what went wrong); status 0: no answer at all."""
    from leap_operator.kube import Kube, KubeError

    kube = Kube(info=info, retries=0, timeout=timeout)
    try:
        answer = await kube.request("GET", "/api", resource="api")
        if not isinstance(answer, dict) or answer.get("kind") != "APIVersions":
            return 200, "it answers GET /api, but not as a Kubernetes API server does"
        return 200, ""
    except KubeError as exc:
        if exc.status:
            return exc.status, f"GET /api answered {exc.status} {exc.reason or exc.message}".strip()
        cause = exc.__cause__
        if isinstance(cause, asyncio.TimeoutError):
            return 0, f"no answer within {timeout:g}s"
        return 0, str(cause) if cause is not None and str(cause) else exc.message
    except Exception as exc:  # TLS setup, a bad URL: unreachable all the same
        return 0, str(exc) or type(exc).__name__
    finally:
        await kube.close()


def preflight(args: argparse.Namespace):
    from leap_operator.local.ports import bindable

    for flag, port in (("--liveness-port", args.liveness_port), ("--metrics-port", args.metrics_port)):
        if port and not bindable(port):
            raise StartError(f"cannot serve on port {port} ({flag}): the port is in use by another program; "
                             f"choose another with {flag} PORT, or {flag} 0 to turn it off", EXIT_INVALID)
    info = connection_info()
    status, why = asyncio.run(probe_api(info))
    if status in (401, 403):
        raise StartError(f"the Kubernetes API server at {info.server} refused these credentials ({why}); "
                         "renew them (kubectl auth whoami checks the same kubeconfig)", EXIT_INVALID)
    if why:
        raise StartError(f"cannot reach the Kubernetes API server at {info.server} ({why}); check that the "
                         "cluster is up and reachable from here (kubectl cluster-info uses the same "
                         "kubeconfig)", EXIT_FAILED)
    return info


def run(args: argparse.Namespace) -> int:
    try:
        preflight(args)
    except StartError as exc:
        print(f"leap operator: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import kopf

    from leap_operator import handlers, opmetrics

    kopf.configure(verbose=args.verbose, debug=args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_one_line_probe_failures)
    logging.getLogger("kopf.activities.probe").addFilter(_one_line_probe_failures)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_drop_routine_successes)
    config = handlers.ControllerConfig(backoff_base=args.restart_backoff, backoff_max=args.restart_backoff_max,
                                       progress_interval=args.progress_interval)
    registry = kopf.OperatorRegistry()
    controller = handlers.setup(registry, handlers.Controller(config))

    @kopf.on.probe(id="apiServer", errors=kopf.ErrorsMode.PERMANENT, registry=registry)
    async def api_server(**_):
        # Liveness follows the API server: kopf answers 500 on /healthz while this raises.
        info = controller.kube.info if controller.kube is not None else None
        status, why = await probe_api(info) if info is not None else (0, "not logged in yet")
        if status == 0:
            raise kopf.PermanentError(f"the Kubernetes API server is unreachable: {why}")
        return "reachable"
    # The operator keeps many long-lived objects (kopf's per-object memories, indexes, a task
    # per run). Python's full collections walk all of them and stalled reconciles for 100s of ms
    # at 1,000 runs: freeze what start-up made, and collect the young generation less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    if args.metrics_port:
        try:
            opmetrics.serve(args.metrics_port)
        except OSError as exc:  # taken since preflight
            print(f"leap operator: error: cannot serve metrics on port {args.metrics_port} ({exc.strerror}); "
                  "choose another with --metrics-port PORT, or --metrics-port 0 to turn it off", file=sys.stderr)
            return EXIT_INVALID
    namespaces = list(args.namespace)
    try:
        _kopf_run(kopf, args, registry, namespaces)
    except Exception as exc:  # kopf gave up (its own log above says more): one line, not a traceback
        print(f"leap operator: error: stopped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
              "check the API server and this operator's RBAC (docs/operator.md)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _kopf_run(kopf, args: argparse.Namespace, registry, namespaces: list[str]) -> None:
    kopf.run(
        registry=registry,
        settings=make_settings(args),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
    )

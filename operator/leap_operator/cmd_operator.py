"""`leap operator`: run the TrainingRun operator (kopf).

Credentials: in-cluster service account, else kubeconfig ($KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re

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


def run(args: argparse.Namespace) -> int:
    import kopf

    from leap_operator import handlers, opmetrics

    kopf.configure(verbose=args.verbose, debug=args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_drop_routine_successes)
    config = handlers.ControllerConfig(backoff_base=args.restart_backoff, backoff_max=args.restart_backoff_max,
                                       progress_interval=args.progress_interval)
    registry = kopf.OperatorRegistry()
    handlers.setup(registry, handlers.Controller(config))
    # The operator keeps many long-lived objects (kopf's per-object memories, indexes, a task
    # per run). Python's full collections walk all of them and stalled reconciles for 100s of ms
    # at 1,000 runs: freeze what start-up made, and collect the young generation less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    if args.metrics_port:
        opmetrics.serve(args.metrics_port)
    namespaces = list(args.namespace)
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
    return 0

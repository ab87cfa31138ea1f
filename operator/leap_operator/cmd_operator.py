"""`leap operator`: run the TrainingRun operator (kopf).

Credentials: in-cluster service account, else kubeconfig ($KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import argparse
import logging
import os

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
    parser.add_argument("--restart-backoff", type=float, default=_float_env("LEAP_RESTART_BACKOFF_SECONDS", 10.0),
                        help="delay before the first gang restart, doubled per restart (default 10s; env LEAP_RESTART_BACKOFF_SECONDS)")
    parser.add_argument("--restart-backoff-max", type=float, default=_float_env("LEAP_RESTART_BACKOFF_MAX_SECONDS", 300.0),
                        help="cap of the restart delay (default 300s)")
    parser.add_argument("--progress-interval", type=float, default=_float_env("LEAP_PROGRESS_INTERVAL_SECONDS", 5.0),
                        help="seconds between scrapes of rank 0's metrics while Running (default 5)")
    parser.add_argument("--workers", type=int, default=20, help="kopf's thread pool for sync handlers (default 20)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def make_settings(args: argparse.Namespace):
    import kopf

    from leap_operator.handlers import FINALIZER

    settings = kopf.OperatorSettings()
    # Only the events the operator posts on purpose (one per transition); no log-line events.
    settings.posting.enabled = True
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # Coalesce bursts of watch events per object, but keep create->Job latency low.
    settings.batching.batch_window = 0.05
    settings.batching.idle_timeout = 30.0
    settings.batching.exit_timeout = 2.0
    settings.execution.max_workers = args.workers
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
    return settings


def run(args: argparse.Namespace) -> int:
    import kopf

    from leap_operator import handlers, opmetrics

    kopf.configure(verbose=args.verbose, debug=args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    config = handlers.ControllerConfig(backoff_base=args.restart_backoff, backoff_max=args.restart_backoff_max,
                                       progress_interval=args.progress_interval)
    registry = kopf.OperatorRegistry()
    handlers.setup(registry, handlers.Controller(config))
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

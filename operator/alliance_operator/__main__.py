"""``alliance-operator``: run the operator (kopf) against the cluster of the current context."""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """\
what it does:
  Watches Alliance, Member and TrainingRun resources (group alliance.dev) and
  - Alliance: checks the store with the credentials of spec.store.credentialsSecret, creates
    the bucket, and runs a pod (<alliance>-init) that writes the model and its seed weights;
  - Member: runs the member's agent pod (<member>-agent) on its data claim, and reports in
    status whether the pod runs (PodReady) and whether the data is valid (DataReady, with the
    exact file, line, column and rule when it is not);
  - TrainingRun: drives the rounds (publish tasks, aggregate, validate) and writes phase,
    round, accuracy and per-round metrics to status; an Event per round.

credentials:
  In a pod: its service account. Elsewhere: $KUBECONFIG or ~/.kube/config.

settings (environment):
  ALLIANCE_OPERATOR_MEMBER_IMAGE        member and init pod image (alliance-member:<version>)
  ALLIANCE_OPERATOR_IMAGE_PULL_POLICY   (default IfNotPresent)
  ALLIANCE_OPERATOR_RUN_AS_USER         uid of member pods (default 10001)
  ALLIANCE_OPERATOR_HEARTBEAT_TIMEOUT   seconds of silence after which a member is lost (60)
  ALLIANCE_OPERATOR_RUN_INTERVAL        seconds between two looks at the store while a run
                                        waits for its members (0.05)
  ALLIANCE_OPERATOR_MEMBER_INTERVAL     ... of a member (3)
  ALLIANCE_OPERATOR_ALLIANCE_INTERVAL   ... of an alliance (10)
  ALLIANCE_OPERATOR_STORE_RETRY_SECONDS how long one store call retries within a reconcile (5)
  ALLIANCE_OPERATOR_METRICS_PORT        port of the Prometheus metrics, /metrics (9090; 0: off)

metrics (Prometheus, on ALLIANCE_OPERATOR_METRICS_PORT):
  alliance_rounds_completed_total, alliance_round_duration_seconds, alliance_round_accuracy,
  alliance_round_loss, alliance_members_dropped_total, alliance_update_bytes_total,
  alliance_aggregation_seconds (labels namespace, run); alliance_members_ready (labels
  namespace, alliance). Only what happens while this process runs is counted.

examples:
  alliance-operator --all-namespaces
  alliance-operator --namespace team-a --namespace team-b --verbose
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alliance-operator",
        description="The alliance Kubernetes operator: reconciles Alliances, Members and "
        "TrainingRuns. Run one replica (it runs standalone, without kopf peering).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch this namespace (repeatable; glob patterns like team-* work)",
    )
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch the whole cluster"
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each handler call")
    parser.add_argument("--debug", action="store_true", help="log API requests too")
    parser.add_argument(
        "--log-format",
        choices=["plain", "full", "json"],
        default="full",
        help="log line format (default full)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import kopf

    kopf.configure(
        verbose=args.verbose,
        debug=args.debug,
        log_format=kopf.LogFormat[args.log_format.upper()],
    )
    if not args.debug:  # --verbose is about the handlers, not every HTTP request
        for noisy in ("urllib3", "kubernetes", "minio"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    try:
        import alliance_operator.main  # noqa: F401  (registers the handlers)
    except ValueError as exc:  # a bad ALLIANCE_OPERATOR_* setting
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespaces or (),
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Helm chart's pre-delete hook: delete the release's Alliances and wait until they are gone.

    python -m alliance_operator.uninstall --namespace NS --release NAME --selector LABELS

An Alliance carries the operator's finalizer (alliance.dev/finalizer): it is gone only once the
operator has seen its deletion. ``helm uninstall`` deletes the operator's Deployment,
ServiceAccount and RBAC in the same sweep as the Alliance, so the finalizer would never be
removed. The chart runs this module as a ``pre-delete`` hook, before that sweep, while the
operator still runs; it has its own ServiceAccount and a Role that allows only ``list`` and
``delete`` on alliances in the release namespace (the two calls below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import kubernetes
from kubernetes.client.rest import ApiException

from alliance_operator import k8s
from alliance_operator.constants import ALLIANCES, FINALIZER, GROUP, VERSION

#: Helm writes these on every object of a release (and refuses to adopt an object without them).
RELEASE_NAME = "meta.helm.sh/release-name"
RELEASE_NAMESPACE = "meta.helm.sh/release-namespace"

EPILOG = f"""\
what it does:
  1. lists the Alliances in NAMESPACE that match SELECTOR and that Helm's release RELEASE
     owns (the annotations {RELEASE_NAME} and {RELEASE_NAMESPACE}):
     an Alliance you created with the same labels is left alone;
  2. deletes them (the operator handles each deletion, then removes its finalizer
     {FINALIZER});
  3. waits until they are gone; after TIMEOUT seconds it exits 1 and names each one left,
     with its finalizers.

exit status: 0 when none is left (or there was none), 1 on a timeout or an API error.

credentials:
  In a pod: its service account (the chart's hook gets its own). Elsewhere: $KUBECONFIG or
  ~/.kube/config.

example (what the chart's hook runs for the release "alliance" in the namespace "alliance"):
  python -m alliance_operator.uninstall --namespace alliance --release alliance \\
      --timeout 120 --selector \\
      app.kubernetes.io/instance=alliance,app.kubernetes.io/name=alliance,app.kubernetes.io/component=alliance
"""


def owned_by_release(obj: dict, release: str, namespace: str) -> bool:
    annotations = obj["metadata"].get("annotations") or {}
    return (
        annotations.get(RELEASE_NAME) == release and annotations.get(RELEASE_NAMESPACE) == namespace
    )


def describe(obj: dict) -> str:
    meta = obj["metadata"]
    state = "being deleted" if meta.get("deletionTimestamp") else "not being deleted"
    finalizers = ", ".join(meta.get("finalizers") or []) or "none"
    return f"Alliance {meta['namespace']}/{meta['name']}: {state}, finalizers: {finalizers}"


def timeout_message(left: list[dict], namespace: str, timeout: float) -> str:
    patch = """'{"metadata":{"finalizers":null}}'"""
    return "\n".join(
        [
            f"FAILED: after {timeout:g} s, {len(left)} Alliance(s) are still there:",
            *(f"  {describe(obj)}" for obj in left),
            f"The operator removes its finalizer {FINALIZER} once it has handled a deletion.",
            "Is it running? kubectl -n "
            f"{namespace} get pods -l app.kubernetes.io/component=operator (and its logs).",
            "Start it and run helm uninstall again. Without an operator, remove the finalizer "
            "yourself (the operator's clean-up is then skipped), then run helm uninstall again:",
            f"  kubectl -n {namespace} patch alliance NAME --type=merge -p {patch}",
        ]
    )


class Alliances:
    """The two API calls of the hook (its Role grants exactly these)."""

    def __init__(self, namespace: str, selector: str) -> None:
        self.namespace, self.selector = namespace, selector
        self.api = kubernetes.client.CustomObjectsApi()

    def list(self) -> list[dict]:
        response = self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, ALLIANCES,
            label_selector=self.selector, _preload_content=False,
        )  # fmt: skip
        return json.loads(response.data).get("items", [])

    def delete(self, name: str) -> None:
        try:
            self.api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, ALLIANCES, name, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:  # gone already: done
                raise


def remove(
    alliances: Alliances,
    release: str,
    timeout: float,
    poll: float = 1.0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Delete the release's Alliances and wait for them; returns those left at the timeout."""
    deadline = time.monotonic() + timeout
    ns = alliances.namespace
    targets = [o for o in alliances.list() if owned_by_release(o, release, ns)]
    if not targets:
        log(f"no Alliance of the release {release} in {ns}: nothing to delete")
        return []
    for obj in targets:
        log(f"deleting Alliance {ns}/{obj['metadata']['name']}")
        alliances.delete(obj["metadata"]["name"])
    # By uid: an Alliance created again under the same name meanwhile is not the one we wait for.
    uids = {obj["metadata"]["uid"] for obj in targets}
    start = time.monotonic()
    while True:
        left = [o for o in alliances.list() if o["metadata"]["uid"] in uids]
        if not left:
            log(f"gone after {time.monotonic() - start:.1f} s")
            return []
        if time.monotonic() >= deadline:
            return left
        time.sleep(poll)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alliance_operator.uninstall",
        description="Delete the Alliances a Helm release created and wait until the operator\n"
        "has removed its finalizer from them: the chart's pre-delete hook, run while the\n"
        "operator still runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--namespace", required=True, help="the release namespace")
    parser.add_argument("--release", required=True, help="the Helm release's name")
    parser.add_argument(
        "--selector",
        default="",
        help="a label selector narrowing the Alliances looked at (default: all in NAMESPACE)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for them to be gone (default 120); keep it below helm "
        "uninstall's --timeout (5m0s by default): this module then explains a failure, not "
        "Helm's timeout",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    k8s.login()
    try:
        left = remove(Alliances(args.namespace, args.selector), args.release, args.timeout)
    except ApiException as exc:
        print(
            f"FAILED: {exc.status} {exc.reason} from the Kubernetes API: {exc.body}\n"
            "The hook needs list and delete on alliances.alliance.dev in "
            f"{args.namespace} (its Role).",
            file=sys.stderr,
        )
        return 1
    if left:
        print(timeout_message(left, args.namespace, args.timeout), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Alliance: reach the store, create the bucket and the seed model, report readiness.

Conditions: StoreReady (the Secret is there and the store answers with it), ModelReady (the
model definition and seed weights are in the bucket), Ready (both).
"""

from __future__ import annotations

import kopf

from alliance.store import StoreError
from alliance_operator import k8s
from alliance_operator.conditions import is_true
from alliance_operator.context import Context
from alliance_operator.podstate import PodHealth, pod_state
from alliance_operator.resources.pods import init_pod, init_pod_name
from alliance_operator.status import StatusUpdate
from alliance_operator.stores import StoreUnavailable


def reconcile(ctx: Context, body: dict, logger) -> dict:
    """One pass; returns the status patch."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = body["spec"]
    status = StatusUpdate(body)
    old, new, cond = status.old, status.new, status.set

    manifest = None
    try:
        store = ctx.stores.for_alliance(namespace, body)
        store.ensure_bucket()
        manifest = store.get_alliance()
    except StoreUnavailable as exc:
        cond("StoreReady", False, exc.reason, exc.message)
    except StoreError as exc:
        cond("StoreReady", False, "StoreUnreachable", str(exc))
    else:
        where = f"bucket {spec['store']['bucket']} at {spec['store']['endpoint']}"
        cond("StoreReady", True, "Connected", f"{where} is reachable")

    pod_name = init_pod_name(name)
    if manifest is not None:
        new["seedModelId"] = manifest["seedModelId"]
        model = manifest.get("model", {})
        what = model.get("name") or model.get("kind") or "model"
        cond(
            "ModelReady",
            True,
            "Initialized",
            f"{what} with {manifest.get('parameters', '?')} parameters, "
            f"seed model {manifest['seedModelId'][:12]}",
        )
        if not is_true(old.get("conditions"), "ModelReady"):
            k8s.delete_pod(namespace, pod_name)  # its work is done (no-op when already gone)
    elif status.is_true("StoreReady"):
        state = pod_state(k8s.get_pod(namespace, pod_name))
        if state.health == PodHealth.ABSENT:
            pod = init_pod(
                name,
                spec,
                ctx.config.member_image,
                ctx.config.image_pull_policy,
                ctx.config.run_as_user,
            )
            kopf.adopt(pod, owner=body)
            k8s.create_pod(namespace, pod)
            logger.info("created pod %s to initialise the alliance", pod_name)
            cond("ModelReady", False, "Initializing", f"pod {pod_name} creates the seed model")
        elif state.health == PodHealth.SUCCEEDED:
            # It exited 0 yet the bucket holds no alliance.json (deleted since?): again.
            cond("ModelReady", False, "InitFailed", f"pod {pod_name} left no model: retrying")
            k8s.delete_pod(namespace, pod_name)
        elif state.health in (PodHealth.STUCK, PodHealth.FAILED) or state.exit_message:
            message = state.message or state.exit_message
            cond("ModelReady", False, "InitFailed", f"pod {pod_name}: {state.reason}: {message}")
            if state.health == PodHealth.FAILED:
                k8s.delete_pod(namespace, pod_name)  # the next pass tries again
        else:
            cond("ModelReady", False, "Initializing", f"pod {pod_name} creates the seed model")
    else:
        cond("ModelReady", None, "WaitingForStore", "the store must be reachable first")

    ready = status.is_true("StoreReady") and status.is_true("ModelReady")
    not_ready = [c for c in status.conditions if c["type"] != "Ready" and c["status"] != "True"]
    cond(
        "Ready",
        ready,
        "Ready" if ready else not_ready[0]["reason"],
        "the alliance accepts members and runs" if ready else not_ready[0]["message"],
    )
    return status.patch()

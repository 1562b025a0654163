"""Member: give the member its own store keys, run its agent pod on its data claim (unless
it is remote), and report what the agent says.

Conditions: CredentialsReady (its keys are in the Secret <member>-store), ClaimAllowed (the
claim exists and is marked for this Member: annotation alliance.dev/member), PodReady (the
agent's pod runs; not for a remote member), DataReady (the agent validated its data; when not,
the message is the exact error: file, line, column, rule), Ready (all of them).
The data verdict comes from the agent's heartbeat in the store: members have no Kubernetes
API rights, the store is their only channel.
"""

from __future__ import annotations

import time

import kopf

from alliance import identities
from alliance.store import StoreError
from alliance_operator import claims, heartbeat, identity, k8s, metrics
from alliance_operator.constants import ALLIANCES, ANNOTATION_SPEC_HASH
from alliance_operator.context import Context
from alliance_operator.podstate import PodHealth, pod_state
from alliance_operator.resources.pods import member_pod, member_pod_name
from alliance_operator.status import StatusUpdate
from alliance_operator.stores import StoreUnavailable


def reconcile(ctx: Context, body: dict, logger) -> dict:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = body["spec"]
    status = StatusUpdate(body)
    new, cond = status.new, status.set

    alliance = k8s.get_custom(namespace, ALLIANCES, spec["alliance"])
    if alliance is None:
        cond("AllianceFound", False, "AllianceNotFound", f'Alliance "{spec["alliance"]}" not found')
        cond("Ready", False, "AllianceNotFound", f'Alliance "{spec["alliance"]}" not found')
        new.update(phase="Pending", message=f'waiting for Alliance "{spec["alliance"]}"')
        return _finish(status)
    cond("AllianceFound", True, "Found", f'member of Alliance "{spec["alliance"]}"')

    pod_name = member_pod_name(name)
    remote = bool(spec.get("remote"))
    refusal = None if remote else claims.refusal(namespace, name, spec.get("dataVolumeClaim"))
    if remote:
        status.drop("ClaimAllowed")
    elif refusal:
        cond("ClaimAllowed", False, *refusal)
    else:
        cond("ClaimAllowed", True, "Marked", f'claim "{spec["dataVolumeClaim"]}" is marked for it')
    try:
        admin = ctx.stores.admin_config(namespace, alliance)
        credentials = identity.ensure(body, alliance, admin)
    except (StoreUnavailable, identity.IdentityError) as exc:
        credentials = None
        cond("CredentialsReady", False, exc.reason, exc.message)
    else:
        cond("CredentialsReady", True, "Issued", f"its own store keys: Secret {credentials.secret}")

    pod = k8s.get_pod(namespace, pod_name)
    state = pod_state(pod)
    if remote or refusal:
        if pod is not None:  # it became remote, or its claim is no longer its own
            k8s.delete_pod(namespace, pod_name)
            kopf.info(body, reason="PodDeleted", message=f"deleted pod {pod_name}")
        if remote:
            status.drop("PodReady")
            new.pop("pod", None)
            new.pop("restarts", None)
        else:
            cond("PodReady", False, refusal[0], refusal[1])
        ctx.losses.observe(namespace, name, spec["alliance"], not remote)
        pod_ok = remote
    else:
        pod_ok = _run_pod(ctx, body, alliance, credentials, pod, state, status)

    beat, beat_age = None, None
    try:
        content, written = ctx.stores.for_alliance(namespace, alliance).get_heartbeat(name)
        beat = heartbeat.read(content)
    except (StoreUnavailable, StoreError) as exc:
        cond("DataReady", None, "StoreUnreachable", f"cannot read the agent's heartbeat: {exc}")
    else:
        heartbeat.data_condition(cond, beat)
        beat_age = None if written is None else max(0.0, time.time() - written)
    stale = beat_age is not None and beat_age > ctx.config.heartbeat_timeout

    data_ok = status.is_true("DataReady")
    data_bad = status.get("DataReady").get("status") == "False"
    if beat and beat.get("state") == "ready":
        new["trainRows"] = int(beat.get("trainRows") or 0)
        new["testRows"] = int(beat.get("testRows") or 0)
    if refusal:
        cond("Ready", False, *refusal)
        new.update(phase="Refused", message=refusal[1])
    elif pod_ok and data_ok and stale:
        # The pod runs but the agent is silent (hung, or cut off from the store): the runs
        # count it as lost, so it is not Ready either.
        message = f"no heartbeat for {beat_age:.0f} s (the agent may be hung or cut off)"
        ready_before = status.get("Ready")
        if ready_before.get("reason") != "HeartbeatStale":
            kopf.warn(body, reason="HeartbeatStale", message=message)
        cond("Ready", False, "HeartbeatStale", message)
        new.update(phase="Unresponsive", message=message)
    elif pod_ok and data_ok:
        cond("Ready", True, "Ready", "the agent runs with valid data and takes work")
        new.update(phase="Ready", message="taking work")
    elif data_bad:
        message = status.get("DataReady")["message"]
        cond("Ready", False, "InvalidData", message)
        new.update(phase="InvalidData", message=message)
    elif credentials is None:
        failed = status.get("CredentialsReady")
        cond("Ready", False, failed["reason"], failed["message"])
        new.update(phase="Pending", message=failed["message"])
    elif not remote and state.health in (PodHealth.STUCK, PodHealth.FAILED):
        cond("Ready", False, state.reason, state.message)
        new.update(phase=state.reason, message=state.message)
    else:
        waiting = next(
            c
            for c in status.conditions
            if c["type"] in ("PodReady", "DataReady") and c["status"] != "True"
        )
        cond("Ready", False, waiting["reason"], waiting["message"])
        new.update(phase="Starting", message=waiting["message"])
    return _finish(status)


def _run_pod(ctx: Context, body: dict, alliance: dict, credentials, pod, state, status) -> bool:
    """Create, replace or keep the agent's pod; returns whether it runs. Without credentials
    (the store or the Secret is not usable now) an existing pod is kept as it is."""
    meta, spec = body["metadata"], body["spec"]
    name, namespace = meta["name"], meta["namespace"]
    pod_name = member_pod_name(name)
    ctx.losses.observe(namespace, name, spec["alliance"], state.lost)
    desired = None
    if credentials is not None:
        desired = member_pod(
            name,
            spec,
            alliance["spec"],
            ctx.config.member_image,
            ctx.config.image_pull_policy,
            ctx.config.run_as_user,
            credentials_secret=credentials.secret,
            credentials_digest=credentials.digest,
            has_ca=credentials.has_ca,
        )
    if state.health == PodHealth.FAILED:
        # Evicted, or exited for good: a Member always wants its agent, so replace the pod.
        kopf.warn(
            body, reason="PodFailed", message=f"pod {pod_name}: {state.reason}: {state.message}"
        )
        k8s.delete_pod(namespace, pod_name)
    elif pod is not None and desired and state.health != PodHealth.TERMINATING:
        current = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
        if current != desired["metadata"]["annotations"][ANNOTATION_SPEC_HASH]:
            kopf.info(
                body,
                reason="PodReplaced",
                message=f"the spec or the store keys changed: replacing {pod_name}",
            )
            k8s.delete_pod(namespace, pod_name)
    elif pod is None and desired:
        kopf.adopt(desired, owner=body)
        k8s.create_pod(namespace, desired)
        kopf.info(body, reason="PodCreated", message=f"created pod {pod_name}")

    if state.restarts > int(status.old.get("restarts") or 0):
        kopf.warn(
            body,
            reason="AgentRestarted",
            message=f"pod {pod_name} restarted ({state.restarts} restarts): "
            f"{state.exit_message or state.reason}",
        )
    status.new["restarts"] = state.restarts
    status.new["pod"] = pod_name
    pod_ok = state.health == PodHealth.RUNNING
    status.set("PodReady", pod_ok, state.reason, f"pod {pod_name}: {state.message}")
    return pod_ok


def _finish(status: StatusUpdate) -> dict:
    meta = status.body["metadata"]
    if not meta.get("deletionTimestamp"):  # being deleted: deleted() takes it out
        metrics.member_ready(
            meta["namespace"],
            meta["name"],
            meta["uid"],
            status.body["spec"]["alliance"],
            status.is_true("Ready"),
        )
    return status.patch()


def deleted(ctx: Context, body: dict, logger) -> None:
    """The Member is gone: its store user is removed, and it no longer counts in its
    alliance's ready members. (The runs already count it lost: it left kopf's index of members
    when its deletion began.) Its Secret and pod go by garbage collection (it owns them)."""
    meta = body["metadata"]
    ctx.losses.forget(meta["namespace"], meta["name"])
    metrics.forget_member(meta["namespace"], meta["name"], meta["uid"])
    alliance = k8s.get_custom(meta["namespace"], ALLIANCES, body["spec"]["alliance"])
    if alliance is None:
        logger.warning("its Alliance is gone: the member's store user stays")
        return
    if not identity.generated(alliance):
        return  # the store's admin made the user, and removes it
    try:
        identities.remove(ctx.stores.admin_config(meta["namespace"], alliance), meta["name"])
    except StoreUnavailable as exc:
        logger.warning("the member's store user stays: %s", exc.message)
    except StoreError as exc:
        raise kopf.TemporaryError(f"cannot remove the member's store user: {exc}", delay=5) from exc
    logger.info("removed the member's store user")

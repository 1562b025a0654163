"""A tiny kopf operator that proves kopf runs against the test API server (tests/test_kubeapi.py).

Run as ``python -m kopf run --standalone --namespace default tests/kube/_kopf_smoke.py`` with
KUBECONFIG set. For each Alliance it adds its finalizer, creates a child ConfigMap adopted by the
Alliance, marks the Alliance Ready and posts an Event; on deletion it posts another Event and lets
the garbage collector remove the child. Its settings are those a production operator uses.
"""

from __future__ import annotations

import datetime as dt
import logging

import kopf
import kubernetes


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: object) -> None:
    settings.persistence.finalizer = "alliance.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="alliance.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="alliance.dev")
    settings.posting.level = logging.INFO
    kubernetes.config.load_kube_config()  # the handlers' own client: the same KUBECONFIG


@kopf.on.create("alliance.dev", "v1alpha1", "alliances")
def create_child(
    body: kopf.Body, name: str, namespace: str, patch: kopf.Patch, **_: object
) -> None:
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-child"},
        "data": {"alliance": name},
    }
    kopf.adopt(child, owner=body)
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, child)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch.status["conditions"] = [
        {
            "type": "Ready",
            "status": "True",
            "lastTransitionTime": now,
            "reason": "ChildCreated",
            "message": "the child exists",
        }
    ]
    patch.status["observedGeneration"] = body.metadata["generation"]
    kopf.info(body, reason="ChildCreated", message=f"created the child of {name}")  # an Event


@kopf.on.delete("alliance.dev", "v1alpha1", "alliances")
def delete_alliance(body: kopf.Body, name: str, **_: object) -> None:
    kopf.info(body, reason="Deleting", message=f"deleting alliance {name}")

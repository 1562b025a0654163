"""The operator's entry point for kopf: the only module with kopf decorators.

    kopf run -m alliance_operator.main --all-namespaces      (or: alliance-operator)

Every resource is reconciled by a timer (level-based: read the object and the store, act,
write status), so a restarted operator picks up exactly where the statuses say.
"""

from __future__ import annotations

import logging

import kopf

from alliance_operator import k8s, metrics
from alliance_operator.config import OperatorConfig
from alliance_operator.constants import (
    ALLIANCES,
    ANNOTATION_PREFIX,
    FINALIZER,
    GROUP,
    MEMBERS,
    TRAININGRUNS,
    VERSION,
)
from alliance_operator.diffbase import DigestDiffBaseStorage
from alliance_operator.handlers import alliance, member, trainingrun
from alliance_operator.handlers.common import Context

CONFIG = OperatorConfig.from_env()
CTX = Context.from_config(CONFIG)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = DigestDiffBaseStorage()
    settings.posting.level = logging.INFO
    # Restart a watch that went silent (a proxy dropped it) well before anyone notices.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 20
    k8s.login()
    if CONFIG.metrics_port:
        metrics.serve(CONFIG.metrics_port)


def _apply(patch: kopf.Patch, status: dict) -> None:
    if status:
        patch.status.update(status)


@kopf.timer(GROUP, VERSION, ALLIANCES, interval=CONFIG.alliance_interval, backoff=5)
def alliance_timer(body, patch, logger, **_) -> None:
    _apply(patch, alliance.reconcile(CTX, body, logger))


@kopf.timer(GROUP, VERSION, MEMBERS, interval=CONFIG.member_interval, backoff=5)
def member_timer(body, patch, logger, **_) -> None:
    _apply(patch, member.reconcile(CTX, body, logger))


@kopf.timer(GROUP, VERSION, TRAININGRUNS, interval=CONFIG.run_interval, backoff=5)
def trainingrun_timer(body, patch, logger, **_) -> None:
    _apply(patch, trainingrun.reconcile(CTX, body, logger))


@kopf.on.delete(GROUP, VERSION, TRAININGRUNS, backoff=10, retries=30)
def trainingrun_deleted(body, logger, **_) -> None:
    trainingrun.cleanup(CTX, body, logger)


# Optional: it adds no finalizer of its own (the timer's keeps the Member until kopf saw it go).
@kopf.on.delete(GROUP, VERSION, MEMBERS, optional=True)
def member_deleted(body, **_) -> None:
    member.deleted(body)

"""The operator's entry point for kopf: the only module with kopf decorators.

    kopf run -m alliance_operator.main --all-namespaces      (or: alliance-operator)

Alliances and Members are reconciled by timers (level-based: read the object and the store,
act, write status); each TrainingRun has a daemon that drives it with the engine's one loop
(alliance/driver.py). Everything a run needs is in its status and the store, so a restarted
operator picks up exactly where the statuses say.
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
from alliance_operator.context import Context
from alliance_operator.diffbase import DigestDiffBaseStorage
from alliance_operator.handlers import alliance, member, trainingrun

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
    # Each TrainingRun's daemon holds a thread while its run lasts; timers need some too.
    settings.execution.max_workers = 64
    # A daemon or timer told to stop (its object is being deleted) exits within a poll of its
    # loop: wait that long for it rather than kopf's default re-check a minute later, so a
    # delete takes about a second.
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 1.0
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


# Each alliance's Members, by (namespace, alliance): the only members its runs count. kopf
# fills an index before any daemon starts; a Member being deleted leaves it at once.
@kopf.index(GROUP, VERSION, MEMBERS, when=lambda meta, **_: not meta.get("deletionTimestamp"))
def alliance_members(namespace, name, spec, **_) -> dict:
    return {(namespace, spec.get("alliance")): name}


# One thread per TrainingRun for its whole life: it drives the run (alliance/driver.py).
@kopf.daemon(GROUP, VERSION, TRAININGRUNS, backoff=5)
def trainingrun_daemon(body, stopped, logger, alliance_members: kopf.Index, **_) -> None:
    trainingrun.daemon(CTX, body, stopped, logger, alliance_members)


@kopf.on.delete(GROUP, VERSION, TRAININGRUNS, backoff=10, retries=30)
def trainingrun_deleted(body, logger, **_) -> None:
    trainingrun.cleanup(CTX, body, logger)


# Removes the member's store user; gives up after a minute of an unreachable store (a Member
# must stay deletable), leaving the user to the next provisioning of that name.
@kopf.on.delete(GROUP, VERSION, MEMBERS, backoff=5, retries=12)
def member_deleted(body, logger, **_) -> None:
    member.deleted(CTX, body, logger)

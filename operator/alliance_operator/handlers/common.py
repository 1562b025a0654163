"""What the reconcilers share: the operator's context, status diffs, condition Events."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import kopf

from alliance_operator.config import OperatorConfig
from alliance_operator.stores import Stores


@dataclass
class Context:
    config: OperatorConfig
    stores: Stores
    #: Per TrainingRun uid: its Coordinator, whose caches (last model, heartbeats) spare the
    #: store a download per tick. Only a cache: a restarted operator rebuilds it from status.
    coordinators: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_config(cls, config: OperatorConfig) -> Context:
        return cls(config=config, stores=Stores(config.store_retry_seconds))


def changed(old: dict, new: dict) -> dict:
    """The merge patch from ``old`` to ``new`` status: changed keys, and None (delete) for
    keys that are gone."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


#: Condition types whose False (or True) deserves a Warning Event.
WARN_WHEN_FALSE = {"StoreReady", "ModelReady", "DataReady", "PodReady", "AllianceFound"}
WARN_WHEN_TRUE = {"Invalid"}


def report_transitions(body: dict, old: list[dict] | None, new: list[dict]) -> None:
    """An Event for every condition that changed status or reason."""
    before = {c["type"]: c for c in old or ()}
    for cond in new:
        prev = before.get(cond["type"])
        if prev and (prev["status"], prev["reason"]) == (cond["status"], cond["reason"]):
            continue
        if prev is None and cond["status"] == "Unknown":
            continue  # nothing learned yet
        warn = (cond["status"] == "False" and cond["type"] in WARN_WHEN_FALSE) or (
            cond["status"] == "True" and cond["type"] in WARN_WHEN_TRUE
        )
        kopf.event(
            body,
            type="Warning" if warn else "Normal",
            reason=cond["reason"],
            message=f"{cond['type']}={cond['status']}: {cond['message']}"[:1024],
        )

"""What every handler gets: the operator's settings, its store clients, what the Member
handler saw of each member (for the runs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alliance_operator.config import OperatorConfig
from alliance_operator.losses import MemberLosses
from alliance_operator.stores import Stores


@dataclass
class Context:
    config: OperatorConfig
    stores: Stores
    #: What the Member handler saw of each member, for the runs (losses.py).
    losses: MemberLosses = field(default_factory=MemberLosses)

    @classmethod
    def from_config(cls, config: OperatorConfig) -> Context:
        return cls(config=config, stores=Stores(config.store_retry_seconds))

"""kopf's record of the last handled state, kept as a digest so that it cannot outgrow the API.

kopf stores an object's "essence" (its spec, labels and annotations) in an annotation, to tell
later whether the object changed. A copy grows with what the resource's author writes: all
annotations of an object together may hold 256 KiB, so a large spec or a large annotation made
every patch of that object fail, and with it the removal of the operator's finalizer (a Member
that could never be deleted). The operator has no handler that reads the old state (no on.update
or on.field): kopf only needs to know whether something changed, and a digest says exactly that
in under 80 bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import kopf

from alliance_operator.constants import ANNOTATION_PREFIX

KEY = "last-handled-configuration"


class DigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    def __init__(self) -> None:
        super().__init__(prefix=ANNOTATION_PREFIX, key=KEY)

    def build(self, *, body: kopf.Body, extra_fields: Iterable[str] | None = None) -> dict:
        essence = super().build(body=body, extra_fields=extra_fields)
        canonical = json.dumps(essence, sort_keys=True, separators=(",", ":"), default=str)
        return {"sha256": hashlib.sha256(canonical.encode()).hexdigest()}

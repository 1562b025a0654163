"""Which PersistentVolumeClaim a Member may mount: only one marked for it (annotation
alliance.dev/member), so no Member can read another member's data by naming its claim, and one
claim serves one Member.
"""

from __future__ import annotations

from alliance_operator import k8s
from alliance_operator.constants import ANNOTATION_CLAIM_MEMBER


def refusal(namespace: str, member: str, claim_name: str | None) -> tuple[str, str] | None:
    """Why the Member may not mount its claim, as (reason, message); None when it may. A claim
    is a member's only when marked for it: else any Member could read any claim's data."""
    if not claim_name:
        return "NoClaim", "spec.dataVolumeClaim: required unless spec.remote is true"
    claim = k8s.get_claim(namespace, claim_name)
    if claim is None:
        return "ClaimNotFound", f'PersistentVolumeClaim "{claim_name}" not found'
    owner = (claim["metadata"].get("annotations") or {}).get(ANNOTATION_CLAIM_MEMBER)
    if owner == member:
        return None
    if owner:
        return (
            "ClaimNotMarked",
            f'PersistentVolumeClaim "{claim_name}" is marked for Member "{owner}", not this '
            "one: a claim holds one member's data",
        )
    return (
        "ClaimNotMarked",
        f'PersistentVolumeClaim "{claim_name}" is not marked for this Member: its owner allows '
        f"it with `kubectl annotate pvc {claim_name} -n {namespace} "
        f"{ANNOTATION_CLAIM_MEMBER}={member}`",
    )

"""A Member's store identity: its own S3 user and policy (alliance/identities.py) and the
Secret ``<member>-store`` holding its keys, which its pod (or, for a remote member, its join
bundle) gets. Members never see the Alliance's admin keys.

With the Alliance's ``spec.store.memberKeys: Provided`` (an S3 service without MinIO's admin
API) the store's admin makes the users and the Secrets; the operator only checks them.

Made when missing; made again, with a new key, when the Member's annotation
``alliance.dev/rotate-credentials`` takes a new value, when the store lost the user, or when
the CA or a remote member's endpoint changed. Every pass also deletes service accounts the
member created (alliance.identities.sweep). Deleting the Member removes its user.
"""

from __future__ import annotations

from typing import NamedTuple

import kopf

from alliance import contract, identities
from alliance.store import StoreConfig, StoreError
from alliance_operator import k8s
from alliance_operator.constants import (
    ANNOTATION_CLAIM_MEMBER,
    ANNOTATION_ROTATE,
    ANNOTATION_ROTATED,
)
from alliance_operator.resources.secrets import (
    BUNDLE_KEY,
    credentials_digest,
    member_secret,
    member_secret_name,
)


class Credentials(NamedTuple):
    secret: str  # the Secret's name
    digest: str  # of the keys (resources/secrets.py)
    has_ca: bool


class IdentityError(Exception):
    """The member's identity cannot be made; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def bundle_endpoint(body: dict, alliance: dict) -> str | None:
    """Where a remote member reaches the store (None: the member is not remote)."""
    if not body["spec"].get("remote"):
        return None
    store = alliance["spec"]["store"]
    return store.get("remoteEndpoint") or store["endpoint"]


def ensure(body: dict, alliance: dict, admin: StoreConfig) -> Credentials:
    """The member's identity as it should be, made or repaired as needed (idempotent)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        identities.check_name(name)
    except StoreError as exc:
        raise IdentityError("InvalidName", f"metadata.name: {exc}") from None
    if generated(alliance):
        return _generated(body, alliance, admin)
    return _provided(namespace, name)


def generated(alliance: dict) -> bool:
    """Whether the operator makes the members' keys (else the store's admin provides them)."""
    return alliance["spec"]["store"].get("memberKeys", "Generated") == "Generated"


def _provided(namespace: str, member: str) -> Credentials:
    """Keys the store's admin made (an S3 service without MinIO's admin API): only checked."""
    secret_name = member_secret_name(member)
    secret = k8s.get_secret(namespace, secret_name)
    where = f'spec.store.memberKeys is Provided: Secret "{secret_name}"'
    if secret is None:
        raise IdentityError(
            "SecretNotFound",
            f"{where} not found: the store's admin makes the member's user with the policy "
            f"of `alliance identities policy --bucket BUCKET {member}` and puts its keys there",
        )
    annotations = secret["metadata"].get("annotations") or {}
    if annotations.get(ANNOTATION_CLAIM_MEMBER) != member:
        raise IdentityError(
            "SecretNotMarked", f"{where} is not marked {ANNOTATION_CLAIM_MEMBER}={member}"
        )
    data = secret["data"]
    for key in (contract.SECRET_ACCESS_KEY, contract.SECRET_SECRET_KEY):
        if not data.get(key):
            raise IdentityError("SecretKeyMissing", f'{where} has no key "{key}"')
    ca = data.get(contract.SECRET_CA_CERT, "")
    keys = StoreConfig(
        "", data[contract.SECRET_ACCESS_KEY], data[contract.SECRET_SECRET_KEY], "", ca
    )
    return Credentials(secret_name, credentials_digest(keys), bool(ca))


def _generated(body: dict, alliance: dict, admin: StoreConfig) -> Credentials:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    secret_name = member_secret_name(name)
    rotation = (meta.get("annotations") or {}).get(ANNOTATION_ROTATE, "")
    endpoint = bundle_endpoint(body, alliance)
    secret = k8s.get_secret(namespace, secret_name)
    owners = [] if secret is None else secret["metadata"].get("ownerReferences") or []
    if secret is not None and not any(o.get("uid") == meta["uid"] for o in owners):
        raise IdentityError(
            "SecretConflict",
            f'Secret "{secret_name}" exists and is not this Member\'s: the operator keeps the '
            "member's keys there; delete or rename that Secret",
        )
    data = {} if secret is None else secret["data"]
    annotations = {} if secret is None else secret["metadata"].get("annotations") or {}
    keys = StoreConfig(
        admin.endpoint,
        data.get(contract.SECRET_ACCESS_KEY, ""),
        data.get(contract.SECRET_SECRET_KEY, ""),
        admin.bucket,
        data.get(contract.SECRET_CA_CERT, ""),
    )
    why = None
    if secret is None:
        why = "created"
    elif annotations.get(ANNOTATION_ROTATED, "") != rotation:
        why = f"rotated ({ANNOTATION_ROTATE}={rotation})"
    elif keys.access_key != identities.user_name(admin.bucket, name) or not keys.secret_key:
        why = "made again (the Secret's keys were not the member's)"
    elif keys.ca_cert != admin.ca_cert:
        why = "made again (the store's CA changed)"
    elif endpoint and f"endpoint: {endpoint}\n" not in data.get(BUNDLE_KEY, ""):
        why = "made again with its join bundle"
    elif not identities.exists(admin, name):
        why = "made again (the store had lost the member's user)"
    try:
        if why:
            keys = identities.provision(admin, [name])[name]
            wanted = member_secret(
                name, body["spec"]["alliance"], keys, rotation=rotation, bundle_endpoint=endpoint
            )
            if secret is None:
                kopf.adopt(wanted, owner=body)
                k8s.create_secret(namespace, wanted)
            else:
                patch = {"metadata": {"annotations": wanted["metadata"]["annotations"]}}
                k8s.patch_secret(
                    namespace, secret_name, {**patch, "stringData": wanted["stringData"]}
                )
            kopf.info(
                body,
                reason="CredentialsIssued",
                message=f"store keys {why}: Secret {secret_name}",
            )
        swept = identities.sweep(admin, [name])
    except StoreError as exc:
        raise IdentityError("StoreUnreachable", str(exc)) from None
    if swept:
        kopf.warn(
            body,
            reason="ServiceAccountsRemoved",
            message=f"deleted {len(swept)} service account(s) the member made: {', '.join(swept)}",
        )
    return Credentials(secret_name, credentials_digest(keys), bool(keys.ca_cert))

"""The Secret holding one member's own store identity (pure builders).

``<member>-store``: the member's S3 keys and the store's CA (``alliance/contract.py`` names the
keys), owned by the Member so that it goes with it. A remote Member's Secret also holds its join
bundle (key ``bundle.yaml``): ``alliance member --join`` reads it, and it is the values file of
``charts/alliance-member``.
"""

from __future__ import annotations

import hashlib

from alliance import contract, identities
from alliance.store import StoreConfig
from alliance_operator.constants import ANNOTATION_ROTATED
from alliance_operator.resources.pods import labels, short_name

BUNDLE_KEY = "bundle.yaml"


def member_secret_name(member: str) -> str:
    return short_name(member, "-store")


def credentials_digest(keys: StoreConfig) -> str:
    """A short digest of the keys (and CA): a member pod records which keys it got."""
    text = "\n".join((keys.access_key, keys.secret_key, keys.ca_cert))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def member_secret(
    member: str,
    alliance: str,
    keys: StoreConfig,
    *,
    rotation: str,
    bundle_endpoint: str | None,
) -> dict:
    """The Secret of ``member``'s keys; with ``bundle_endpoint`` (a remote member) also its
    join bundle, naming the store at that URL."""
    data = {
        contract.SECRET_ACCESS_KEY: keys.access_key,
        contract.SECRET_SECRET_KEY: keys.secret_key,
    }
    if keys.ca_cert:
        data[contract.SECRET_CA_CERT] = keys.ca_cert
    if bundle_endpoint:
        data[BUNDLE_KEY] = identities.bundle_yaml(alliance, member, keys, bundle_endpoint)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": member_secret_name(member),
            "labels": labels("credentials", alliance, member),
            "annotations": {ANNOTATION_ROTATED: rotation},
        },
        "stringData": data,
    }

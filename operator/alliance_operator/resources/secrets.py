"""The Secret holding one member's own store identity (pure builders).

``<member>-store``: the member's S3 keys and the store's CA (``alliance/contract.py`` names the
keys), owned by the Member so that it goes with it. A remote Member's Secret also holds its join
bundle (key ``bundle.yaml``): ``alliance member --join`` reads it, and it is the values file of
``charts/alliance-member``.
"""

from __future__ import annotations

import hashlib

import yaml

from alliance import contract
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


def bundle_yaml(alliance: str, member: str, keys: StoreConfig, endpoint: str) -> str:
    bundle = contract.join_bundle(
        alliance=alliance,
        member=member,
        endpoint=endpoint,
        bucket=keys.bucket,
        access_key=keys.access_key,
        secret_key=keys.secret_key,
        ca_cert=keys.ca_cert,
    )
    header = (
        f"# Join bundle of member {member} of alliance {alliance}. It holds the member's own\n"
        "# store keys: hand it over privately. Use it with\n"
        "#   alliance member --join bundle.yaml --data-dir DIR\n"
        "# or: helm install <name> charts/alliance-member -f bundle.yaml\n"
    )
    return header + yaml.safe_dump(bundle, sort_keys=False, default_flow_style=False)


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
        data[BUNDLE_KEY] = bundle_yaml(alliance, member, keys, bundle_endpoint)
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

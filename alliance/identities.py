"""A store identity per member: an S3 user that reads what every member needs and writes only
its own objects, so no member can read or overwrite another member's updates or the run's
objects.

A member may read: ``alliance.json``, ``model-files/*``, ``models/*``, ``tasks/*`` and
``runs/*/spec.json`` (and list ``tasks/`` and ``runs/``). It may write (and read back) only
``members/<it>.json``, ``runs/*/rounds/*/updates/<it>.npz``, ``…/validations/<it>.json`` and
``…/failures/<it>.json``. The policy names the member literally: on the JuiceFS gateway
``${aws:username}`` would resolve to a service account's own name, which a member can choose.

Created through MinIO's admin API (``minio.MinioAdmin``), which both the embedded runner's
JuiceFS gateway (1.4, MinIO's IAM of 2021) and MinIO itself serve. Creating a user again with a
new secret rotates it, at once.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlparse

from minio import MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException

from alliance.store import StoreConfig, StoreError

#: A member name that is also a valid, unambiguous S3 user name (the gateway checks none).
MEMBER_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{1,61}[a-z0-9])")


def policy_name(member: str) -> str:
    return f"alliance-member-{member}"


def member_policy(bucket: str, member: str) -> dict:
    """The IAM policy of ``member``'s user in ``bucket`` (a pure function)."""
    arn = f"arn:aws:s3:::{bucket}"
    own = [
        f"{arn}/members/{member}.json",
        f"{arn}/runs/*/rounds/*/updates/{member}.npz",
        f"{arn}/runs/*/rounds/*/validations/{member}.json",
        f"{arn}/runs/*/rounds/*/failures/{member}.json",
    ]
    shared = [
        f"{arn}/alliance.json",
        f"{arn}/model-files/*",
        f"{arn}/models/*",
        f"{arn}/tasks/*",
        f"{arn}/runs/*/spec.json",
    ]
    return {
        "Version": "2012-10-17",
        "Statement": [
            # The client asks for the bucket's region before anything else.
            {"Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": [arn]},
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [arn],
                "Condition": {"StringLike": {"s3:prefix": ["tasks/*", "runs/*"]}},
            },
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": shared},
            {
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                "Resource": own,
            },
        ],
    }


def provision(admin_config: StoreConfig, members: Iterable[str]) -> dict[str, StoreConfig]:
    """Create (or rotate) a user and its policy for each member, with the admin's keys in
    ``admin_config``; returns each member's own store configuration (a new secret)."""
    url = urlparse(admin_config.endpoint)
    admin = MinioAdmin(
        endpoint=url.netloc or url.path,
        credentials=StaticProvider(admin_config.access_key, admin_config.secret_key),
        secure=url.scheme == "https",
    )
    out = {}
    for member in members:
        if not MEMBER_NAME.fullmatch(member):
            raise StoreError(
                f"member name {member!r}: 3 to 63 lowercase letters, digits, '.' or '-', "
                "starting and ending with a letter or digit"
            )
        secret = secrets.token_urlsafe(30)
        try:
            admin.policy_add(policy_name(member), policy=member_policy(admin_config.bucket, member))
            admin.user_add(member, secret)
            try:
                admin.attach_policy([policy_name(member)], user=member)
            except MinioAdminException as exc:
                if exc._code != "426":  # the JuiceFS gateway has only the older call
                    raise
                admin.policy_set(policy_name(member), user=member)
        except MinioAdminException as exc:
            raise StoreError(f"cannot create the store identity of {member}: {exc}") from exc
        out[member] = StoreConfig(admin_config.endpoint, member, secret, admin_config.bucket)
    return out

"""A store identity per member: an S3 user that reads what every member needs and writes only
its own objects, so no member can read or overwrite another member's updates or the run's
objects.

A member may read: ``alliance.json``, ``model-files/*``, ``models/*``, ``tasks/*`` and
``runs/*/spec.json`` (and list ``tasks/`` and ``runs/``). It may write (and read back) only
``members/<it>.json``, ``runs/*/rounds/*/updates/<it>.npz``, ``…/validations/<it>.json`` and
``…/failures/<it>.json``. It may listen to the notifications of the notice bucket
(``contract.notice_bucket``), where only the coordinator writes. The policy names the member
literally: on the JuiceFS gateway
``${aws:username}`` would resolve to a service account's own name, which a member can choose.

Created through MinIO's admin API (``minio.MinioAdmin``), which both the embedded runner's
JuiceFS gateway (1.4, MinIO's IAM of 2021) and MinIO itself serve. Creating a user again with a
new secret rotates it, at once. A user is named after the bucket and the member
(``user_name``): two alliances on one store may both have a member "hospital-a".

A member may create service accounts of its own (MinIO lets every user do so, and the gateway
ignores a Deny of it), and one named like another member's user replaces that user's key:
``sweep`` deletes every service account of the alliance's members, which need none.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import ssl
from collections.abc import Iterable
from urllib.parse import urlparse

import urllib3
from minio import MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException

from alliance import contract
from alliance.store import StoreConfig, StoreError

#: What an admin call raises: the API's refusals and transport failures.
ADMIN_ERRORS = (MinioAdminException, urllib3.exceptions.HTTPError, OSError, ValueError)

#: A member name that is also a valid, unambiguous S3 user name (the gateway checks none).
MEMBER_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")


def user_name(bucket: str, member: str) -> str:
    """The S3 user (its access key) of ``member`` in ``bucket``: unique per store."""
    name = f"{bucket}.{member}"
    if len(name) <= 64:
        return name
    return f"{member[:40]}.{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def policy_name(bucket: str, member: str) -> str:
    return "alliance-" + user_name(bucket, member)


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
            *_notices(bucket),
        ],
    }


def _notices(bucket: str) -> list[dict]:
    """Listening to the notice bucket, where only the coordinator writes: a member waits for
    tasks there instead of polling (not to the alliance's bucket, whose events would show it
    the other members' objects: MinIO cannot limit a listener to a prefix)."""
    notices = contract.notice_bucket(bucket)
    if notices is None:
        return []
    arn = f"arn:aws:s3:::{notices}"
    actions = ["s3:GetBucketLocation", "s3:ListenBucketNotification"]
    return [{"Effect": "Allow", "Action": actions, "Resource": [arn]}]


def bundle_yaml(alliance: str, member: str, keys: StoreConfig, endpoint: str) -> str:
    """The join bundle of ``member`` (alliance/contract.py) as YAML, with a header saying what
    it is and how it is used; ``endpoint`` is the store as the member reaches it."""
    import yaml

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


def check_name(member: str) -> None:
    if not MEMBER_NAME.fullmatch(member):
        raise StoreError(
            f"member name {member!r}: 1 to 63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )


def admin_client(admin_config: StoreConfig) -> MinioAdmin:
    url = urlparse(admin_config.endpoint)
    http = None
    if admin_config.ca_cert and url.scheme == "https":
        context = ssl.create_default_context(cadata=admin_config.ca_cert)
        http = urllib3.PoolManager(ssl_context=context, timeout=urllib3.Timeout(5, 30))
    return MinioAdmin(
        endpoint=url.netloc or url.path,
        credentials=StaticProvider(admin_config.access_key, admin_config.secret_key),
        secure=url.scheme == "https",
        http_client=http,
    )


def provision(admin_config: StoreConfig, members: Iterable[str]) -> dict[str, StoreConfig]:
    """Create (or rotate) a user and its policy for each member, with the admin's keys in
    ``admin_config``; returns each member's own store configuration (a new secret)."""
    admin = admin_client(admin_config)
    bucket = admin_config.bucket
    out = {}
    for member in members:
        check_name(member)
        user, policy = user_name(bucket, member), policy_name(bucket, member)
        secret = secrets.token_urlsafe(30)
        try:
            admin.policy_add(policy, policy=member_policy(bucket, member))
            admin.user_add(user, secret)
            try:
                admin.attach_policy([policy], user=user)
            except MinioAdminException as exc:
                if exc._code != "426":  # the JuiceFS gateway has only the older call
                    raise
                admin.policy_set(policy, user=user)
        except ADMIN_ERRORS as exc:
            raise StoreError(f"cannot create the store identity of {member}: {exc}") from exc
        out[member] = StoreConfig(
            admin_config.endpoint, user, secret, bucket, ca_cert=admin_config.ca_cert
        )
    return out


def exists(admin_config: StoreConfig, member: str) -> bool:
    """Whether the store has ``member``'s user."""
    try:
        admin_client(admin_config).user_info(user_name(admin_config.bucket, member))
    except ADMIN_ERRORS as exc:
        if is_missing(exc):
            return False
        raise StoreError(f"cannot look up the store user of {member}: {exc}") from exc
    return True


def remove(admin_config: StoreConfig, member: str) -> None:
    """Delete ``member``'s user and policy (done when they are gone already)."""
    admin = admin_client(admin_config)
    bucket = admin_config.bucket
    for call in (
        lambda: admin.user_remove(user_name(bucket, member)),
        lambda: admin.policy_remove(policy_name(bucket, member)),
    ):
        try:
            call()
        except ADMIN_ERRORS as exc:
            if not is_missing(exc):
                raise StoreError(f"cannot remove the store identity of {member}: {exc}") from exc


def sweep(admin_config: StoreConfig, members: Iterable[str]) -> list[str]:
    """Delete the service accounts of the members' users; returns their access keys."""
    admin = admin_client(admin_config)
    removed = []
    for member in members:
        user = user_name(admin_config.bucket, member)
        try:
            listed = json.loads(admin.list_service_account(user) or "{}")
            for account in listed.get("accounts") or []:
                key = account if isinstance(account, str) else account.get("accessKey")
                admin.delete_service_account(key)
                removed.append(key)
        except ADMIN_ERRORS as exc:
            if not is_missing(exc):
                raise StoreError(f"cannot list the service accounts of {member}: {exc}") from exc
    return removed


def is_missing(exc: Exception) -> bool:
    """Whether the admin API said the user or policy does not exist."""
    text = str(exc)
    return "XMinioAdminNoSuchUser" in text or "XMinioAdminNoSuchPolicy" in text or "404" in text

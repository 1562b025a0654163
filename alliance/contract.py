"""What starts a member agent and what the agent reads: its environment and command line.

Two programs start agents: the operator (a Member's pod, an Alliance's init pod) and the
embedded runner (``alliance.embedded``, local processes). Both take the variable names and the
argument lists from here, and the agent (``alliance.cli``, ``alliance.member``,
``alliance.store``) reads the same names, so the three cannot drift apart.
``tests/test_contract.py`` parses the builders' output with the real ``alliance`` parser.

The operator's image has no TensorFlow: this module imports nothing but the standard library.
"""

from __future__ import annotations

from pathlib import Path

#: The console script the member image puts on PATH (pyproject's ``[project.scripts]``).
COMMAND = "alliance"

# --- environment variables ----------------------------------------------------------------
# "operator": set in the pods it builds; "runner": set by the embedded runner (alliance.embedded).

#: The store's URL, http://host:port or https://host. Operator: spec.store; runner: its server.
ENV_S3_ENDPOINT = "ALLIANCE_S3_ENDPOINT"
#: The store's access key: a member's own (alliance/identities.py). Operator: from the
#: member's Secret <member>-store (the init pod: the Alliance's); runner: made per member.
ENV_S3_ACCESS_KEY = "ALLIANCE_S3_ACCESS_KEY"
#: The store's secret key, with the access key.
ENV_S3_SECRET_KEY = "ALLIANCE_S3_SECRET_KEY"
#: The alliance's bucket. Operator: spec.store.bucket; runner: its server's.
ENV_BUCKET = "ALLIANCE_BUCKET"
#: A PEM file of the CA that verifies the store's https certificate (unset: the system's CAs).
#: Operator: the member's Secret key ``ca.crt``, mounted; runner: unset (plain HTTP on loopback).
ENV_S3_CA_FILE = "ALLIANCE_S3_CA_FILE"
#: TensorFlow's thread count. Operator: the pod's CPU limit; runner: its CPU plan's
#: (alliance/cpulease.py: cores ÷ members, or every core when members take turns).
ENV_CPU_THREADS = "ALLIANCE_CPU_THREADS"
#: A directory of CPU lease files shared by the members of one machine, which then take turns
#: computing (alliance/cpulease.py). Runner: <work-dir>/cpu-lease with --cpu-sharing turns or N;
#: a member of a shared node may set it to a hostPath. Unset: no lease.
ENV_CPU_LEASE = "ALLIANCE_CPU_LEASE"
#: How many of those members compute at once (default 1).
ENV_CPU_LEASE_SLOTS = "ALLIANCE_CPU_LEASE_SLOTS"
#: Where parsed CSV data is cached. Operator: an emptyDir; runner: <work-dir>/cache.
ENV_CACHE_DIR = "ALLIANCE_CACHE_DIR"
#: A Member's spec.dataSchema as JSON. Operator only (unset: the default schema).
ENV_DATA_SCHEMA = "ALLIANCE_DATA_SCHEMA"
#: The port of the agent's Prometheus metrics. Operator only (unset: none served).
ENV_METRICS_PORT = "ALLIANCE_METRICS_PORT"


# --- the store's buckets ------------------------------------------------------------------


def notice_bucket(bucket: str) -> str | None:
    """The bucket beside ``bucket`` where the coordinator marks each change of a run's task
    (an empty ``tasks/<run>`` object), so that members can wait on its notifications instead
    of polling: only the coordinator writes there, so its events show a member nothing of the
    others. None when the name would pass S3's 63 characters: members then poll."""
    name = f"{bucket}-notices"
    return name if len(name) <= 63 else None


# --- a member's store identity ----------------------------------------------------------
# The keys of the Secret that holds one member's own store credentials (the operator writes it
# per Member; a member organisation's chart writes it from the join bundle).

SECRET_ACCESS_KEY = "accessKey"
SECRET_SECRET_KEY = "secretKey"
SECRET_CA_CERT = "ca.crt"


def join_bundle(
    *,
    alliance: str,
    member: str,
    endpoint: str,
    bucket: str,
    access_key: str,
    secret_key: str,
    ca_cert: str = "",
) -> dict:
    """What a member outside the cluster needs to join: its name, the store and its own keys.
    The same dict is ``alliance member --join``'s file and the values of
    ``charts/alliance-member`` (``helm install … -f bundle.yaml``)."""
    return {
        "alliance": alliance,
        "member": member,
        "store": {
            "endpoint": endpoint,
            "bucket": bucket,
            "accessKey": access_key,
            "secretKey": secret_key,
            "caCert": ca_cert,
        },
    }


def read_join_bundle(bundle: object, source: str = "the join bundle") -> dict:
    """A join bundle checked field by field: ``{"alliance", "member", "endpoint", "bucket",
    "access_key", "secret_key", "ca_cert"}``; ValueError naming the field otherwise."""
    if not isinstance(bundle, dict):
        raise ValueError(f"{source}: not a mapping of alliance, member and store")
    store = bundle.get("store")
    if not isinstance(store, dict):
        raise ValueError(f"{source}: store: missing (endpoint, bucket, accessKey, secretKey)")
    fields = {
        "alliance": bundle.get("alliance"),
        "member": bundle.get("member"),
        "endpoint": store.get("endpoint"),
        "bucket": store.get("bucket"),
        "access_key": store.get("accessKey"),
        "secret_key": store.get("secretKey"),
    }
    names = {"endpoint": "store.endpoint", "bucket": "store.bucket"}
    names |= {"access_key": "store.accessKey", "secret_key": "store.secretKey"}
    for field, value in fields.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: {names.get(field, field)}: missing or not a string")
    if not fields["endpoint"].startswith(("http://", "https://")):
        raise ValueError(f"{source}: store.endpoint: a URL, http://host:port or https://host")
    ca = store.get("caCert") or ""
    if not isinstance(ca, str) or (ca and "BEGIN CERTIFICATE" not in ca):
        raise ValueError(f"{source}: store.caCert: a PEM certificate (or empty)")
    return {**fields, "ca_cert": ca}


# --- command lines (the arguments after COMMAND) --------------------------------------------
# A log_level of None leaves the command's default (warning).


def member_args(
    name: str,
    data_dir: str | Path,
    *,
    log_level: str | None = None,
    validator: bool = False,
    train_command: str | None = None,
    validate_command: str | None = None,
) -> list[str]:
    """``alliance member``: the agent of member ``name`` on the data in ``data_dir``. Its data
    schema and metrics port travel in the environment (--schema and --metrics-port are for
    people who start an agent by hand)."""
    args = ["member", "--name", name, "--data-dir", str(data_dir)]
    if log_level:
        args += ["--log-level", log_level]
    if validator:
        args.append("--validator")
    if train_command:
        args += ["--train-command", train_command]
    if validate_command:
        args += ["--validate-command", validate_command]
    return args


def init_args(
    seed: int,
    *,
    log_level: str | None = None,
    keras_object: str | None = None,
    model_file: str | Path | None = None,
    schema_file: str | Path | None = None,
) -> list[str]:
    """``alliance init``: create the bucket, the model and its seed weights. The model is the
    built-in CNN, or a .keras file already in the bucket (``keras_object``), or a local one;
    ``schema_file`` is the data schema it must fit (recorded for members and predict)."""
    if keras_object and model_file:
        raise ValueError("init: give keras_object or model_file, not both")
    args = ["init", "--seed", str(seed)]
    if log_level:
        args += ["--log-level", log_level]
    if keras_object:
        args += ["--keras-object", keras_object]
    if model_file:
        args += ["--model", str(model_file)]
    if schema_file:
        args += ["--schema", str(schema_file)]
    return args

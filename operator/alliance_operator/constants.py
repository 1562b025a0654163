"""Names shared by the operator's modules: the API group, resources, labels, annotations."""

GROUP = "alliance.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

ALLIANCES = "alliances"
MEMBERS = "members"
TRAININGRUNS = "trainingruns"

#: kopf's finalizer and its progress/diff-base annotations live under the API group.
FINALIZER = f"{GROUP}/finalizer"
ANNOTATION_PREFIX = GROUP

LABEL_ALLIANCE = f"{GROUP}/alliance"
LABEL_MEMBER = f"{GROUP}/member"
LABEL_COMPONENT = "app.kubernetes.io/component"
#: A hash of the pod spec the operator built: a changed Member spec replaces its pod.
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"

MANAGED_BY = "alliance-operator"

#: Where a member pod sees its PersistentVolumeClaim (read-only).
DATA_MOUNT_PATH = "/data"
CACHE_MOUNT_PATH = "/var/cache/alliance"
TMP_MOUNT_PATH = "/tmp"

#: The member agent serves its Prometheus metrics here (ALLIANCE_METRICS_PORT, port "metrics").
MEMBER_METRICS_PORT = 9100

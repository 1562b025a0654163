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

# --- who may use what (the operator acts for no one beyond what these grant) ----------------
#: On a Secret: the Alliances (comma-separated names, same namespace) that may use it.
ANNOTATION_ALLIANCES = f"{GROUP}/alliances"
#: On a Secret: the only store endpoint its keys may be used with (optional).
ANNOTATION_STORE_ENDPOINT = f"{GROUP}/store-endpoint"
#: On a PersistentVolumeClaim: the one Member that may mount it.
ANNOTATION_CLAIM_MEMBER = f"{GROUP}/member"
#: On a Member: a new value (any) makes the operator rotate the member's store keys.
ANNOTATION_ROTATE = f"{GROUP}/rotate-credentials"
#: On a member's Secret: the rotate-credentials value its keys were made for.
ANNOTATION_ROTATED = f"{GROUP}/rotated-for"
#: On a member's pod: a digest of the keys it got (new keys replace the pod).
ANNOTATION_CREDENTIALS = f"{GROUP}/credentials-digest"
#: Where a member pod finds the store's CA certificate (its Secret's key ca.crt).
CA_MOUNT_PATH = "/etc/alliance/store-ca"

#!/usr/bin/env bash
# The operator's end-to-end tests (tests/test_operator_e2e.py) on a kind cluster, with this
# repository's images: docs/kubernetes.md, section 7, as one command.
#
#   make e2e-kind                          # make install, make images, then this script
#   scripts/e2e_kind.sh [PYTEST ARGS...]   # with the images already built
#
# Creates the kind cluster $KIND_CLUSTER (default: alliance) when absent, loads
# alliance-operator and alliance-member into it, runs MinIO in it (a NodePort on the node's
# container IP, which this machine reaches too), and runs the suite with the operator from the
# alliance-operator image on this machine's Docker engine and member pods from alliance-member.
# Needs: docker, kind, kubectl (on PATH, else the venv's), the venv (make install). The kind
# nodes need cgroup v2 (docs/kubernetes.md, section 7). Delete the cluster afterwards with
# `kind delete cluster --name alliance`.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-alliance}
TAG=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}
OPERATOR_IMAGE=alliance-operator:$TAG
MEMBER_IMAGE=alliance-member:$TAG
MINIO_IMAGE=${MINIO_IMAGE:-minio/minio:latest} # pin a RELEASE.* tag for repeatable runs
PY=${PY:-.venv/bin/python}
KUBECTL=$(command -v kubectl || echo .venv/bin/kubectl)
WORK=alliance-work/e2e-kind
say() { echo "e2e_kind: $*" >&2; }

for image in "$OPERATOR_IMAGE" "$MEMBER_IMAGE"; do
    docker image inspect "$image" >/dev/null 2>&1 || {
        say "$image is not built: run make images (or make e2e-kind)"
        exit 1
    }
done
if [ "$(docker info --format '{{.CgroupVersion}}')" != 2 ]; then
    say "warning: the Docker engine runs cgroup v1: the crash tests (5 and 6) will fail"
fi

mkdir -p "$WORK"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
kind get kubeconfig --name "$CLUSTER" >"$WORK/kubeconfig"
export KUBECONFIG=$PWD/$WORK/kubeconfig
kind load docker-image "$OPERATOR_IMAGE" "$MEMBER_IMAGE" --name "$CLUSTER"

if ! "$KUBECTL" get secret minio-root >/dev/null 2>&1; then
    "$KUBECTL" create secret generic minio-root --from-literal=accessKey=alliance-e2e \
        --from-literal=secretKey="$("$PY" -c 'import secrets; print(secrets.token_hex(24))')"
fi
# The manifest of docs/kubernetes.md, section 7 (tests/test_containers.py keeps them the same).
sed "s|image: minio/minio:latest|image: $MINIO_IMAGE|" <<'EOF' | "$KUBECTL" apply -f -
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio}
spec:
  replicas: 1
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 1000
        fsGroup: 1000
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: minio
          image: minio/minio:latest        # pin a RELEASE.* tag
          args: [server, /data, --address, ":9000"]
          env:
            - {name: HOME, value: /tmp}    # not /: MinIO creates $HOME/.minio/certs
            - name: MINIO_ROOT_USER
              valueFrom: {secretKeyRef: {name: minio-root, key: accessKey}}
            - name: MINIO_ROOT_PASSWORD
              valueFrom: {secretKeyRef: {name: minio-root, key: secretKey}}
          ports: [{containerPort: 9000}]
          readinessProbe: {httpGet: {path: /minio/health/ready, port: 9000}}
          resources: {requests: {cpu: 100m, memory: 256Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: minio}
spec:
  type: NodePort
  selector: {app: minio}
  ports: [{port: 9000, targetPort: 9000, nodePort: 30900}]
EOF
"$KUBECTL" rollout status deployment/minio --timeout=300s

node_ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
    "$CLUSTER-control-plane")
secret() { "$KUBECTL" get secret minio-root -o "jsonpath={.data.$1}" | base64 -d; }
export ALLIANCE_E2E_KUBECONFIG=$KUBECONFIG
export ALLIANCE_E2E_OPERATOR_IMAGE=$OPERATOR_IMAGE
export ALLIANCE_E2E_MEMBER_IMAGE=$MEMBER_IMAGE
export ALLIANCE_E2E_S3_ENDPOINT=http://$node_ip:30900
ALLIANCE_E2E_S3_ACCESS_KEY=$(secret accessKey)
ALLIANCE_E2E_S3_SECRET_KEY=$(secret secretKey)
export ALLIANCE_E2E_S3_ACCESS_KEY ALLIANCE_E2E_S3_SECRET_KEY
say "cluster $CLUSTER, store $ALLIANCE_E2E_S3_ENDPOINT, images $OPERATOR_IMAGE $MEMBER_IMAGE"
exec "$PY" -m pytest tests/test_operator_e2e.py "$@"

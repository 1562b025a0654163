# The project's two images, built from the repository root (`make images` does both):
#   operator: the `alliance-operator` command (kopf, the Kubernetes client and the round engine;
#             no TensorFlow: the operator never trains or evaluates a model)
#   member:   the `alliance` command with TensorFlow (CPU), for member agent pods and the
#             Alliance's init pod (the operator runs `alliance member ...` and `alliance init ...`)
#
#   make wheels                 # pip download on the host, into images/wheels/
#   docker build --network none --target operator -t alliance-operator:0.1.0 .
#   docker build --network none --target member -t alliance-member:0.1.0 .
#
# The build needs no network: pip installs only the wheels of images/wheels/. BASE_IMAGE may name
# a stand-in for the official image where no registry is reachable (scripts/local_base.sh).
# tests/test_images.py checks this file and replays the build stages in fresh virtual environments.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---- build: the downloaded wheels and an empty virtual environment, shared by both images
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore

# pip runs from its wheel (`python pip.whl/pip`): it is installed neither into the base nor into
# /opt/alliance, so whatever pip the base has (if any) plays no part.
COPY images/wheels /wheels
RUN python -m venv --without-pip /opt/alliance

# ---- project: the project's own wheel, built once for both images. A stage of its own so that
# a change to the sources rebuilds it and each image's last layer, not the dependencies' layer.
FROM build AS project
COPY pyproject.toml README.md /src/
COPY alliance /src/alliance
COPY operator/alliance_operator /src/operator/alliance_operator
RUN python /wheels/pip-25.3-py3-none-any.whl/pip wheel --no-index --find-links /wheels \
        --no-deps --wheel-dir /project /src

# ---- runtime: what both images are besides their environment
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# No installer at run time (/opt/alliance has no pip either), and a fixed non-root user whose
# home is /tmp: the pods run as 10001 with a read-only root filesystem and an emptyDir at /tmp
# (member pods also at /var/cache/alliance).
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --gid 10001 alliance \
 && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin alliance

ENV PATH=/opt/alliance/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /tmp

# ---- the images, each its environment then the image. The environment: the image's requirement
# file, the complete pinned closure that scripts/image_requirements.py writes from
# requirements.lock (--no-deps: nothing is resolved here, nothing unpinned gets in), then the
# project. (Docker's legacy builder builds every stage above --target: operator's come first.)
FROM build AS operator-env
COPY images/operator-requirements.txt /requirements.txt
RUN /opt/alliance/bin/python /wheels/pip-25.3-py3-none-any.whl/pip install --no-index \
        --find-links /wheels --no-deps --only-binary=:all: -r /requirements.txt
COPY --from=project /project /project
RUN /opt/alliance/bin/python /wheels/pip-25.3-py3-none-any.whl/pip install --no-index \
        --find-links /project --no-deps alliance==0.1.0 \
 && /opt/alliance/bin/python /wheels/pip-25.3-py3-none-any.whl/pip check

FROM runtime AS operator
LABEL org.opencontainers.image.title="alliance-operator" \
      org.opencontainers.image.description="Kubernetes operator for alliance federated learning: reconciles Alliances, Members and TrainingRuns"
COPY --from=operator-env /opt/alliance /opt/alliance
ENTRYPOINT ["alliance-operator"]
CMD ["--help"]

FROM build AS member-env
COPY images/member-requirements.txt /requirements.txt
RUN /opt/alliance/bin/python /wheels/pip-25.3-py3-none-any.whl/pip install --no-index \
        --find-links /wheels --no-deps --only-binary=:all: -r /requirements.txt
COPY --from=project /project /project
RUN /opt/alliance/bin/python /wheels/pip-25.3-py3-none-any.whl/pip install --no-index \
        --find-links /project --no-deps alliance==0.1.0 \
 && /opt/alliance/bin/python /wheels/pip-25.3-py3-none-any.whl/pip check

FROM runtime AS member
LABEL org.opencontainers.image.title="alliance-member" \
      org.opencontainers.image.description="Member agent for alliance federated learning: trains and validates the shared model on the member's own data (TensorFlow CPU)"
COPY --from=member-env /opt/alliance /opt/alliance
ENTRYPOINT ["alliance"]
CMD ["--help"]

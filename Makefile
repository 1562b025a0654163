# The two commands a new user needs: `make demo` and `make test`. Both install first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP_VERSION := 25.3

.PHONY: install demo test test-fast bench lint format clean help images wheels chart-lint \
	image-operator image-member e2e-kind

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with every pinned dependency (TensorFlow, the S3 server, test tools)

$(STAMP): pyproject.toml requirements.lock scripts/install_helm.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[tf,s3,operator,dev,report]'
	$(PY) scripts/install_helm.py $(VENV)/bin
	touch $(STAMP)

demo: install  ## a real federated MNIST training: 3 members x 3 rounds on the shipped sample
	$(VENV)/bin/alliance demo --work-dir alliance-work/demo

test: install  ## the whole test suite (real S3 server, real processes, real TensorFlow)
	$(PY) -m pytest -q

test-fast: install  ## the tests that need neither TensorFlow nor processes
	$(PY) -m pytest -q -m 'not slow'

bench: install  ## the benchmarks of the README (uses ../shared/data/mnist when present)
	$(PY) -m benchmarks.run

lint: install  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

IMAGE_TAG  ?= 0.1.0
# The images' base: the Dockerfile's pinned official python image unless one is named here
# (scripts/local_base.sh makes a stand-in where no registry is reachable).
BASE_IMAGE ?=
WHEELS     := images/wheels
# The wheels fit the images, not this machine: CPython 3.11 on Debian bookworm (glibc 2.36, so
# manylinux_2_5 ... manylinux_2_36) on this machine's architecture, which Docker builds for.
WHEEL_ARCH ?= $(shell uname -m | sed s/arm64/aarch64/)
WHEEL_PLATFORM := --python-version 3.11 --implementation cp --abi cp311 \
	$(foreach v,$(shell seq 36 -1 5),--platform manylinux_2_$(v)_$(WHEEL_ARCH)) \
	--platform manylinux2014_$(WHEEL_ARCH)

wheels: $(WHEELS)/.complete  ## download what the images install (their build needs no network)

# Both closures, pip (the build runs it from its wheel) and pyproject.toml's build-system pin;
# again when this Makefile (the pins, the platform) changes.
$(WHEELS)/.complete: images/operator-requirements.txt images/member-requirements.txt Makefile
	rm -rf $(WHEELS)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		$(WHEEL_PLATFORM) --dest $(WHEELS) pip==$(PIP_VERSION) setuptools==80.9.0 \
		-r images/operator-requirements.txt -r images/member-requirements.txt
	touch $@

images: image-operator image-member  ## build the operator and member images (a Docker engine; the build runs offline)

# Each image alone (tests/test_containers.py times them apart). BASE_IMAGE: see above.
image-operator: wheels
	docker build --network none $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		--target operator -t alliance-operator:$(IMAGE_TAG) .

image-member: wheels
	docker build --network none $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		--target member -t alliance-member:$(IMAGE_TAG) .

# docs/kubernetes.md, section 7: creates the cluster when absent, loads the images, runs MinIO.
e2e-kind: install images  ## the operator e2e tests on a kind cluster with these images (kind, kubectl)
	scripts/e2e_kind.sh

chart-lint: install  ## helm lint --strict and the rendered scenarios through kubernetes-validate
	$(PY) -m pytest -q tests/test_chart.py tests/test_member_chart.py

clean:  ## remove the virtual environment, work directories and downloaded wheels
	rm -rf $(VENV) alliance-work .pytest_cache $(WHEELS)

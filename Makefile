# The two commands a new user needs: `make demo` and `make test`. Both install first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint format clean help images chart-lint

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with every pinned dependency (TensorFlow, the S3 server, test tools)

$(STAMP): pyproject.toml requirements.lock scripts/install_helm.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[tf,s3,operator,dev]'
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

IMAGE_TAG ?= 0.1.0
images:  ## build the operator and member images (needs a Docker engine)
	docker build -f operator/Dockerfile -t alliance-operator:$(IMAGE_TAG) .
	docker build -f member-image/Dockerfile -t alliance-member:$(IMAGE_TAG) .

chart-lint: install  ## helm lint --strict and the rendered scenarios through kubernetes-validate
	$(PY) -m pytest -q tests/test_chart.py

clean:  ## remove the virtual environment and work directories
	rm -rf $(VENV) alliance-work .pytest_cache

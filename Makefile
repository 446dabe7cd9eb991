# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
# The KServe Python SDK's own environment (tests/integration/test_kserve_client.py): kserve
# pins a grpcio and protobuf that the server's environment cannot share.
KSERVE_VENV ?= .venv-kserve
KSERVE_REQUIREMENTS := tests/kserve-requirements.txt
KSERVE_STAMP := $(KSERVE_VENV)/.installed

.PHONY: demo test test-unit system lint protos bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found: install Python 3.11 (or make PYTHON=/path/to/python3.11)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# Built anew when the pins change, so no package of an older set lingers; the stamp is
# written last, so an interrupted install is redone (the test fails without the stamp).
$(KSERVE_STAMP): $(KSERVE_REQUIREMENTS)
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found: install Python 3.11 (or make PYTHON=/path/to/python3.11)" >&2; exit 1; }
	rm -rf $(KSERVE_VENV)
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(KSERVE_REQUIREMENTS)
	touch $(KSERVE_STAMP)

# The Debian packages the tests use (prometheus, docker-compose, libb64, curl, openssl,
# chromium and chromium-driver): installed
# with apt-get as root, with sudo otherwise; a clear message if neither works.
system:
	bash scripts/setup-system.sh

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# Everything: ruff, then every test (unit and integration).
test: system $(STAMP) $(KSERVE_STAMP)
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" KSERVE_VENV="$(abspath $(KSERVE_VENV))" $(PY) -m pytest

# The inner loop: the tests that start no server or other process (under a minute).
test-unit: system $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "not integration" tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos: $(STAMP)
	$(PY) -m protos.generate

bench: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m serving.bench

clean:
	rm -rf $(VENV) $(KSERVE_VENV) runs model_repository .pytest_cache .ruff_cache

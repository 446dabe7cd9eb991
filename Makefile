# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-unit system lint protos bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found: install Python 3.11 (or make PYTHON=/path/to/python3.11)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# The Debian packages the tests use (prometheus, docker-compose, libb64, curl, openssl,
# chromium and chromium-driver): installed
# with apt-get as root, with sudo otherwise; a clear message if neither works.
system:
	bash scripts/setup-system.sh

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# Everything: ruff, then every test (unit and integration).
test: system $(STAMP)
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

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
	rm -rf $(VENV) runs model_repository .pytest_cache .ruff_cache

# lossd — the two commands a fresh machine needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/lossd/v1/*.proto)

.PHONY: serve test install proto bench lint clean

# Create the virtual environment and install the server with test tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[server,test]"
	touch $(STAMP)

install: $(STAMP)

# Install what is needed and start the server with its embedded defaults.
serve: $(STAMP)
	$(VENV)/bin/lossd serve

# Install what is needed and run the whole test suite.
test: $(STAMP)
	$(VENV)/bin/pytest -q

# Regenerate the gRPC stubs in client/lossd/v1 from proto/ (tests fail when stale).
proto: $(STAMP)
	$(PY) proto/generate.py client/lossd/v1

bench: $(STAMP)
	$(PY) bench/evaluate.py

clean:
	rm -rf $(VENV) build *.egg-info

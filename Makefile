# lossd — the two commands a fresh machine needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/lossd/v1/*.proto)

.PHONY: serve test test-tools test-clients install proto bench lint clean

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

# System tools the tests run besides the Python packages: Prometheus's server
# and promtool, both in the Debian/Ubuntu package `prometheus`, and
# PostgreSQL's initdb and pg_ctl (package `postgresql`, whose binaries live
# in /usr/lib/postgresql/<version>/bin). As root with apt-get they are
# installed here; otherwise make stops with one line saying what to install.
# The tests fail (never skip) without them.
TEST_TOOLS ?= prometheus promtool
APT_GET ?= apt-get
missing_tools = $(strip $(foreach tool,$(TEST_TOOLS),$(if $(shell PATH="$(VENV)/bin:$$PATH" command -v $(tool)),,$(tool))))
POSTGRES_INITDB ?= initdb
POSTGRES_BIN_GLOB ?= /usr/lib/postgresql/*/bin
missing_postgres = $(if $(shell command -v $(POSTGRES_INITDB) || ls $(POSTGRES_BIN_GLOB)/$(POSTGRES_INITDB) 2>/dev/null),,$(POSTGRES_INITDB))
missing_packages = $(strip $(if $(missing_tools),prometheus) $(if $(missing_postgres),postgresql))
can_apt = $(and $(filter 0,$(shell id -u)),$(shell command -v $(APT_GET)))

# kubectl renders deploy/k8s (`kubectl kustomize`; tests/deploy/test_k8s.py).
# Debian's archive has none whose kustomize reads the overlays (bookworm's
# kubernetes-client is 1.20), so make stops with one line when it is missing.
K8S_TOOLS ?= kubectl
missing_k8s_tools = $(strip $(foreach tool,$(K8S_TOOLS),$(if $(shell command -v $(tool)),,$(tool))))

test-tools:
	$(if $(missing_k8s_tools),$(error make test needs $(missing_k8s_tools) 1.21 or newer, whose kustomize renders deploy/k8s: install it as https://kubernetes.io/docs/tasks/tools/ says, or put it on PATH))
	$(if $(missing_packages),$(if $(can_apt),,$(error make test needs $(strip $(missing_tools) $(missing_postgres)): install $(missing_packages) (sudo apt-get install $(missing_packages)) or put the binaries on PATH)))
	@$(if $(missing_packages),echo "make test: installing $(missing_packages) (apt-get install $(missing_packages))" \
	    && $(APT_GET) update -qq \
	    && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends $(missing_packages) >/dev/null \
	    && { (systemctl stop prometheus postgresql || { service prometheus stop; service postgresql stop; }) >/dev/null 2>&1 || true; },:)

# Install what is needed and run the whole test suite, in parallel
# (pytest-xdist; docs/testing.md). More workers than cores pay: most tests
# wait on subprocesses and sockets. --dist loadfile keeps each file on one
# worker, so a module's servers start once; tests/conftest.py hands out the
# slowest files first (SLOWEST_FILES), so neither worker runs one alone at
# the end. --durations=25 lists the slowest tests at the end, so a CI log
# shows where the time went (and whether SLOWEST_FILES needs a new name).
TEST_WORKERS ?= 2
test: test-tools test-clients $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# The Open Inference Protocol's published clients, which the tests drive lossd
# with (tests/server/test_oip_clients.py): tritonclient and KServe's clients pin
# an older protobuf than lossd's, so they live in a virtual environment of their own.
CLIENTS_VENV ?= .venv-clients
OIP_CLIENTS ?= tritonclient[grpc,http]==2.73.0 kserve==0.21.0
$(CLIENTS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install --quiet $(foreach p,$(OIP_CLIENTS),"$(p)")
	touch $@

test-clients: $(CLIENTS_VENV)/.installed

# Regenerate the gRPC stubs in client/lossd/v1 and server/lossd_server/grpc/oip
# from proto/ (tests fail when stale).
proto: $(STAMP)
	$(PY) proto/generate.py client/lossd/v1
	$(PY) proto/generate.py server/lossd_server/grpc/oip lossd_server/grpc/oip

bench: $(STAMP)
	$(PY) bench/evaluate.py

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) build *.egg-info

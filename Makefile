# Two entry points a new user needs: `make run` and `make test`.
# Both create the virtualenv in .venv and install the project first; `run`
# installs only what the server needs, `test` adds the test tools.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# twistd finds the plugin in twisted/plugins/ through sys.path, which only
# a compat editable install puts the checkout on (a flat layout).
EDITABLE := --config-settings editable_mode=compat
# The server and its runtime dependencies.
RUNTIME_STAMP := $(VENV)/.runtime-stamp
# Everything: the above and the test extras (ruff, mypy, hypothesis, ...).
STAMP := $(VENV)/.installed-stamp

# The oldest Twisted we support is the floor declared in pyproject.toml;
# the suite also runs on it, in its own virtualenv.
OLDEST_TWISTED := $(shell sed -n 's/^ *"twisted\[tls\]>=\([0-9.]*\).*/\1/p' pyproject.toml)
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed-stamp

# System tools the tests run for real: logrotate rotates the file sink's
# file, strace counts its fsyncs.  Installed when missing (as root, as CI
# runs), after an apt-get update.  COMMAND=PACKAGE where the two differ.
SYSTEM_TOOLS := logrotate strace
# Socket activation and the unit files (tests/test_systemd.py).
SYSTEM_TOOLS += systemd-socket-activate=systemd systemd-analyze=systemd
# Graphviz draws the docs site's diagrams (make docs).
SYSTEM_TOOLS += dot=graphviz
# Real Redis servers and HAProxy (tests/test_redis*.py, tests/test_fleet.py).
SYSTEM_TOOLS += redis-server redis-cli=redis-tools redis-benchmark=redis-tools haproxy

.PHONY: run test lint typecheck docs trial trial-oldest pytest pytest-all bench bench-quick bench-report clean system-tools

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e . $(EDITABLE)
	touch $@

# The test extras alone, read from pyproject.toml: the project is already
# installed, and building it again would only take time.
$(STAMP): $(RUNTIME_STAMP)
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))' > $(VENV)/test-requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/test-requirements.txt
	touch $@

run: $(RUNTIME_STAMP)
	$(VENV)/bin/twistd --nodaemon --pidfile= lineserver

lint: $(STAMP)
	$(VENV)/bin/ruff check lineserver tests benchmarks twisted docs scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The docs site (MkDocs, mkdocs.yml) in build/site; a warning (a broken
# link, a page left out of the nav) fails the build.  docs/hooks.py makes
# the configuration reference and the drawings (Graphviz) from the code.
docs: $(STAMP) system-tools
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

system-tools:
	@missing=""; for entry in $(SYSTEM_TOOLS); do \
		tool=$${entry%%=*}; package=$${entry#*=}; \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing for the tests"; \
		apt-get update && apt-get install -y $$missing; \
	fi

# The tests that run real processes (twistd, redis-server, haproxy, make,
# pip): most of the suite's time.  trial runs every test; pytest runs every
# test but these, which keeps CI under 15 minutes (`make pytest-all` runs
# them under pytest too: both runners run every test).
SLOW_TESTS := $(wildcard tests/test_*_twistd.py) tests/test_twistd.py \
	tests/test_file_sink_ops.py tests/test_fleet.py tests/test_logs.py \
	tests/test_packaging.py tests/test_redis_cluster.py tests/test_redis_sink.py \
	tests/test_relay.py tests/test_send.py tests/test_systemd.py
# trial's workers: two, as CI's runners and this machine have two cores.
TRIAL_JOBS ?= 2

trial: $(STAMP) system-tools
	$(VENV)/bin/trial -j$(TRIAL_JOBS) --temp-directory=.trial_temp tests

pytest: $(STAMP) system-tools
	$(PY) -m pytest -q $(addprefix --ignore=,$(SLOW_TESTS))

pytest-all: $(STAMP) system-tools
	$(PY) -m pytest -q

# .venv has the newest Twisted pip finds; when that is the oldest we
# support as well, the suite has just run on it and is not run twice.
trial-oldest: $(STAMP) system-tools
	@test -n "$(OLDEST_TWISTED)" || { echo "no twisted[tls]>= floor in pyproject.toml"; exit 1; }
	@newest=$$($(PY) -c 'import twisted; print(twisted.__version__)'); \
	if [ "$$newest" = "$(OLDEST_TWISTED)" ] || [ "$$newest" = "$(OLDEST_TWISTED).0" ]; then \
		echo "trial-oldest: .venv runs Twisted $$newest, the oldest supported too; the suite ran there"; \
	else \
		$(MAKE) --no-print-directory $(OLDEST_STAMP) && \
		echo "trial-oldest: the suite on Twisted $(OLDEST_TWISTED) (.venv has $$newest)" && \
		$(OLDEST)/bin/trial -j$(TRIAL_JOBS) --temp-directory=_trial_temp_oldest tests; \
	fi

$(OLDEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	echo '*' > $(OLDEST)/.gitignore
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet "twisted[tls]==$(OLDEST_TWISTED)" -e ".[test]" $(EDITABLE)
	touch $@

test: lint typecheck docs trial pytest trial-oldest

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

# docs/performance.md and its plots (about 25 minutes with a 10-minute soak;
# the soak mounts a tmpfs, so run as root).  The bench extra adds matplotlib.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))' > $(VENV)/bench-requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/bench-requirements.txt
	touch $@

bench-report: $(BENCH_STAMP)
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) $(OLDEST) .trial_temp _trial_temp_oldest .hypothesis build *.egg-info

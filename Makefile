# Two entry points a new user needs: `make run` and `make test`.
# Both create the virtualenv in .venv and install the project first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck trial pytest bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]" --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twistd --nodaemon --pidfile= lineserver

lint: $(STAMP)
	$(VENV)/bin/ruff check lineserver tests benchmarks twisted docs

typecheck: $(STAMP)
	$(VENV)/bin/mypy

trial: $(STAMP)
	$(VENV)/bin/trial --temp-directory=.trial_temp tests

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck trial pytest

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .trial_temp .hypothesis build *.egg-info

# The two commands of the README: `make demo` and `make test`. Both install into .venv first
# (idempotent: a stamp file keyed on the requirement files skips the install when nothing changed).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
REQS := requirements/base.txt requirements/merlin.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): $(REQS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip >= 25 refuses merlin-dataloader 23.8.0 (a direct-URL dev extra), so keep pip below 25.
	$(BIN)/python -m pip install -q 'pip<25'
	$(BIN)/pip install -q -r requirements/base.txt
	$(BIN)/pip install -q --no-deps -r requirements/merlin.txt
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/raytr demo --output $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/run_cpu.py

clean:
	rm -rf runs .pytest_cache

# collab-training — developer entry points.  Run `make help` for the list.
# Only Python 3.10+ and GNU make are needed; everything else goes into $(VENV).

PYTHON ?= python3
VENV ?= .venv
PEERS ?= 4
STEPS ?= 40
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_SECONDS ?= 180
ALGORITHM ?= gradient

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.DEFAULT_GOAL := help
.PHONY: help install test soak demo bench lint format clean distclean

help: ## List the targets
	@echo "collab-training — make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) PEERS=$(PEERS) STEPS=$(STEPS) PYTEST_ARGS='$(PYTEST_ARGS)' BENCH_ARGS='$(BENCH_ARGS)' SOAK_SECONDS=$(SOAK_SECONDS)"

$(STAMP): pyproject.toml
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --upgrade pip
	$(VENV_PY) -m pip install -e ".[all]"
	@touch $@

# `make demo` needs only the Lightning and example extras (a quicker first run); a full install serves it too
$(DEMO_STAMP): pyproject.toml
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	@if [ $(STAMP) -nt pyproject.toml ]; then echo "using the full install in $(VENV)"; \
	else $(VENV_PY) -m pip install -e ".[lightning,examples]"; fi
	@touch $@

install: $(STAMP) ## Create the venv and install the project with all extras (incl. dev)

test: $(STAMP) ## Run the test suite (extra pytest flags: PYTEST_ARGS="...")
	@$(VENV_PY) -m pytest -q --durations=25 $(PYTEST_ARGS); s=$$?; \
	if [ $$s -eq 5 ]; then echo "WARNING: pytest collected no tests"; exit 0; fi; \
	exit $$s

soak: $(STAMP) ## Churn soak: 4 peers joining/leaving/crashing for SOAK_SECONDS (default 180) s, with a report
	RELIABILITY_SOAK_SECONDS=$(SOAK_SECONDS) $(VENV_PY) -m pytest -q -s tests/reliability/test_churn.py $(PYTEST_ARGS)

demo: $(DEMO_STAMP) ## Run a real collaborative training of PEERS peers for STEPS steps (ALGORITHM=diloco: DiLoCo)
	$(VENV_PY) -m examples.demo --peers $(PEERS) --steps $(STEPS) --algorithm $(ALGORITHM) --output-dir demo_out

bench: $(STAMP) ## Benchmarks W1-W5 vs raw hivemind, W7 DiLoCo vs gradient: table, bench/results/<date>.json + W1 plot (BENCH_ARGS="--workload W1")
	$(VENV_PY) -m bench $(BENCH_ARGS)

lint: $(STAMP) ## ruff check + ruff format --check + mypy on the public packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy collab_core lightning_collab accelerate_collab --ignore-missing-imports --follow-imports=silent

format: $(STAMP) ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove build artefacts and demo_out (keeps the venv)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache demo_out bench_out
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## clean, and also remove the venv
	rm -rf $(VENV)

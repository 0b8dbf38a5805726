# Entry points for a fresh clone: needs only Python 3.11+ (with venv) and make.
#   make example   install into .venv and run the workflow on the bundled example data
#   make test      install into .venv with the test tools and run the whole test suite
#   make lint      ruff, snakefmt and snakemake --lint
# CUDA=cuda12 (or cuda13) adds CuPy for a GPU; by default it is added (cuda12) only when
# nvidia-smi finds a GPU. CUDA=none never adds it.

PYTHON ?= python3
VENV ?= .venv
CORES ?= all
CUDA ?= auto

BIN := $(VENV)/bin
comma := ,
CUDA_EXTRA := $(if $(filter auto,$(CUDA)),$(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda12),$(filter-out none,$(CUDA)))
WORKFLOW_EXTRAS := workflow$(if $(CUDA_EXTRA),$(comma)$(CUDA_EXTRA))

.PHONY: example test lint clean-example

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "harmony-step needs Python 3.11 or newer; '$(PYTHON)' is older. Run make PYTHON=python3.12 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per set of extras, so `make test` after `make example` installs only what is missing.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	touch $@

# The workflow's rule calls the harmony-step command, so the virtual environment goes first on PATH.
example: $(VENV)/.installed-$(WORKFLOW_EXTRAS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	@echo
	@echo "Results, one folder per dataset (integrated.h5ad, convergence.tsv, summary.json, params.yaml, mixing_metrics.html, convergence.png, embedding.png):"
	@for folder in $(CURDIR)/results/*/; do \
	  case "$$folder" in */logs/|*/benchmarks/) ;; *) echo "  $$folder" ;; esac; done
	@echo "Logs: $(CURDIR)/results/logs/  Benchmarks: $(CURDIR)/results/benchmarks/"
	@echo "HTML report with the metrics and plots: $(BIN)/snakemake --configfile config/config.yaml --report report.html"

test: $(VENV)/.installed-test$(comma)workflow
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test$(comma)workflow
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check workflow
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-example:
	rm -rf results report.html

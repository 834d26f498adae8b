# `make train` and `make test` set up everything they need (venv, pinned packages, data) first;
# set-up steps already done are skipped.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)
DATA   := .cache/data/.fetched

.PHONY: help setup data train test tensorboard clean-outputs
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# the compiled CPU kernels build once (~30 s each), then load from the cache; a failed build stops here with the
# compiler's output (DYNCONV_NATIVE=0 goes on without them, on the slower pure-PyTorch path)
setup: $(STAMP) $(DATA)  ## virtual env, pinned packages, bundled data, the compiled CPU kernels
	@$(PY) -W ignore::RuntimeWarning:runpy -m dynconv.functional.native

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

$(DATA): scripts/fetch_data.sh data/fetch.py $(STAMP)
	bash scripts/fetch_data.sh

train: setup  ## the main job: `python train.py` with the default config
	$(PY) train.py

# one worker per core (tests/conftest.py gives each one torch thread); worksteal hands each worker a contiguous
# half of the tests (a module's shared fixtures are mostly built once) and rebalances by stealing
WORKERS ?= auto
test: setup  ## the whole test suite, in parallel (WORKERS=0: serially, in one process)
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal

LOGDIR ?= outputs
tensorboard: setup  ## TensorBoard on the runs (LOGDIR=multirun/<sweep> for a sweep's HParams table)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean-outputs:  ## remove run folders
	rm -rf outputs multirun

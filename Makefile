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

setup: $(STAMP) $(DATA)  ## virtual env, pinned packages, bundled data, the compiled CPU kernel
	@$(PY) -W ignore -m dynconv.functional.native > /dev/null  # builds once (~30 s), then a cache hit

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

$(DATA): scripts/fetch_data.sh data/fetch.py $(STAMP)
	bash scripts/fetch_data.sh

train: setup  ## the main job: `python train.py` with the default config
	$(PY) train.py

test: setup  ## the whole test suite
	$(PY) -m pytest -q

LOGDIR ?= outputs
tensorboard: setup  ## TensorBoard on the runs (LOGDIR=multirun/<sweep> for a sweep's HParams table)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean-outputs:  ## remove run folders
	rm -rf outputs multirun

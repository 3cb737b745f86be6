# `make run` and `make test` each (re)create .venv from requirements.txt when it is
# missing or older than requirements.txt, then run the default experiment / the tests.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
WORKDIR ?= runs/multi_digits
DATA_DIR ?= data/tfds
PYTEST_ARGS ?=

.PHONY: run test test-quick venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.train --config=experiments/configs/multi_digits.py \
	  --workdir=$(WORKDIR) --config.data.data_dir=$(DATA_DIR)

# Two workers; the tests that share an expensive fixture (a reference run) are
# marked `xdist_group` and go to one worker, so it is made once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests $(PYTEST_ARGS)

# Everything but the tests that launch processes (marked `slow`).
test-quick: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs

# Every target sets up its own environment: a fresh machine needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: demo test test-all bench clean

# torch==2.13.0 first: the CPU build is what this machine has; the package's own
# `torch>=2.4` requirement is then already satisfied and pulls nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sharpscope demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	SHARPSCOPE_HYPOTHESIS=explore $(PY) -m pytest -q

bench: $(STAMP)
	@set -e; for script in bench/bench_*.py; do \
		echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) build src/*.egg-info .pytest_cache .hypothesis

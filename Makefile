# rlcredit: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test fuzz bench docs verl-contract clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,docs,mm,trl]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlcredit demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The long profile of the no-NaN/inf property tests (issue #14): fresh Hypothesis examples, ~2-5 min.
fuzz: $(STAMP)
	RLCREDIT_FUZZ=long $(PY) -m pytest -q tests/test_robustness_property.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

# The real-verl contract test, in its own venv (verl needs transformers < 5.11 and ray): ~4 min first build.
verl-contract:
	scripts/verl_contract.sh $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis

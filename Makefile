# Two commands do all the set-up on a fresh machine with nothing but Python:
#   make demo   - create .venv, install, train the demo model on the bundled digits, write runs/demo
#   make test   - create .venv, install, run the test suite (what .ci/run calls)
#   make tutorials - run every notebook in tutorials/ and store its outputs and figures in it
#   make docs   - build the documentation site into docs/_build/html (warnings are errors)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench tutorials docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# a CPU build of torch first (from local disk here); any other torch request pulls CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ppdgm.demo runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2

tutorials: $(STAMP)
	$(BIN)/python tutorials/execute.py

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench,series]'
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs docs/_build docs/generated dist

# Two commands matter: `make demo` and `make test` (each sets up .venv first when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test,beam]'
	touch $(STAMP)

# The demo: build the demo shards, then the headline stage (CycleGAN styles + MSVCL contrastive
# pre-training, configs/demo/contrastive.yaml) and its style-invariance report.
demo: $(STAMP)
	$(VENV)/bin/mammodg demo
	$(VENV)/bin/mammodg train --stage contrastive
	$(VENV)/bin/mammodg evaluate --stage contrastive --run runs/demo_contrastive

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo_run runs .pytest_cache benchmarks/results

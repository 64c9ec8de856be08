# The two commands a newcomer types: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: this pair is on the local disk; a bare `torch` would download several GB
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,demo,timm]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m hat run --benchmark split-digits --model mlp --epochs 5 --optimizer adamw --lr 1e-3 --seed 0 --compare --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache

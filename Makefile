# Thin wrappers over dev.py (which needs nothing but Python 3.11).
PYTHON ?= python3

.PHONY: setup demo test bench
setup:
	$(PYTHON) dev.py setup
demo:
	$(PYTHON) dev.py demo
test:
	$(PYTHON) dev.py test
bench:
	$(PYTHON) dev.py setup && .venv/bin/python -m loraplex.loadtest.bench_engine

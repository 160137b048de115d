# The two commands of the README: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test bench

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m data.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_engine.py

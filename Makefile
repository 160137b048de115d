# The two commands of the README: `make demo` and `make test` (everything; what CI runs). `make test-quick`:
# the inner loop, without the tests marked slow or browser (pytest.ini).
PY := .venv/bin/python

.PHONY: setup demo test test-quick bench

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m data.demo

test: setup
	$(PY) -m pytest -q

test-quick: setup
	$(PY) -m pytest -q -m "not slow and not browser"

bench: setup
	$(PY) bench/bench_engine.py
